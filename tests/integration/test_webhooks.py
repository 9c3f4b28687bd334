"""Webhooks end to end: real workers POST to a real HTTP receiver in this process.

Retries until accepted (once each, signed, only the filtered events), dead letters on a 4xx
listed and redriven through the gateway's REST routes and the NATS admin subjects, 429 retried.
Retry delays are shortened (base 50 ms) so every test runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from sessionmgr.common.models import event_decoder
from sessionmgr.common.webhook_models import ADMIN_DEAD_LETTERS, DEAD_LETTER_STREAM
from sessionmgr.gateway.app import create_app
from tests.conftest import auth
from tests.support.webhook_receiver import SECRET, WebhookReceiver, session_events, signature_ok, wait_settled

FAST = {"webhook_secret": SECRET, "webhook_retry_base_delay": 0.05, "webhook_retry_max_delay": 0.2, "webhook_timeout": 2.0, "drain_timeout": 1.0}
ADMIN = auth("ops", scope="sessions:admin")


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    rx = await WebhookReceiver().start()
    try:
        yield rx
    finally:
        await rx.stop()


async def _incr(api, sid: str, headers: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    r = await api.post(f"/sessions/{sid}/request", json={"action": "context.incr", "payload": {"key": "n"}}, headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
    assert r.status_code == 200, r.text


async def test_receiver_failing_twice_gets_each_filtered_event_once_signed(make_cluster, receiver: WebhookReceiver, headers) -> None:  # type: ignore[no-untyped-def]
    receiver.respond = lambda path, hdrs, attempt: 500 if attempt <= 2 else 200
    cluster, _, nc = await make_cluster(workers=2, webhook_url=receiver.url(), webhook_events="created,request.*", **FAST)
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        sid = (await api.post("/sessions", headers=headers)).json()["session_id"]
        for _ in range(5):
            await _incr(api, sid, headers)
        assert (await api.put(f"/sessions/{sid}", json={"metadata": {"a": 1}}, headers=headers)).status_code == 200
        assert (await api.delete(f"/sessions/{sid}", headers=headers)).status_code == 204
    events = await session_events(nc, sid, 8)
    assert {e.type for e in events} == {"created", "request.applied", "updated", "terminated"}
    wanted = {e.id: e for e in events if e.type == "created" or e.type.startswith("request.")}
    assert len(wanted) == 6

    await receiver.wait_for(lambda rx: {r.headers["x-webhook-id"] for r in rx.accepted()} >= set(wanted), what="every filtered event accepted")
    await wait_settled(nc)
    accepted = receiver.accepted()
    assert sorted(r.headers["x-webhook-id"] for r in accepted) == sorted(wanted)  # each exactly once
    assert {r.headers["x-webhook-id"] for r in receiver.received} == set(wanted)  # nothing outside the filter
    for r in receiver.received:
        assert signature_ok(r), r.headers
        event = event_decoder.decode(r.body)
        assert event == wanted[event.id]
        assert r.headers["x-webhook-event"] == event.type
        assert r.headers["content-type"] == "application/json"
        assert abs(int(r.headers["x-webhook-timestamp"]) - time.time()) < 60
    assert sorted(int(r.headers["x-webhook-attempt"]) for r in accepted) == [3] * 6
    assert len(receiver.received) == 18  # 2 failures + 1 success per delivery
    dlq = await nc.jetstream().stream_info(DEAD_LETTER_STREAM)
    assert dlq.state.messages == 0


async def test_4xx_is_dead_lettered_at_once_listed_and_redriven_and_429_is_retried(make_cluster, receiver: WebhookReceiver, headers) -> None:  # type: ignore[no-untyped-def]
    bad_status = {"value": 400}

    def respond(path: str, hdrs: dict[str, str], attempt: int):  # type: ignore[no-untyped-def]
        if path == "/bad":
            return bad_status["value"]
        if path == "/busy":
            return (429, {"Retry-After": "0"}) if attempt == 1 else 200
        return 200

    receiver.respond = respond
    cluster, _, nc = await make_cluster(workers=2, webhook_url=f"{receiver.url('/bad')},{receiver.url('/busy')}", **FAST)
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        sid = (await api.post("/sessions", headers=headers)).json()["session_id"]
        await receiver.wait_for(lambda rx: any(r.path == "/busy" for r in rx.accepted()) and any(r.path == "/bad" for r in rx.received))

        # The 400 is dead-lettered after one attempt; it shows up in the REST list.
        deadline = time.monotonic() + 10
        while not (page := (await api.get("/webhooks/dead-letters", headers=ADMIN)).json())["items"]:
            assert time.monotonic() < deadline, page
            await asyncio.sleep(0.05)
        assert page["total"] == 1 and page["next_after"] is None
        [item] = page["items"]
        assert item["url"] == receiver.url("/bad") and item["target"] == "global"
        assert item["last_status"] == 400 and item["attempts"] == 1 and item["last_error"].startswith("HTTP 400")
        assert item["event"]["type"] == "created" and item["event"]["session_id"] == sid == item["session_id"]
        assert [r.status for r in receiver.received if r.path == "/bad"] == [400]
        assert [r.status for r in receiver.received if r.path == "/busy"] == [429, 200]  # 429 retried

        # Only admins see or move dead letters.
        assert (await api.get("/webhooks/dead-letters", headers=headers)).status_code == 403
        writer = auth("someone", scope="sessions:write")
        r = await api.post("/webhooks/dead-letters/redrive", json={"all": True}, headers=writer)
        assert r.status_code == 403 and r.headers["content-type"].startswith("application/problem+json")
        assert (await api.get("/webhooks/dead-letters")).status_code == 401
        r = await api.post("/webhooks/dead-letters/redrive", json={}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["code"] == "validation_error"
        assert (await api.get("/webhooks/dead-letters?limit=1000", headers=ADMIN)).status_code == 400

        # The receiver is fixed: redrive delivers, and the dead letter is gone.
        bad_status["value"] = 200
        r = await api.post("/webhooks/dead-letters/redrive", json={"ids": [item["id"]]}, headers=ADMIN)
        assert r.status_code == 200 and r.json() == {"redriven": [item["id"]], "missing": [], "more": False}
        await receiver.wait_for(lambda rx: any(x.path == "/bad" for x in rx.accepted()), what="redriven delivery")
        redelivered = [x for x in receiver.received if x.path == "/bad"][-1]
        assert redelivered.headers["x-webhook-id"] == item["event_id"] and signature_ok(redelivered)
        page = (await api.get("/webhooks/dead-letters", headers=ADMIN)).json()
        assert page == {"items": [], "next_after": None, "total": 0}
        again = await api.post("/webhooks/dead-letters/redrive", json={"ids": [item["id"]]}, headers=ADMIN)
        assert again.json() == {"redriven": [], "missing": [item["id"]], "more": False}

    # The NATS admin subject answers like every worker subject: errors as headers.
    reply = await nc.request(ADMIN_DEAD_LETTERS, b'{"limit": 0}', timeout=5)
    assert reply.headers and reply.headers["Sm-Error"] == "validation_error"
    reply = await nc.request(ADMIN_DEAD_LETTERS, b"{}", timeout=5)
    assert msgspec.json.decode(reply.data) == {"items": [], "next_after": None, "total": 0}
    await wait_settled(nc)


async def test_session_webhook_with_its_own_secret_and_filter_next_to_a_global_one(make_cluster, receiver: WebhookReceiver, headers) -> None:  # type: ignore[no-untyped-def]
    cluster, _, nc = await make_cluster(workers=1, webhook_url=receiver.url("/global"), webhook_events="created", **FAST)
    own = {"url": receiver.url("/mine"), "events": ["request.*"], "secret": "session-own-secret"}
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        for bad in ({"url": "ftp://h.example/x"}, {"url": receiver.url(), "events": ["Not A Filter"]}):
            r = await api.post("/sessions", json={"config": {"webhooks": [bad]}}, headers=headers)
            assert r.status_code == 400 and r.json()["code"] == "validation_error", r.text
        too_many = [{"url": f"https://h.example/{i}"} for i in range(17)]
        assert (await api.post("/sessions", json={"config": {"webhooks": too_many}}, headers=headers)).status_code == 400

        r = await api.post("/sessions", json={"config": {"webhooks": [own]}}, headers=headers)
        assert r.status_code == 201, r.text
        assert r.json()["config"]["webhooks"][0]["secret"] == "***"  # write-only
        sid = r.json()["session_id"]
        await _incr(api, sid, headers)
    created, applied = await session_events(nc, sid, 2)
    await receiver.wait_for(lambda rx: len(rx.accepted()) == 2)
    await wait_settled(nc)
    by_path = {r.path: r for r in receiver.received}
    assert len(receiver.received) == 2 and set(by_path) == {"/global", "/mine"}
    assert by_path["/global"].headers["x-webhook-id"] == created.id and signature_ok(by_path["/global"])
    assert by_path["/mine"].headers["x-webhook-id"] == applied.id
    assert signature_ok(by_path["/mine"], "session-own-secret") and not signature_ok(by_path["/mine"])
