"""Authorization beyond the basics in test_api.py: what each scope may do to whose sessions, and
that a client cannot talk its way into another identity through headers or odd scope claims."""

from __future__ import annotations

import time
import uuid

import httpx
import jwt
import pytest

from tests.conftest import auth
from tests.integration.test_api import act, assert_problem, create
from tests.support.cluster import TEST_JWT_SECRET


def bearer_with(claims: dict[str, object]) -> dict[str, str]:
    now = int(time.time())
    return {"Authorization": "Bearer " + jwt.encode({"iat": now, "exp": now + 600, **claims}, TEST_JWT_SECRET, algorithm="HS256")}


async def test_admin_may_change_and_delete_another_users_session(api: httpx.AsyncClient, user: str, headers: dict[str, str]) -> None:
    sid = (await create(api, headers))["session_id"]
    admin = auth(f"admin-{uuid.uuid4().hex[:8]}", scope="sessions:admin")
    changed = await api.put(f"/sessions/{sid}", json={"state": "suspended"}, headers=admin)
    assert changed.status_code == 200, changed.text
    assert changed.json()["user_id"] == user  # still the owner's
    assert (await act(api, admin, sid, "context.incr", {"key": "n"})).status_code == 200
    assert (await api.delete(f"/sessions/{sid}", headers=admin)).status_code == 204
    assert_problem(await api.get(f"/sessions/{sid}", headers=headers), 404, "session_not_found")


async def test_write_scope_is_confined_to_own_sessions(api: httpx.AsyncClient, user: str, headers: dict[str, str]) -> None:
    sid = (await create(api, headers))["session_id"]
    writer = auth(f"writer-{uuid.uuid4().hex[:8]}", scope="sessions:write")
    assert_problem(await api.get(f"/sessions/{sid}", headers=writer), 404, "session_not_found")
    assert_problem(await api.put(f"/sessions/{sid}", json={"state": "idle"}, headers=writer), 404, "session_not_found")
    assert_problem(await api.get("/sessions", params={"user_id": user}, headers=writer), 403, "forbidden")
    assert (await api.get(f"/sessions/{sid}", headers=headers)).json()["version"] == 1


async def test_read_scope_runs_read_only_actions(api: httpx.AsyncClient, user: str, headers: dict[str, str]) -> None:
    sid = (await create(api, headers))["session_id"]
    reader = auth(user, scope="sessions:read")
    echoed = await act(api, reader, sid, "echo", {"a": 1})
    assert echoed.status_code == 200 and echoed.json()["result"] == {"a": 1}
    assert (await act(api, reader, sid, "context.get", {})).status_code == 200
    assert_problem(await act(api, reader, sid, "context.incr", {"key": "n"}), 403, "forbidden")


async def test_identity_headers_from_the_client_are_ignored(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    sid = (await create(api, headers))["session_id"]
    victim_owner_headers = headers
    mallory = {**auth(f"mallory-{uuid.uuid4().hex[:8]}"), "Sm-Admin": "1", "Sm-User": "anyone", "Sm-Read-Only": "0", "X-Forwarded-User": "admin"}
    assert_problem(await api.get(f"/sessions/{sid}", headers=mallory), 404, "session_not_found")
    assert_problem(await api.delete(f"/sessions/{sid}", headers=mallory), 404, "session_not_found")
    assert (await api.get(f"/sessions/{sid}", headers=victim_owner_headers)).status_code == 200


@pytest.mark.parametrize(
    ("scope", "can_write"),
    [
        (["sessions:read"], False),
        (["sessions:write"], True),
        ("sessions:read openid", False),
        ("openid sessions:write", True),
    ],
)
async def test_scope_as_string_or_list(api: httpx.AsyncClient, scope: object, can_write: bool) -> None:
    user = f"scoped-{uuid.uuid4().hex[:8]}"
    created = await api.post("/sessions", json={}, headers=bearer_with({"sub": user, "scope": scope}))
    assert created.status_code == (201 if can_write else 403), created.text
    assert (await api.get("/sessions", headers=bearer_with({"sub": user, "scope": scope}))).status_code == 200


@pytest.mark.parametrize("scope", [{"sessions": "admin"}, 42, ["sessions:admin", 7], True])
async def test_unreadable_scope_claims_are_401_not_full_rights(api: httpx.AsyncClient, scope: object) -> None:
    resp = await api.post("/sessions", json={}, headers=bearer_with({"sub": f"odd-{uuid.uuid4().hex[:6]}", "scope": scope}))
    assert_problem(resp, 401, "unauthorized")


@pytest.mark.parametrize("sub", [None, 42, "", "a b", "x" * 129, ["alice"]])
async def test_tokens_without_a_usable_subject_are_401(api: httpx.AsyncClient, sub: object) -> None:
    claims: dict[str, object] = {} if sub is None else {"sub": sub}
    assert_problem(await api.get("/sessions", headers=bearer_with(claims)), 401, "unauthorized")
