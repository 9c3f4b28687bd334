"""Pending webhook deliveries survive a restart of everything that holds them.

The receiver is down while events are produced, so every delivery is retrying; then every worker
is killed (SIGKILL: no drain, no nak), NATS is restarted on its data, new workers start, and the
receiver comes back: every event arrives, accepted once, signed, and nothing is dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from litestar.testing import AsyncTestClient

from sessionmgr.common.models import event_decoder
from sessionmgr.common.webhook_models import DEAD_LETTER_STREAM, WEBHOOKS_STREAM
from sessionmgr.gateway.app import create_app
from sessionmgr.worker.webhooks import CONSUMER
from tests.conftest import auth
from tests.support.webhook_receiver import SECRET, WebhookReceiver, session_events, signature_ok, wait_settled

pytestmark = pytest.mark.slow
HEADERS = auth("webhook-chaos-user")
SESSIONS = 3
INCREMENTS = 3


async def wait_consumer(js, predicate, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await js.consumer_info(WEBHOOKS_STREAM, CONSUMER, timeout=1)
            if predicate(info):
                return
        except Exception:  # noqa: BLE001 - NATS still coming back
            info = None
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {info}"
        await asyncio.sleep(0.1)


async def test_pending_deliveries_survive_killing_every_worker_and_restarting_nats(make_cluster) -> None:  # type: ignore[no-untyped-def]
    receiver = WebhookReceiver()  # not listening yet: every attempt is refused
    cluster, watch, nc = await make_cluster(
        workers=2,
        webhook_url=receiver.url(),
        webhook_secret=SECRET,
        webhook_retry_base_delay=0.1,
        webhook_retry_max_delay=0.5,
        webhook_max_attempts=50,  # keeps retrying through the restart (> 15 s of attempts)
        webhook_timeout=1.0,
        drain_timeout=1.0,
    )
    js = nc.jetstream()
    sids = []
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        for _ in range(SESSIONS):
            r = await api.post("/sessions", headers=HEADERS)
            assert r.status_code == 201, r.text
            sids.append(r.json()["session_id"])
            for _ in range(INCREMENTS):
                body = {"action": "context.incr", "payload": {"key": "n"}}
                r = await api.post(f"/sessions/{sids[-1]}/request", json=body, headers={**HEADERS, "Idempotency-Key": uuid.uuid4().hex})
                assert r.status_code == 200, r.text
    expected = {e.id for sid in sids for e in await session_events(nc, sid, 1 + INCREMENTS)}
    assert len(expected) == SESSIONS * (1 + INCREMENTS)
    # Every delivery was recorded (the replies came after the acked enqueue) and is being retried.
    assert (await js.stream_info(WEBHOOKS_STREAM)).state.messages == len(expected)
    await wait_consumer(js, lambda c: c.num_ack_pending == len(expected) and c.num_redelivered > 0, "every delivery retrying")

    for proc in cluster.workers.values():
        proc.kill()
    cluster.servers.nats.stop()  # type: ignore[union-attr]
    cluster.servers.start_nats()
    # The deliveries were on disk in NATS (nc reconnects by itself), with their attempt counts.
    await wait_consumer(js, lambda c: c.num_pending + c.num_ack_pending == len(expected), "deliveries kept across the NATS restart")

    fresh = {cluster.start_worker(), cluster.start_worker()}
    await watch.wait_covered(cluster.settings.shard_count, fresh, timeout=30)
    await receiver.start()
    try:
        await receiver.wait_for(lambda rx: {r.headers["x-webhook-id"] for r in rx.accepted()} >= expected, timeout=30, what="every event accepted")
        await wait_settled(nc, timeout=30)
        accepted = receiver.accepted()
        assert sorted(r.headers["x-webhook-id"] for r in accepted) == sorted(expected)  # each once
        for r in accepted:
            assert signature_ok(r)
            assert event_decoder.decode(r.body).id == r.headers["x-webhook-id"]
            assert int(r.headers["x-webhook-attempt"]) > 1  # retried across the restart, not sent fresh
        assert (await js.stream_info(DEAD_LETTER_STREAM)).state.messages == 0
        assert (await js.stream_info(WEBHOOKS_STREAM)).state.messages == 0
    finally:
        await receiver.stop()
