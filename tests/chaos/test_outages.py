"""Redis and NATS going away under writes: nothing refused, nothing lost, nothing applied twice."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from litestar.testing import AsyncTestClient

from sessionmgr.common.models import request_status_decoder
from sessionmgr.common.streams import request_status_bucket
from sessionmgr.gateway.app import create_app
from tests.conftest import auth
from tests.support.load import IncrementLoad, assert_exactly_once

pytestmark = pytest.mark.slow
HEADERS = auth("outage-user")


async def _incr(api, sid: str) -> object:  # type: ignore[no-untyped-def]
    return await api.post(
        f"/sessions/{sid}/request",
        json={"action": "context.incr", "payload": {"key": "n"}},
        headers={**HEADERS, "Idempotency-Key": uuid.uuid4().hex},
    )


async def _wait_statuses(nc, request_ids: list[str], timeout: float = 30.0) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Follow the request-status bucket until every queued request has left 'queued'."""
    kv = await request_status_bucket(nc.jetstream())
    watcher = await kv.watchall()
    final: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while not all(rid in final for rid in request_ids):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"still queued: {[r for r in request_ids if r not in final]}"
            try:
                entry = await watcher.updates(timeout=min(remaining, 1.0))
            except Exception:  # noqa: BLE001 - nats TimeoutError: no update this second
                continue
            if entry is None or not entry.value:
                continue
            status = request_status_decoder.decode(entry.value)
            if status.status != "queued":
                final[status.request_id] = status
    finally:
        await watcher.stop()
    return final


async def test_redis_outage_queues_writes_and_applies_them_in_order_exactly_once(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=2)
    servers = cluster.servers
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        sid = (await api.post("/sessions", headers=HEADERS)).json()["session_id"]
        outcomes: list[tuple[int, object]] = []
        for _ in range(10):
            r = await _incr(api, sid)
            assert r.status_code == 200
            outcomes.append((200, r.json()["result"]["value"]))

        servers.redis.kill()  # type: ignore[union-attr]
        queued: list[str] = []
        for _ in range(15):
            r = await _incr(api, sid)
            assert r.status_code == 202, r.text  # accepted, not refused
            body = r.json()
            assert body["status"] == "queued"
            assert r.headers["location"] == f"/sessions/{sid}/requests/{body['request_id']}"
            queued.append(body["request_id"])
            outcomes.append((202, body["request_id"]))
        polled = await api.get(f"/sessions/{sid}/requests/{queued[0]}", headers=HEADERS)
        assert polled.status_code == 200 and polled.json()["status"] == "queued"
        assert (await api.get(f"/sessions/{sid}/requests/{queued[0]}", headers=auth("someone-else"))).status_code == 404
        # Reads come from the owner's memory and say they may be stale.
        stale = await api.get(f"/sessions/{sid}", headers=HEADERS)
        assert stale.status_code == 200 and stale.headers["x-session-stale"] == "true"
        await watch.wait_until(lambda live: any(b.degraded for b in live.values()), what="a worker in degraded mode")
        ready = await api.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"

        servers.start_redis()
        final = await _wait_statuses(nc, queued)
        values = []
        for kind, value in outcomes:
            if kind == 200:
                values.append(value)
            else:
                status = final[value]
                assert status.status == "applied", status  # type: ignore[attr-defined]
                values.append(status.result["result"]["value"])  # type: ignore[attr-defined]
        # Applied in arrival order, each exactly once: the same as without an outage.
        assert values == list(range(1, 26))
        # Once the backlog is drained the workers leave degraded mode and reads are fresh again.
        await watch.wait_until(lambda live: live and not any(b.degraded for b in live.values()), what="degraded mode over")
        after = await api.get(f"/sessions/{sid}", headers=HEADERS)
        assert after.json()["context"]["n"] == 25 and after.json()["version"] == 26
        assert "x-session-stale" not in after.headers
        assert (await api.get("/readyz")).json()["status"] == "ready"
        polled = await api.get(f"/sessions/{sid}/requests/{queued[-1]}", headers=HEADERS)
        assert polled.json()["status"] == "applied" and polled.json()["result"]["result"]["value"] == 25
        # Normal service resumes: the next write is applied directly.
        r = await _incr(api, sid)
        assert r.status_code == 200 and r.json()["result"]["value"] == 26


async def test_nats_restart_under_load_recovers_without_restarting_services(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=2)
    servers = cluster.servers
    # The gateway as its own process too: every service must come back by itself.
    base_url = cluster.start_gateway()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as api:
        await watch.wait_until(lambda live: len(live) == 2, what="workers up")
        sessions = []
        while len(sessions) < 12:
            r = await api.post("/sessions", headers=HEADERS)
            assert r.status_code in (201, 503), r.text  # 503 only while the new gateway sees no worker yet
            if r.status_code == 201:
                sessions.append(r.json()["session_id"])
        processes = {**cluster.workers, **cluster.supervisors, **cluster.gateways}
        pids = {name: proc.pid for name, proc in processes.items()}
        async with IncrementLoad(api, HEADERS, sessions) as load:
            await load.wait_acks(60)
            servers.nats.stop()  # type: ignore[union-attr]
            started = time.monotonic()
            during = await api.get(f"/sessions/{sessions[0]}", headers=HEADERS)
            assert during.status_code == 503 and "retry-after" in during.headers  # fails fast, no hang
            assert time.monotonic() - started < cluster.settings.request_timeout
            servers.start_nats()
            await watch.wait_covered(cluster.settings.shard_count, set(cluster.workers), timeout=30)
            await load.wait_acks(60, timeout=60)
        await assert_exactly_once(api, HEADERS, load.report, sessions)
        for name, proc in processes.items():
            assert proc.alive() and proc.pid == pids[name], f"{name} was restarted or died"


async def test_same_idempotency_key_across_a_worker_kill_applies_once(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=2)
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        sid = (await api.post("/sessions", headers=HEADERS)).json()["session_id"]
        key = {"Idempotency-Key": "pay-once-" + uuid.uuid4().hex}
        body = {"action": "context.incr", "payload": {"key": "n", "by": 10}}
        first = await api.post(f"/sessions/{sid}/request", json=body, headers={**HEADERS, **key})
        assert first.status_code == 200
        # Kill every worker that could hold it, start a fresh one: the key must still be known.
        for proc in cluster.workers.values():
            proc.kill()
        fresh = cluster.start_worker()
        await watch.wait_covered(cluster.settings.shard_count, {fresh})
        again = await api.post(f"/sessions/{sid}/request", json=body, headers={**HEADERS, **key})
        assert again.status_code == 200 and again.json() == first.json()
        got = await api.get(f"/sessions/{sid}", headers=HEADERS)
        assert got.json()["context"]["n"] == 10
        conflict = await api.post(f"/sessions/{sid}/request", json={**body, "payload": {"key": "n", "by": 11}}, headers={**HEADERS, **key})
        assert conflict.status_code == 422 and conflict.json()["code"] == "idempotency_conflict"
