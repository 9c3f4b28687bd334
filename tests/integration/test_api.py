"""The REST API as a client sees it: real gateway app -> NATS -> worker processes -> Redis.

Every test uses a fresh user (the ``user``/``headers`` fixtures) so tests never see each
other's sessions, and asserts the status, headers and body a client relies on.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import auth, token_for
from tests.support.cluster import TEST_JWT_SECRET, Cluster

PROBLEM = "application/problem+json"
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
ISO_UTC_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$")


# ---- helpers ---------------------------------------------------------------------------------


def assert_problem(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, f"{resp.status_code} {resp.text}"
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers.get("content-type")
    body = resp.json()
    assert PROBLEM_FIELDS <= body.keys(), body
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["type"], str) and body["type"]
    if code is not None:
        assert body["code"] == code, body
    return body


async def create(api: httpx.AsyncClient, headers: dict[str, str], metadata: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    resp = await api.post("/sessions", json={"metadata": metadata or {}}, headers=headers, **kw)
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


async def act(api: httpx.AsyncClient, headers: dict[str, str], sid: str, action: str, payload: Any = None) -> httpx.Response:
    body: dict[str, Any] = {"action": action}
    if payload is not None:
        body["payload"] = payload
    return await api.post(f"/sessions/{sid}/request", json=body, headers=headers)


async def list_all(api: httpx.AsyncClient, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    resp = await api.get("/sessions", params={"limit": 200, **params}, headers=headers)
    assert resp.status_code == 200, resp.text
    page = resp.json()
    assert page["next_cursor"] is None
    return page["items"]  # type: ignore[no-any-return]


def parse_utc(value: str) -> datetime:
    assert ISO_UTC_RE.match(value), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0)
    return parsed


@pytest.fixture
async def sid(api: httpx.AsyncClient, headers: dict[str, str]) -> str:
    """A session owned by the test's fresh user."""
    return (await create(api, headers))["session_id"]  # type: ignore[no-any-return]


# ---- 1. create -------------------------------------------------------------------------------


async def test_create_returns_the_new_session(api: httpx.AsyncClient, cluster: Cluster, user: str, headers: dict[str, str]) -> None:
    before = datetime.now(UTC)
    resp = await api.post("/sessions", json={"metadata": {"bot": "menu", "n": 3}}, headers=headers)
    after = datetime.now(UTC)
    assert resp.status_code == 201, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    sid = body["session_id"]
    assert SESSION_ID_RE.fullmatch(sid)
    assert resp.headers["location"] == f"/sessions/{sid}"
    assert body["user_id"] == user
    assert body["state"] == "active"
    assert body["version"] == 1
    assert body["context"] == {}
    created = parse_utc(body["created_at"])
    updated = parse_utc(body["last_updated"])
    expires = parse_utc(body["expires_at"])
    assert before - timedelta(seconds=5) <= created <= after + timedelta(seconds=5)
    assert updated == created
    assert abs((expires - created) - timedelta(seconds=cluster.settings.session_ttl)) < timedelta(seconds=1)
    assert body["metadata"]["bot"] == "menu"
    assert body["metadata"]["n"] == 3
    assert isinstance(body["metadata"]["ip_address"], str) and body["metadata"]["ip_address"]


