"""Concurrency and per-session ordering against the real cluster.

A session's requests are applied one at a time, in the order they reach its worker; requests on
different sessions run concurrently. Nothing here sleeps: every wait is on a reply.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import msgspec
from nats.aio.msg import Msg

from sessionmgr.common import bus, subjects
from sessionmgr.common.errors import HEADER_ERROR_CODE
from tests.support.cluster import Cluster, nats_client


async def create(api: httpx.AsyncClient, headers: dict[str, str], **kw: Any) -> str:
    resp = await api.post("/sessions", json={}, headers=headers, **kw)
    assert resp.status_code == 201, resp.text
    return resp.json()["session_id"]  # type: ignore[no-any-return]


async def incr(api: httpx.AsyncClient, headers: dict[str, str], sid: str, key: str = "n") -> httpx.Response:
    return await api.post(f"/sessions/{sid}/request", json={"action": "context.incr", "payload": {"key": key}}, headers=headers)


async def test_concurrent_incr_on_one_session_is_serialised(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    sid = await create(api, headers)
    n = 200
    responses = await asyncio.gather(*(incr(api, headers, sid) for _ in range(n)))
    failures = [(r.status_code, r.text) for r in responses if r.status_code != 200]
    assert not failures, failures[:5]
    values = [r.json()["result"]["value"] for r in responses]
    assert sorted(values) == list(range(1, n + 1))  # every increment saw a distinct, gap-free state
    for resp in responses:
        body = resp.json()
        assert body["version"] == body["result"]["value"] + 1  # value and version moved together
        assert resp.headers["etag"] == f'"{body["version"]}"'
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.status_code == 200
    assert got.json()["context"] == {"n": n}
    assert got.json()["version"] == n + 1
    assert got.headers["etag"] == f'"{n + 1}"'


async def test_one_clients_requests_apply_in_publish_order(api: httpx.AsyncClient, cluster: Cluster, user: str, headers: dict[str, str]) -> None:
    sid = await create(api, headers)
    base = 1  # a new session is at version 1
    n = 100
    subject = subjects.session_subject(sid, "context.set", cluster.settings.shard_count)
    replies: dict[int, Msg] = {}
    all_in = asyncio.Event()
    run = uuid.uuid4().hex

    async with nats_client(cluster.servers.nats_url) as nc:
        inbox = nc.new_inbox()

        async def on_reply(msg: Msg) -> None:
            replies[int(msg.subject.rsplit(".", 1)[1])] = msg
            if len(replies) == n:
                all_in.set()

        sub = await nc.subscribe(f"{inbox}.*", cb=on_reply)
        await nc.flush()
        # Publish every request back to back, in order, before any reply is read.
        for i in range(1, n + 1):
            await nc.publish(
                subject,
                msgspec.json.encode({"seq": i}),
                reply=f"{inbox}.{i}",
                headers={bus.HEADER_USER: user, bus.HEADER_IDEMPOTENCY_KEY: f"order-{run}-{i}"},
            )
        await nc.flush()
        await asyncio.wait_for(all_in.wait(), timeout=15)
        await sub.unsubscribe()

    assert sorted(replies) == list(range(1, n + 1))
    for i, msg in sorted(replies.items()):
        headers_in = msg.headers or {}
        assert HEADER_ERROR_CODE not in headers_in, (i, headers_in)
        assert headers_in.get("Sm-Status") == "200", (i, headers_in)
        body = msgspec.json.decode(msg.data)
        assert body["action"] == "context.set"
        assert body["result"] == {"keys": ["seq"]}
        assert body["version"] == base + i, f"request {i} was applied as change {body['version'] - base}"
        assert headers_in.get("Sm-Version") == str(base + i)

    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.json()["context"] == {"seq": n}
    assert got.json()["version"] == base + n


async def test_concurrent_requests_on_different_sessions_all_succeed(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    sessions = list(await asyncio.gather(*(create(api, headers) for _ in range(20))))
    assert len(set(sessions)) == 20
    per_session = 10
    # Interleave the sessions so every worker and shard is busy at once.
    responses = await asyncio.gather(*(incr(api, headers, sid) for _ in range(per_session) for sid in sessions))
    failures = [(r.status_code, r.text) for r in responses if r.status_code != 200]
    assert not failures, failures[:5]
    gets = await asyncio.gather(*(api.get(f"/sessions/{sid}", headers=headers) for sid in sessions))
    for sid, got in zip(sessions, gets, strict=True):
        assert got.status_code == 200, got.text
        assert got.json()["context"] == {"n": per_session}, sid
        assert got.json()["version"] == per_session + 1


async def test_different_sessions_progress_while_one_is_busy(api: httpx.AsyncClient, cluster: Cluster, user: str, headers: dict[str, str]) -> None:
    """Direct NATS: two sessions' streams interleaved from one client each apply fully and in order."""
    a, b = await create(api, headers), await create(api, headers)
    n = 30
    replies: dict[tuple[str, int], Msg] = {}
    all_in = asyncio.Event()
    run = uuid.uuid4().hex
    async with nats_client(cluster.servers.nats_url) as nc:
        inbox = nc.new_inbox()

        async def on_reply(msg: Msg) -> None:
            _, which, seq = msg.subject.rsplit(".", 2)
            replies[(which, int(seq))] = msg
            if len(replies) == 2 * n:
                all_in.set()

        sub = await nc.subscribe(f"{inbox}.*.*", cb=on_reply)
        await nc.flush()
        for i in range(1, n + 1):
            for which, sid in (("a", a), ("b", b)):
                await nc.publish(
                    subjects.session_subject(sid, "context.incr", cluster.settings.shard_count),
                    msgspec.json.encode({"key": "n"}),
                    reply=f"{inbox}.{which}.{i}",
                    headers={bus.HEADER_USER: user, bus.HEADER_IDEMPOTENCY_KEY: f"pair-{run}-{which}-{i}"},
                )
        await nc.flush()
        await asyncio.wait_for(all_in.wait(), timeout=15)
        await sub.unsubscribe()
    for (which, i), msg in replies.items():
        assert HEADER_ERROR_CODE not in (msg.headers or {}), (which, i, msg.headers)
        body = msgspec.json.decode(msg.data)
        assert body["result"] == {"key": "n", "value": i}, (which, i, body)
        assert body["version"] == 1 + i
    for sid in (a, b):
        got = await api.get(f"/sessions/{sid}", headers=headers)
        assert got.json()["context"] == {"n": n}


