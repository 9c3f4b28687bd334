"""Hostile input never reaches NATS, and CORS stays off unless configured.

A session ID or action name is part of a NATS subject: one with ``.``, ``*``, ``>``, spaces or
control characters could address another subject. The gateway must refuse it (400) before
publishing anything; a subscriber on ``sm.>`` proves nothing was published.
"""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import quote

import httpx
import pytest
from nats.aio.msg import Msg

from tests.conftest import auth
from tests.integration.test_api import assert_problem
from tests.support.cluster import Cluster, nats_client
from tests.support.security import gateway_client

MARK = f"zq{uuid.uuid4().hex[:10]}"
HOSTILE_IDS = [
    f"{MARK}.x",
    f"{MARK}.*",
    f"{MARK}.>",
    f"{MARK}*",
    f"{MARK}>",
    f"{MARK} x",
    f"{MARK}\tx",
    f"{MARK}\r\nPUB sm.hb.x 0",
    f"{MARK}\x00",
    f"{MARK}é",
    f"{MARK}%2Ex",
    MARK + "a" * 64,
    f"sm.shard.1.{MARK}",
]
HOSTILE_ACTIONS = [f"{MARK}.>", f"echo.{MARK}*", f"echo {MARK}", f"Echo.{MARK}", f"echo..{MARK}", f"echo\n{MARK}", f"echo.{MARK}.x.y.z"]


async def test_rejected_ids_and_actions_are_never_published(api: httpx.AsyncClient, cluster: Cluster, headers: dict[str, str]) -> None:
    seen: list[Msg] = []
    sentinel = asyncio.Event()
    sentinel_subject = f"sm.test.{MARK}-sentinel"

    async def on_message(msg: Msg) -> None:
        if msg.subject == sentinel_subject:
            sentinel.set()
        else:
            seen.append(msg)

    sid = (await api.post("/sessions", json={}, headers=headers)).json()["session_id"]
    async with nats_client(cluster.servers.nats_url) as nc:
        await nc.subscribe("sm.>", cb=on_message)
        await nc.subscribe("sessions.>", cb=on_message)
        await nc.flush()
        for bad in HOSTILE_IDS:
            path = quote(bad, safe="")
            for method, url, body in (
                ("GET", f"/sessions/{path}", None),
                ("PUT", f"/sessions/{path}", {"state": "idle"}),
                ("DELETE", f"/sessions/{path}", None),
                ("POST", f"/sessions/{path}/request", {"action": "echo", "payload": {}}),
            ):
                resp = await api.request(method, url, json=body, headers=headers)
                assert resp.status_code in (400, 404, 405), (bad, method, resp.status_code, resp.text)
                assert resp.status_code < 500
        for action in HOSTILE_ACTIONS:
            resp = await api.post(f"/sessions/{sid}/request", json={"action": action, "payload": {}}, headers=headers)
            assert_problem(resp, 400)
        # Everything the gateway published for these requests reached the server before their
        # answers did; a message of our own after them flushes the subscription.
        await nc.publish(sentinel_subject, b"")
        await asyncio.wait_for(sentinel.wait(), 5)
    leaked = [m.subject for m in seen if MARK in m.subject or MARK.encode() in m.data or any(MARK in v for v in (m.headers or {}).values())]
    assert leaked == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"metadata": {"bad key!": 1}}, 400),
        ({"metadata": {f"k{i}": i for i in range(1000)}}, 400),
        ({"metadata": {"k": "x" * 5000}}, 400),
        ({"metadata": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": 1}}}}}}}}}}}, 400),
    ],
)
async def test_hostile_metadata_is_a_clear_4xx(api: httpx.AsyncClient, headers: dict[str, str], body: dict, status: int) -> None:  # type: ignore[type-arg]
    resp = await api.post("/sessions", json=body, headers=headers)
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")


async def test_hostile_context_keys_are_refused(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    sid = (await api.post("/sessions", json={}, headers=headers)).json()["session_id"]
    for key in ("bad key", "a" * 300, "", "x\ny"):
        resp = await api.post(f"/sessions/{sid}/request", json={"action": "context.set", "payload": {key: 1}}, headers=headers)
        assert 400 <= resp.status_code < 500, (key, resp.status_code, resp.text)


# ---- CORS ----------------------------------------------------------------------------------------


async def test_cors_is_off_by_default(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    preflight = await api.options("/sessions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    resp = await api.get("/sessions", headers={**headers, "Origin": "https://evil.example"})
    assert resp.status_code == 200
    assert "access-control-allow-origin" not in resp.headers


async def test_cors_allows_only_the_configured_origins(cluster: Cluster, user: str) -> None:
    settings = cluster.settings.with_overrides(cors_allow_origins="https://app.example, https://admin.example")
    async with gateway_client(settings) as api:
        ok = await api.options("/sessions", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
        assert ok.status_code in (200, 204)
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in ok.headers
        got = await api.get("/sessions", headers={**auth(user), "Origin": "https://admin.example"})
        assert got.status_code == 200 and got.headers["access-control-allow-origin"] == "https://admin.example"
        evil = await api.options("/sessions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert evil.headers.get("access-control-allow-origin") != "https://evil.example"
        other = await api.get("/sessions", headers={**auth(user), "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