async def test_create_sessions_get_distinct_ids(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    ids = {(await create(api, headers))["session_id"] for _ in range(5)}
    assert len(ids) == 5


async def test_client_version_header_lands_in_metadata(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    body = await create(api, {**headers, "X-Client-Version": "bot/2.3.1"}, {"bot": "x"})
    assert body["metadata"]["client_version"] == "bot/2.3.1"
    assert body["metadata"]["bot"] == "x"
    got = await api.get(f"/sessions/{body['session_id']}", headers=headers)
    assert got.json()["metadata"]["client_version"] == "bot/2.3.1"


async def test_create_without_any_body(api: httpx.AsyncClient, user: str, headers: dict[str, str]) -> None:
    resp = await api.post("/sessions", headers=headers)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["user_id"] == user
    assert body["state"] == "active"
    assert body["version"] == 1
    assert set(body["metadata"]) == {"ip_address"}
    assert resp.headers["location"] == f"/sessions/{body['session_id']}"


# ---- 2. get ----------------------------------------------------------------------------------


async def test_get_returns_session_with_etag(api: httpx.AsyncClient, user: str, headers: dict[str, str]) -> None:
    created = await create(api, headers, {"k": "v"})
    resp = await api.get(f"/sessions/{created['session_id']}", headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["etag"] == '"1"'
    assert resp.json() == created


# ---- 3. update -------------------------------------------------------------------------------


async def test_state_transitions_bump_version(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    idle = await api.put(f"/sessions/{sid}", json={"state": "idle"}, headers=headers)
    assert idle.status_code == 200, idle.text
    assert idle.json()["state"] == "idle"
    assert idle.json()["version"] == 2
    assert idle.headers["etag"] == '"2"'
    active = await api.put(f"/sessions/{sid}", json={"state": "active"}, headers=headers)
    assert active.status_code == 200, active.text
    assert active.json()["state"] == "active"
    assert active.json()["version"] == 3
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.json()["state"] == "active"
    assert got.headers["etag"] == '"3"'
    assert parse_utc(got.json()["last_updated"]) >= parse_utc(got.json()["created_at"])


async def test_if_match_guards_updates(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    ok = await api.put(f"/sessions/{sid}", json={"state": "idle"}, headers={**headers, "If-Match": '"1"'})
    assert ok.status_code == 200, ok.text
    assert ok.json()["version"] == 2
    stale = await api.put(f"/sessions/{sid}", json={"state": "active"}, headers={**headers, "If-Match": '"1"'})
    body = assert_problem(stale, 412, "version_mismatch")
    assert "2" in body["detail"]
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.json()["state"] == "idle"  # the rejected update changed nothing
    assert got.json()["version"] == 2
    weak = await api.put(f"/sessions/{sid}", json={"state": "active"}, headers={**headers, "If-Match": 'W/"2"'})
    assert weak.status_code == 200, weak.text
    assert weak.json()["version"] == 3


async def test_if_match_guards_delete(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    stale = await api.delete(f"/sessions/{sid}", headers={**headers, "If-Match": '"7"'})
    assert_problem(stale, 412, "version_mismatch")
    assert (await api.get(f"/sessions/{sid}", headers=headers)).status_code == 200
    ok = await api.delete(f"/sessions/{sid}", headers={**headers, "If-Match": '"1"'})
    assert ok.status_code == 204


async def test_unknown_state_names_the_allowed_states(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    resp = await api.put(f"/sessions/{sid}", json={"state": "sleeping"}, headers=headers)
    body = assert_problem(resp, 400)
    for state in ("active", "idle", "suspended"):
        assert state in body["detail"]
    assert (await api.get(f"/sessions/{sid}", headers=headers)).json()["version"] == 1


async def test_disallowed_transition_is_409(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    suspended = await api.put(f"/sessions/{sid}", json={"state": "suspended"}, headers=headers)
    assert suspended.status_code == 200, suspended.text
    resp = await api.put(f"/sessions/{sid}", json={"state": "idle"}, headers=headers)  # suspended -> idle
    body = assert_problem(resp, 409, "invalid_transition")
    assert "suspended" in body["detail"]
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.json()["state"] == "suspended"
    assert got.json()["version"] == 2
    resumed = await api.put(f"/sessions/{sid}", json={"state": "active"}, headers=headers)
    assert resumed.status_code == 200
    assert resumed.json()["state"] == "active"


async def test_metadata_merge_and_null_removes(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    sid = (await create(api, headers, {"a": 1, "b": "two", "c": [3]}))["session_id"]
    resp = await api.put(f"/sessions/{sid}", json={"metadata": {"b": None, "c": {"x": 1}, "d": True}}, headers=headers)
    assert resp.status_code == 200, resp.text
    meta = resp.json()["metadata"]
    assert meta["a"] == 1
    assert "b" not in meta
    assert meta["c"] == {"x": 1}
    assert meta["d"] is True
    assert "ip_address" in meta
    assert resp.json()["state"] == "active"
    assert resp.json()["version"] == 2
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.json()["metadata"] == meta


# ---- 4. delete -------------------------------------------------------------------------------


async def test_delete_removes_session(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    keep = (await create(api, headers))["session_id"]
    gone = (await create(api, headers))["session_id"]
    assert {s["session_id"] for s in await list_all(api, headers)} == {keep, gone}
    resp = await api.delete(f"/sessions/{gone}", headers=headers)
    assert resp.status_code == 204
    assert resp.content == b""
    assert_problem(await api.get(f"/sessions/{gone}", headers=headers), 404, "session_not_found")
    assert_problem(await api.delete(f"/sessions/{gone}", headers=headers), 404, "session_not_found")
    assert_problem(await act(api, headers, gone, "echo", {}), 404, "session_not_found")
    assert [s["session_id"] for s in await list_all(api, headers)] == [keep]


# ---- 5. actions ------------------------------------------------------------------------------


async def test_echo_returns_payload(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    payload = {"text": "héllo ✓", "n": [1, 2.5, None, True], "nested": {"a": {"b": "c"}}}
    resp = await act(api, headers, sid, "echo", payload)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["result"] == payload
    assert body["action"] == "echo"
    assert body["version"] == 1  # reading does not change the session
    assert isinstance(body["request_id"], str) and body["request_id"]


async def test_context_set_and_get(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    first = await act(api, headers, sid, "context.set", {"lang": "en", "step": 1})
    assert first.status_code == 200, first.text
    assert first.json()["result"] == {"keys": ["lang", "step"]}
    assert first.json()["version"] == 2
    second = await act(api, headers, sid, "context.set", {"step": 2, "cart": {"items": ["a"]}})
    assert second.status_code == 200, second.text
    assert second.json()["version"] == 3
    everything = await act(api, headers, sid, "context.get", {})
    assert everything.status_code == 200, everything.text
    assert everything.json()["result"] == {"lang": "en", "step": 2, "cart": {"items": ["a"]}}
    assert everything.json()["version"] == 3
    selected = await act(api, headers, sid, "context.get", {"keys": ["lang", "missing"]})
    assert selected.json()["result"] == {"lang": "en"}
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.json()["context"] == {"lang": "en", "step": 2, "cart": {"items": ["a"]}}
    assert got.headers["etag"] == '"3"'


async def test_context_incr(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    one = await act(api, headers, sid, "context.incr", {"key": "hits"})
    assert one.status_code == 200, one.text
    assert one.json()["result"] == {"key": "hits", "value": 1}
    assert one.json()["version"] == 2
    five = await act(api, headers, sid, "context.incr", {"key": "hits", "by": 4})
    assert five.json()["result"] == {"key": "hits", "value": 5}
    assert five.json()["version"] == 3
    down = await act(api, headers, sid, "context.incr", {"key": "hits", "by": -7})
    assert down.json()["result"] == {"key": "hits", "value": -2}
    assert down.json()["version"] == 4
    got = await act(api, headers, sid, "context.get", {"keys": ["hits"]})
    assert got.json()["result"] == {"hits": -2}


async def test_context_incr_on_non_integer_is_rejected(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    await act(api, headers, sid, "context.set", {"name": "bob"})
    resp = await act(api, headers, sid, "context.incr", {"key": "name"})
    assert_problem(resp, 400)
    assert (await api.get(f"/sessions/{sid}", headers=headers)).json()["version"] == 2


async def test_unknown_action_is_422(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    resp = await act(api, headers, sid, "context.frobnicate", {})
    body = assert_problem(resp, 422, "unknown_action")
    assert "context.incr" in body["detail"]  # names the known actions


@pytest.mark.parametrize("action", ["a b", "session.get", "session.delete", "Echo", "echo.", ".echo", "a..b", "", "x" * 40, "echo>", "echo*", "sm.shard.0"])
async def test_invalid_action_name_is_400(api: httpx.AsyncClient, headers: dict[str, str], sid: str, action: str) -> None:
    resp = await act(api, headers, sid, action, {})
    assert_problem(resp, 400)
    assert (await api.get(f"/sessions/{sid}", headers=headers)).json()["version"] == 1


# ---- 6. errors -------------------------------------------------------------------------------


async def test_missing_token_is_401_with_challenge(api: httpx.AsyncClient, sid: str) -> None:
    for resp in (
        await api.get("/sessions"),
        await api.get(f"/sessions/{sid}"),
        await api.post("/sessions", json={}),
        await api.delete(f"/sessions/{sid}"),
    ):
        assert_problem(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"].lower().startswith("bearer")


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Bearer not-a-jwt", id="garbage"),
        pytest.param("Bearer " + token_for("someone", secret="another-secret-0123456789abcdef-xyz"), id="other-secret"),
        pytest.param("Bearer " + token_for("someone", ttl_s=-120), id="expired"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
        pytest.param("Bearer", id="no-token"),
        pytest.param("Bearer " + jwt.encode({"sub": "x", "exp": 9999999999}, None, algorithm="none"), id="alg-none"),
        pytest.param("Bearer " + jwt.encode({"sub": "x"}, TEST_JWT_SECRET, algorithm="HS256"), id="no-exp"),
        pytest.param("Bearer " + "a" * 9000, id="huge"),
    ],
)
async def test_bad_tokens_are_401(api: httpx.AsyncClient, sid: str, authorization: str) -> None:
    resp = await api.get(f"/sessions/{sid}", headers={"Authorization": authorization})
    assert_problem(resp, 401, "unauthorized")
    assert "www-authenticate" in resp.headers


async def test_other_users_session_looks_like_unknown(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    intruder = auth(f"intruder-{uuid.uuid4().hex[:8]}")
    theirs = assert_problem(await api.get(f"/sessions/{sid}", headers=intruder), 404, "session_not_found")
    unknown_id = "doesNotExist_" + uuid.uuid4().hex[:10]
    unknown = assert_problem(await api.get(f"/sessions/{unknown_id}", headers=intruder), 404, "session_not_found")
    assert theirs.keys() == unknown.keys()
    for field in ("type", "title", "status", "code"):
        assert theirs[field] == unknown[field]
    assert theirs["detail"].replace(sid, "X") == unknown["detail"].replace(unknown_id, "X")
    # Writing is refused the same way, and changes nothing.
    assert_problem(await api.put(f"/sessions/{sid}", json={"state": "idle"}, headers=intruder), 404, "session_not_found")
    assert_problem(await api.delete(f"/sessions/{sid}", headers=intruder), 404, "session_not_found")
    assert_problem(await act(api, intruder, sid, "context.incr", {"key": "k"}), 404, "session_not_found")
    assert_problem(await act(api, intruder, sid, "context.get", {}), 404, "session_not_found")
    owner_view = await api.get(f"/sessions/{sid}", headers=headers)
    assert owner_view.status_code == 200
    assert owner_view.json()["version"] == 1
    assert owner_view.json()["state"] == "active"


async def test_malformed_json_is_400(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    json_headers = {**headers, "Content-Type": "application/json"}
    assert_problem(await api.post("/sessions", content=b'{"metadata": {', headers=json_headers), 400)
    assert_problem(await api.put(f"/sessions/{sid}", content=b"{state: idle}", headers=json_headers), 400)
    assert_problem(await api.post(f"/sessions/{sid}/request", content=b'{"action": "echo",}', headers=json_headers), 400)
    assert (await api.get(f"/sessions/{sid}", headers=headers)).json()["version"] == 1


async def test_wrong_types_are_400(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    assert_problem(await api.post("/sessions", json={"metadata": ["a", "b"]}, headers=headers), 400)
    assert_problem(await api.put(f"/sessions/{sid}", json={"metadata": "x"}, headers=headers), 400)
    assert_problem(await api.put(f"/sessions/{sid}", json={"state": 3}, headers=headers), 400)
    assert_problem(await api.post(f"/sessions/{sid}/request", json={"action": 5}, headers=headers), 400)
    assert_problem(await api.post(f"/sessions/{sid}/request", json={"action": "echo", "payload": [1]}, headers=headers), 400)
    assert_problem(await act(api, headers, sid, "context.incr", {"key": "k", "by": "1"}), 400)
    assert_problem(await act(api, headers, sid, "context.get", {"keys": "lang"}), 400)


async def test_unknown_fields_are_400(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    assert_problem(await api.put(f"/sessions/{sid}", json={"state": "idle", "colour": "red"}, headers=headers), 400)
    assert_problem(await api.put(f"/sessions/{sid}", json={"expected_version": 1}, headers=headers), 400)
    assert_problem(await api.post("/sessions", json={"user_id": "someone-else"}, headers=headers), 400)
    assert_problem(await api.post(f"/sessions/{sid}/request", json={"action": "echo", "extra": 1}, headers=headers), 400)
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.json()["state"] == "active"
    assert got.json()["version"] == 1


async def test_body_over_64_kib_is_413(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    big = "x" * (65 * 1024)
    assert_problem(await api.post("/sessions", json={"metadata": {"blob": big}}, headers=headers), 413)
    assert_problem(await api.put(f"/sessions/{sid}", json={"metadata": {"blob": big}}, headers=headers), 413)
    assert_problem(await act(api, headers, sid, "echo", {"blob": big}), 413)
    assert [s["session_id"] for s in await list_all(api, headers)] == [sid]


INVALID_IDS = [
    pytest.param("a.b", id="dot"),
    pytest.param("*", id="star"),
    pytest.param(">", id="gt"),
    pytest.param("%2E", id="pct-dot"),
    pytest.param("a%2Eb", id="pct-dot-inner"),
    pytest.param("%2A", id="pct-star"),
    pytest.param("a%20b", id="space"),
    pytest.param("a%00b", id="nul"),
    pytest.param("abc%0A", id="trailing-newline"),
    pytest.param("\u0455ession", id="cyrillic-lookalike"),
    pytest.param("ab\u200bcd", id="zero-width"),
    pytest.param("%FF%FE", id="bad-utf8"),
    pytest.param("x" * 65, id="65-chars"),
]


@pytest.mark.parametrize("bad_id", INVALID_IDS)
async def test_invalid_session_id_in_path_is_400(api: httpx.AsyncClient, headers: dict[str, str], bad_id: str) -> None:
    assert_problem(await api.get(f"/sessions/{bad_id}", headers=headers), 400)
    assert_problem(await api.put(f"/sessions/{bad_id}", json={"state": "idle"}, headers=headers), 400)
    assert_problem(await api.delete(f"/sessions/{bad_id}", headers=headers), 400)
    assert_problem(await act(api, headers, bad_id, "echo", {}), 400)


async def test_64_char_session_id_is_valid(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    assert_problem(await api.get(f"/sessions/{'x' * 64}", headers=headers), 404, "session_not_found")




def _nasty_cases() -> list[Any]:
    deep = "[" * 5000 + "]" * 5000
    many_keys = {f"k{i}": i for i in range(40)}
    huge_ctx = {f"k{i}": "v" * 4000 for i in range(12)}
    J = {"Content-Type": "application/json"}
    cases: list[tuple[str, str, str, dict[str, Any]]] = [
        # (id, method, path, httpx kwargs); "{sid}" is the caller's own session
        ("post-array-body", "POST", "/sessions", {"json": []}),
        ("post-null-body", "POST", "/sessions", {"content": b"null", "headers": J}),
        ("post-string-body", "POST", "/sessions", {"json": "hello"}),
        ("post-metadata-null", "POST", "/sessions", {"json": {"metadata": None}}),
        ("post-lone-surrogate", "POST", "/sessions", {"content": b'{"metadata": {"k": "\\ud800"}}', "headers": J}),
        ("post-nul-in-value", "POST", "/sessions", {"json": {"metadata": {"k": "a\u0000b"}}}),
        ("post-bad-key", "POST", "/sessions", {"json": {"metadata": {"bad key": 1}}}),
        ("post-empty-key", "POST", "/sessions", {"json": {"metadata": {"": 1}}}),
        ("post-nul-key", "POST", "/sessions", {"json": {"metadata": {"a\u0000": 1}}}),
        ("post-deep-nesting", "POST", "/sessions", {"content": ('{"metadata": {"a": ' + deep + "}}").encode(), "headers": J}),
        ("post-nesting-9", "POST", "/sessions", {"content": b'{"metadata": {"a": [[[[[[[[[1]]]]]]]]]}}', "headers": J}),
        ("post-too-many-keys", "POST", "/sessions", {"json": {"metadata": many_keys}}),
        ("post-long-string", "POST", "/sessions", {"json": {"metadata": {"k": "x" * 5000}}}),
        ("post-huge-number", "POST", "/sessions", {"content": b'{"metadata": {"k": 1e400}}', "headers": J}),
        ("post-bigint", "POST", "/sessions", {"content": b'{"metadata": {"k": 123456789012345678901234567890}}', "headers": J}),
        ("post-nan", "POST", "/sessions", {"content": b'{"metadata": {"k": NaN}}', "headers": J}),
        ("post-dup-keys", "POST", "/sessions", {"content": b'{"metadata": {}, "metadata": {"a": 1}}', "headers": J}),
        ("post-text-plain", "POST", "/sessions", {"content": b'{"metadata": {}}', "headers": {"Content-Type": "text/plain"}}),
        ("post-xml", "POST", "/sessions", {"content": b"<a/>", "headers": {"Content-Type": "application/xml"}}),
        ("post-gzip-garbage", "POST", "/sessions", {"content": b"\x1f\x8bnotgzip", "headers": {**J, "Content-Encoding": "gzip"}}),
        ("post-binary", "POST", "/sessions", {"content": bytes(range(256)), "headers": J}),
        ("post-long-client-version", "POST", "/sessions", {"json": {}, "headers": {"X-Client-Version": "v" * 10000}}),
        ("post-latin1-client-version", "POST", "/sessions", {"json": {}, "headers": {"X-Client-Version": "caf\xe9".encode("latin-1")}}),
        ("post-idem-space", "POST", "/sessions", {"json": {}, "headers": {"Idempotency-Key": "a b"}}),
        ("post-idem-long", "POST", "/sessions", {"json": {}, "headers": {"Idempotency-Key": "k" * 129}}),
        ("post-idem-latin1", "POST", "/sessions", {"json": {}, "headers": {"Idempotency-Key": "caf\xe9".encode("latin-1")}}),
        ("post-idem-wild", "POST", "/sessions", {"json": {}, "headers": {"Idempotency-Key": "*>.:{}$"}}),
        ("put-empty-object", "PUT", "/sessions/{sid}", {"json": {}}),
        ("put-no-body", "PUT", "/sessions/{sid}", {}),
        ("put-state-null", "PUT", "/sessions/{sid}", {"json": {"state": None}}),
        ("put-state-empty", "PUT", "/sessions/{sid}", {"json": {"state": ""}}),
        ("put-state-huge", "PUT", "/sessions/{sid}", {"json": {"state": "s" * 50000}}),
        ("put-metadata-null", "PUT", "/sessions/{sid}", {"json": {"metadata": None}}),
        ("put-if-match-text", "PUT", "/sessions/{sid}", {"json": {"state": "idle"}, "headers": {"If-Match": "abc"}}),
        ("put-if-match-neg", "PUT", "/sessions/{sid}", {"json": {"state": "idle"}, "headers": {"If-Match": '"-1"'}}),
        ("put-if-match-huge", "PUT", "/sessions/{sid}", {"json": {"state": "idle"}, "headers": {"If-Match": '"99999999999999999999999"'}}),
        ("put-if-match-18-digits", "PUT", "/sessions/{sid}", {"json": {"state": "idle"}, "headers": {"If-Match": '"999999999999999999"'}}),
        ("put-if-match-list", "PUT", "/sessions/{sid}", {"json": {"state": "idle"}, "headers": {"If-Match": '"1", "2"'}}),
        ("put-if-match-star", "PUT", "/sessions/{sid}", {"json": {"state": "idle"}, "headers": {"If-Match": "*"}}),
        ("put-if-match-empty", "PUT", "/sessions/{sid}", {"json": {"state": "idle"}, "headers": {"If-Match": ""}}),
        ("delete-if-match-text", "DELETE", "/sessions/{sid}", {"headers": {"If-Match": "nope"}}),
        ("patch", "PATCH", "/sessions/{sid}", {"json": {"state": "idle"}}),
        ("post-on-session", "POST", "/sessions/{sid}", {"json": {}}),
        ("put-collection", "PUT", "/sessions", {"json": {}}),
        ("extra-path", "GET", "/sessions/{sid}/request/extra", {}),
        ("slash-in-id", "GET", "/sessions/a%2Fb", {}),
        ("dotdot", "GET", "/sessions/%2E%2E", {}),
        ("very-long-path", "GET", "/sessions/" + "a" * 20000, {}),
        ("action-missing", "POST", "/sessions/{sid}/request", {"json": {}}),
        ("action-null", "POST", "/sessions/{sid}/request", {"json": {"action": None}}),
        ("action-long", "POST", "/sessions/{sid}/request", {"json": {"action": "a" * 5000}}),
        ("action-unicode", "POST", "/sessions/{sid}/request", {"json": {"action": "\u00e9cho"}}),
        ("action-payload-null", "POST", "/sessions/{sid}/request", {"json": {"action": "echo", "payload": None}}),
        ("set-empty", "POST", "/sessions/{sid}/request", {"json": {"action": "context.set", "payload": {}}}),
        ("set-bad-key", "POST", "/sessions/{sid}/request", {"json": {"action": "context.set", "payload": {"a b": 1}}}),
        ("set-too-big", "POST", "/sessions/{sid}/request", {"json": {"action": "context.set", "payload": huge_ctx}}),
        ("set-deep", "POST", "/sessions/{sid}/request", {"content": ('{"action": "context.set", "payload": {"a": ' + deep + "}}").encode(), "headers": J}),
        ("set-bigint", "POST", "/sessions/{sid}/request", {"content": b'{"action": "context.set", "payload": {"a": 123456789012345678901234567890}}', "headers": J}),
        ("incr-missing-key", "POST", "/sessions/{sid}/request", {"json": {"action": "context.incr", "payload": {}}}),
        ("incr-float", "POST", "/sessions/{sid}/request", {"json": {"action": "context.incr", "payload": {"key": "k", "by": 1.5}}}),
        ("incr-bool", "POST", "/sessions/{sid}/request", {"json": {"action": "context.incr", "payload": {"key": "k", "by": True}}}),
        ("incr-overflow", "POST", "/sessions/{sid}/request", {"json": {"action": "context.incr", "payload": {"key": "k", "by": 2**63}}}),
        ("incr-bigint", "POST", "/sessions/{sid}/request", {"content": b'{"action": "context.incr", "payload": {"key": "k", "by": 123456789012345678901234567890}}', "headers": J}),
        ("incr-bad-key", "POST", "/sessions/{sid}/request", {"json": {"action": "context.incr", "payload": {"key": "a b"}}}),
        ("incr-extra", "POST", "/sessions/{sid}/request", {"json": {"action": "context.incr", "payload": {"key": "k", "step": 2}}}),
        ("get-keys-ints", "POST", "/sessions/{sid}/request", {"json": {"action": "context.get", "payload": {"keys": [1, 2]}}}),
        ("get-keys-null", "POST", "/sessions/{sid}/request", {"json": {"action": "context.get", "payload": {"keys": None}}}),
        ("list-limit-neg", "GET", "/sessions?limit=-1", {}),
        ("list-limit-text", "GET", "/sessions?limit=abc", {}),
        ("list-limit-huge", "GET", "/sessions?limit=99999999999999999999999999", {}),
        ("list-limit-float", "GET", "/sessions?limit=1.5", {}),
        ("list-cursor-long", "GET", "/sessions?cursor=" + "x" * 300, {}),
        ("list-cursor-bad-b64", "GET", "/sessions?cursor=a", {}),
        ("list-cursor-junk", "GET", "/sessions?cursor=%00%FF", {}),
        ("list-user-long", "GET", "/sessions?user_id=" + "u" * 300, {}),
        ("list-repeated-limit", "GET", "/sessions?limit=1&limit=2", {}),
        ("unknown-route", "GET", "/nope", {}),
    ]
    return [
        pytest.param(method, path, kwargs, id=case_id)
        for case_id, method, path, kwargs in cases
    ]


@pytest.mark.parametrize(("method", "path", "kwargs"), _nasty_cases())
async def test_no_input_produces_a_5xx(
    api: httpx.AsyncClient, headers: dict[str, str], sid: str, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    kwargs = {**kwargs, "headers": {**headers, **kwargs.get("headers", {})}}
    resp = await api.request(method, path.replace("{sid}", sid), **kwargs)
    assert resp.status_code < 500, f"{resp.status_code} {resp.text}"
    if resp.status_code >= 400:
        assert_problem(resp, resp.status_code)
    # The session still answers afterwards (nothing wedged the shard).
    assert (await api.get(f"/sessions/{sid}", headers=headers)).status_code in (200, 404)


@pytest.mark.parametrize(
    "sub",
    [
        pytest.param("ünïcødé-用户", id="unicode"),
        pytest.param("a:b{c}*>.$", id="punctuation"),
        pytest.param("u" * 128, id="128-chars"),
    ],
)
async def test_unusual_user_ids_own_their_sessions(api: httpx.AsyncClient, sub: str) -> None:
    sub = f"{sub}-{uuid.uuid4().hex[:6]}" if len(sub) < 120 else sub[:-6] + uuid.uuid4().hex[:6]
    headers = auth(sub)
    created = await api.post("/sessions", json={}, headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["user_id"] == sub
    sid = created.json()["session_id"]
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.status_code == 200, got.text
    assert got.json()["user_id"] == sub
    assert [s["session_id"] for s in await list_all(api, headers)] == [sid]


@pytest.mark.parametrize("padded", [" {base} ", "{base} ", "{base}\t", "a {base}"])
async def test_token_subjects_with_whitespace_are_refused(api: httpx.AsyncClient, padded: str) -> None:
    # User IDs travel in NATS headers, which trim whitespace: " alice " must never act as "alice".
    base = f"ws-{uuid.uuid4().hex[:8]}"
    sid = (await create(api, auth(base)))["session_id"]
    evil = auth(padded.format(base=base))
    assert_problem(await api.get(f"/sessions/{sid}", headers=evil), 401)
    assert_problem(await api.post("/sessions", json={}, headers=evil), 401)


# ---- 7. scopes -------------------------------------------------------------------------------


async def test_read_scope_can_read_but_not_write(api: httpx.AsyncClient, user: str, headers: dict[str, str]) -> None:
    sid = (await create(api, headers, {"k": "v"}))["session_id"]
    await act(api, headers, sid, "context.set", {"lang": "en"})
    reader = auth(user, scope="sessions:read")
    got = await api.get(f"/sessions/{sid}", headers=reader)
    assert got.status_code == 200, got.text
    assert got.json()["metadata"]["k"] == "v"
    assert [s["session_id"] for s in await list_all(api, reader)] == [sid]
    ctx = await act(api, reader, sid, "context.get", {})
    assert ctx.status_code == 200, ctx.text
    assert ctx.json()["result"] == {"lang": "en"}
    assert (await act(api, reader, sid, "echo", {"a": 1})).status_code == 200

    assert_problem(await api.post("/sessions", json={}, headers=reader), 403, "forbidden")
    assert_problem(await api.put(f"/sessions/{sid}", json={"state": "idle"}, headers=reader), 403, "forbidden")
    assert_problem(await api.delete(f"/sessions/{sid}", headers=reader), 403, "forbidden")
    assert_problem(await act(api, reader, sid, "context.incr", {"key": "n"}), 403, "forbidden")
    assert_problem(await act(api, reader, sid, "context.set", {"lang": "fr"}), 403, "forbidden")

    after = await api.get(f"/sessions/{sid}", headers=headers)
    assert after.json()["version"] == 2
    assert after.json()["state"] == "active"
    assert after.json()["context"] == {"lang": "en"}
    assert [s["session_id"] for s in await list_all(api, headers)] == [sid]


async def test_write_scope_can_write(api: httpx.AsyncClient, user: str) -> None:
    writer = auth(user, scope="sessions:read sessions:write")
    sid = (await create(api, writer))["session_id"]
    assert (await act(api, writer, sid, "context.incr", {"key": "n"})).json()["result"]["value"] == 1
    assert (await api.delete(f"/sessions/{sid}", headers=writer)).status_code == 204


async def test_admin_scope_reads_and_lists_other_users(api: httpx.AsyncClient, user: str, headers: dict[str, str]) -> None:
    sid = (await create(api, headers))["session_id"]
    admin = auth(f"admin-{uuid.uuid4().hex[:8]}", scope="sessions:admin")
    got = await api.get(f"/sessions/{sid}", headers=admin)
    assert got.status_code == 200, got.text
    assert got.json()["user_id"] == user
    listed = await api.get("/sessions", params={"user_id": user}, headers=admin)
    assert listed.status_code == 200, listed.text
    assert [s["session_id"] for s in listed.json()["items"]] == [sid]
    own = await api.get("/sessions", headers=admin)
    assert own.status_code == 200
    assert own.json()["items"] == []  # without user_id an admin lists their own


async def test_normal_user_cannot_list_another_user(api: httpx.AsyncClient, user: str, headers: dict[str, str]) -> None:
    await create(api, headers)
    other = auth(f"other-{uuid.uuid4().hex[:8]}")
    assert_problem(await api.get("/sessions", params={"user_id": user}, headers=other), 403, "forbidden")
    reader = auth(f"other-{uuid.uuid4().hex[:8]}", scope="sessions:read")
    assert_problem(await api.get("/sessions", params={"user_id": user}, headers=reader), 403, "forbidden")
    self_listing = await api.get("/sessions", params={"user_id": user}, headers=headers)
    assert self_listing.status_code == 200
    assert len(self_listing.json()["items"]) == 1


# ---- 8. pagination ---------------------------------------------------------------------------


async def test_pagination_walks_every_session_once(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    created = [(await create(api, headers, {"i": i}))["session_id"] for i in range(5)]
    stranger = auth(f"stranger-{uuid.uuid4().hex[:8]}")
    strangers = {(await create(api, stranger))["session_id"] for _ in range(2)}

    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        resp = await api.get("/sessions", params=params, headers=headers)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert len(page["items"]) <= 2
        seen.extend(s["session_id"] for s in page["items"])
        pages += 1
        assert pages <= 5, "pagination did not terminate"
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["items"]) == 2
    assert len(seen) == len(set(seen)) == 5
    assert set(seen) == set(created)
    assert not strangers & set(seen)
    assert pages == 3


async def test_invalid_cursor_is_400(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    await create(api, headers)
    assert_problem(await api.get("/sessions", params={"cursor": "a"}, headers=headers), 400)
    assert_problem(await api.get("/sessions", params={"cursor": "x" * 257}, headers=headers), 400)


@pytest.mark.parametrize("cursor", ["!!!!", "not-a-cursor"])
async def test_junk_cursor_is_400(api: httpx.AsyncClient, headers: dict[str, str], cursor: str) -> None:
    await create(api, headers)
    assert_problem(await api.get("/sessions", params={"cursor": cursor}, headers=headers), 400)


@pytest.mark.parametrize("limit", ["0", "201", "-5", "ten"])
async def test_invalid_limit_is_400(api: httpx.AsyncClient, headers: dict[str, str], limit: str) -> None:
    assert_problem(await api.get("/sessions", params={"limit": limit}, headers=headers), 400)


async def test_limit_bounds_are_inclusive(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    sid = (await create(api, headers))["session_id"]
    for limit in (1, 200):
        resp = await api.get("/sessions", params={"limit": limit}, headers=headers)
        assert resp.status_code == 200, resp.text
        assert [s["session_id"] for s in resp.json()["items"]] == [sid]
        assert resp.json()["next_cursor"] is None


# ---- 9. idempotency --------------------------------------------------------------------------


async def test_create_with_idempotency_key_creates_once(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    key = f"create-{uuid.uuid4()}"
    first = await api.post("/sessions", json={"metadata": {"a": 1}}, headers={**headers, "Idempotency-Key": key})
    second = await api.post("/sessions", json={"metadata": {"a": 1}}, headers={**headers, "Idempotency-Key": key})
    assert first.status_code == 201, first.text
    assert second.status_code == 201, second.text
    assert second.json()["session_id"] == first.json()["session_id"]
    assert second.json() == first.json()
    assert second.headers["location"] == first.headers["location"]
    listed = await list_all(api, headers)
    assert [s["session_id"] for s in listed] == [first.json()["session_id"]]
    different = await api.post("/sessions", json={"metadata": {"a": 2}}, headers={**headers, "Idempotency-Key": key})
    assert_problem(different, 422, "idempotency_conflict")
    assert len(await list_all(api, headers)) == 1


async def test_idempotency_keys_are_per_user(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    key = f"shared-{uuid.uuid4()}"
    mine = await api.post("/sessions", json={}, headers={**headers, "Idempotency-Key": key})
    other_headers = auth(f"other-{uuid.uuid4().hex[:8]}")
    theirs = await api.post("/sessions", json={}, headers={**other_headers, "Idempotency-Key": key})
    assert mine.status_code == theirs.status_code == 201, (mine.text, theirs.text)
    assert mine.json()["session_id"] != theirs.json()["session_id"]
    assert theirs.json()["user_id"] != mine.json()["user_id"]


async def test_incr_with_idempotency_key_applies_once(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    keyed = {**headers, "Idempotency-Key": f"incr-{uuid.uuid4()}"}
    body = {"action": "context.incr", "payload": {"key": "n", "by": 5}}
    first = await api.post(f"/sessions/{sid}/request", json=body, headers=keyed)
    second = await api.post(f"/sessions/{sid}/request", json=body, headers=keyed)
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    assert first.json()["result"] == second.json()["result"] == {"key": "n", "value": 5}
    assert first.json()["version"] == second.json()["version"] == 2
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.json()["context"] == {"n": 5}
    assert got.json()["version"] == 2
    conflict = await api.post(f"/sessions/{sid}/request", json={"action": "context.incr", "payload": {"key": "n", "by": 6}}, headers=keyed)
    assert_problem(conflict, 422, "idempotency_conflict")
    other_action = await api.post(f"/sessions/{sid}/request", json={"action": "context.set", "payload": {"n": 1}}, headers=keyed)
    assert_problem(other_action, 422, "idempotency_conflict")
    assert (await api.get(f"/sessions/{sid}", headers=headers)).json()["context"] == {"n": 5}
    # A fresh key applies again.
    again = await api.post(f"/sessions/{sid}/request", json=body, headers={**headers, "Idempotency-Key": f"incr-{uuid.uuid4()}"})
    assert again.json()["result"]["value"] == 10


async def test_requests_without_key_each_apply(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    for expected in (1, 2, 3):
        resp = await act(api, headers, sid, "context.incr", {"key": "n"})
        assert resp.json()["result"]["value"] == expected


# ---- 10. health and schema -------------------------------------------------------------------


async def test_health_endpoints(api: httpx.AsyncClient) -> None:
    health = await api.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = await api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready"}


async def test_openapi_schema_lists_session_paths(api: httpx.AsyncClient) -> None:
    resp = await api.get("/schema/openapi.json")
    assert resp.status_code == 200, resp.text
    schema = resp.json()
    paths = schema["paths"]
    assert "/sessions" in paths
    assert {"get", "post"} <= set(paths["/sessions"])
    assert {"get", "put", "delete"} <= set(paths["/sessions/{session_id}"])
    assert "post" in paths["/sessions/{session_id}/request"]
    assert "bearer" in schema["components"]["securitySchemes"]


# ---- 11. security headers --------------------------------------------------------------------

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _assert_security_headers(responses: dict[str, httpx.Response]) -> None:
    for name, resp in responses.items():
        assert resp.status_code < 500, (name, resp.text)
        for header, value in SECURITY_HEADERS.items():
            assert resp.headers.get(header) == value, f"{name} ({resp.status_code}): {header}={resp.headers.get(header)!r}"


async def test_security_headers_on_successful_responses(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    doomed = (await create(api, headers))["session_id"]
    _assert_security_headers(
        {
            "get": await api.get(f"/sessions/{sid}", headers=headers),
            "list": await api.get("/sessions", headers=headers),
            "create": await api.post("/sessions", json={}, headers=headers),
            "update": await api.put(f"/sessions/{sid}", json={"metadata": {"a": 1}}, headers=headers),
            "action": await act(api, headers, sid, "echo", {}),
            "delete": await api.delete(f"/sessions/{doomed}", headers=headers),
            "healthz": await api.get("/healthz"),
            "readyz": await api.get("/readyz"),
        }
    )


async def test_security_headers_on_error_responses(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    _assert_security_headers(
        {
            "401": await api.get(f"/sessions/{sid}"),
            "404": await api.get("/sessions/unknown-session", headers=headers),
            "400": await api.get("/sessions/a.b", headers=headers),
            "403": await api.get("/sessions", params={"user_id": "someone-else"}, headers=headers),
            "405": await api.patch(f"/sessions/{sid}", headers=headers),
            "413": await api.post("/sessions", content=b"x" * (65 * 1024), headers=headers),
        }
    )


async def test_token_with_only_unrelated_scopes_cannot_touch_sessions(api: httpx.AsyncClient, user: str) -> None:
    sid = (await create(api, auth(user)))["session_id"]
    unrelated = auth(user, scope="openid profile")
    assert_problem(await api.get(f"/sessions/{sid}", headers=unrelated), 403)
    assert_problem(await api.get("/sessions", headers=unrelated), 403)
    assert_problem(await api.post("/sessions", json={}, headers=unrelated), 403)