async def test_concurrent_creates_with_one_idempotency_key_make_one_session(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    keyed = {**headers, "Idempotency-Key": f"burst-{uuid.uuid4()}"}
    responses = await asyncio.gather(*(api.post("/sessions", json={"metadata": {"a": 1}}, headers=keyed) for _ in range(20)))
    assert all(r.status_code == 201 for r in responses), [(r.status_code, r.text) for r in responses]
    assert len({r.json()["session_id"] for r in responses}) == 1
    listed = await api.get("/sessions", headers=headers)
    assert len(listed.json()["items"]) == 1


async def test_concurrent_retries_with_one_idempotency_key_apply_once(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    sid = await create(api, headers)
    keyed = {**headers, "Idempotency-Key": f"retry-{uuid.uuid4()}"}
    body = {"action": "context.incr", "payload": {"key": "n", "by": 3}}
    responses = await asyncio.gather(*(api.post(f"/sessions/{sid}/request", json=body, headers=keyed) for _ in range(20)))
    assert all(r.status_code == 200 for r in responses), [(r.status_code, r.text) for r in responses]
    assert {r.json()["result"]["value"] for r in responses} == {3}
    assert {r.json()["version"] for r in responses} == {2}
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.json()["context"] == {"n": 3}
    assert got.json()["version"] == 2
