"""The fast path answers the two hot routes exactly as the Litestar handlers do.

The same requests go to a gateway with the fast path and to one without; status, headers and
problem bodies must match (request IDs and versions aside). Counting the fast path's calls
proves the requests it should serve did not silently fall through to Litestar.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from sessionmgr.gateway import fastpath
from sessionmgr.gateway.app import create_app
from tests.conftest import auth
from tests.support.cluster import Cluster

VOLATILE_HEADERS = {"x-request-id", "etag", "date"}
Call = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


@pytest.fixture(scope="module")
async def apis(cluster: Cluster) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    fast = AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local")
    plain = AsyncTestClient(app=create_app(cluster.settings, fast_path=False), base_url="http://gateway.local")
    async with fast as fast_api, plain as plain_api:
        yield fast_api, plain_api


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the functions the fast path ran (not Litestar's hook and handlers)."""
    calls: list[str] = []
    for name in ("authenticate_and_limit_request", "fetch_session", "run_session_action"):
        original = getattr(fastpath, name)

        async def counting(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return await _original(*args, **kwargs)

        monkeypatch.setattr(fastpath, name, counting)
    return calls


def _comparable(resp: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {k: v for k, v in resp.headers.items() if k not in VOLATILE_HEADERS}
    body: Any = resp.content
    if resp.headers.get("content-type", "").startswith("application/problem+json"):
        body = resp.json()
    elif resp.content:
        body = sorted(resp.json())  # success bodies: same fields (IDs and values move on)
    return resp.status_code, headers, body


async def _same(apis: tuple[httpx.AsyncClient, httpx.AsyncClient], call: Call) -> httpx.Response:
    fast_api, plain_api = apis
    fast, plain = await call(fast_api), await call(plain_api)
    assert _comparable(fast) == _comparable(plain)
    assert ("etag" in fast.headers) == ("etag" in plain.headers)
    return fast


async def test_hot_routes_answer_like_litestar(apis: tuple[httpx.AsyncClient, httpx.AsyncClient], user: str, served: list[str]) -> None:
    fast_api, _ = apis
    owner, reader, stranger = auth(user), auth(user, scope="sessions:read"), auth(f"{user}-other")
    sid = (await fast_api.post("/sessions", json={}, headers=owner)).json()["session_id"]
    incr = {"action": "context.incr", "payload": {"key": "n"}}

    def get(headers: dict[str, str], session_id: str = sid) -> Call:
        return lambda api: api.get(f"/sessions/{session_id}", headers=headers)

    def act(headers: dict[str, str], json: Any = incr, session_id: str = sid, **kw: Any) -> Call:
        return lambda api: api.post(f"/sessions/{session_id}/request", json=json, headers=headers, **kw)

    ok = await _same(apis, get(owner))
    assert ok.status_code == 200 and ok.headers["etag"]
    assert (await _same(apis, get(reader))).status_code == 200
    for call, status in (
        (get(stranger), 404),
        (get({}), 401),
        (get({"Authorization": "Bearer nope"}), 401),
        (get(auth(user, scope="other:thing")), 403),
        (get(owner, "no-such-session"), 404),
        (get(owner, "bad.id"), 400),
    ):
        assert (await _same(apis, call)).status_code == status
    ran = await _same(apis, act(owner))
    assert ran.status_code == 200 and ran.headers["etag"] and ran.json()["action"] == "context.incr"
    for call, status in (
        (act(reader), 403),  # read-only token, changing action: the worker refuses it
        (act(stranger), 404),
        (act({}), 401),
        (act(owner, {"action": "Bad"}), 400),
        (act(owner, {"action": "session.get"}), 400),
        (act(owner, session_id="bad.id"), 400),
        (act({**owner, "Idempotency-Key": "\x7f"}), 400),
        (act(owner, {"action": "no.such.action"}), None),
    ):
        resp = await _same(apis, call)
        assert status is None or resp.status_code == status, resp.text
    # Every one of them was the fast path's (8 GETs, 9 POSTs; the 401s and the token without a
    # sessions scope stop before the route).
    assert served.count("authenticate_and_limit_request") == 8 + 9
    assert served.count("fetch_session") == 5 and served.count("run_session_action") == 8

    # Invalid bodies go to Litestar (its own 400/413, after authenticating as it always does).
    served.clear()
    for call, status in (
        (act(owner, {}), 400),
        (act(owner, {"action": "echo", "extra": 1}), 400),
        (act(owner, {"action": 5}), 400),
        (act(owner, None, content=b"{not json"), 400),
        (act(owner, None, content=b""), 400),
        (act({}, {}), 401),
        (act(owner, {"action": "echo", "payload": {"blob": "x" * (65 * 1024)}}), 413),
    ):
        assert (await _same(apis, call)).status_code == status
    assert served == []


async def test_idempotent_retry_through_the_fast_path(apis: tuple[httpx.AsyncClient, httpx.AsyncClient], headers: dict[str, str], served: list[str]) -> None:
    fast_api, _ = apis
    sid = (await fast_api.post("/sessions", json={}, headers=headers)).json()["session_id"]
    keyed = {**headers, "Idempotency-Key": "fast-path-retry-1", "Content-Type": "text/plain"}
    body = {"action": "context.incr", "payload": {"key": "n"}}
    first = await fast_api.post(f"/sessions/{sid}/request", json=body, headers=keyed)
    again = await fast_api.post(f"/sessions/{sid}/request", json=body, headers=keyed)
    assert first.status_code == again.status_code == 200
    assert first.json()["result"] == again.json()["result"]
    assert first.headers["x-content-type-options"] == "nosniff" and first.headers["x-request-id"]
    assert served == ["authenticate_and_limit_request", "run_session_action"] * 2
