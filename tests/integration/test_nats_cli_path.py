"""What an operator with the NATS CLI gets: ``nats req sessions.<sid>.<op> '<json>'``.

No gateway and no auth headers: the request goes to ``sessions.<sid>.<op>``, nats.conf maps it
to the owning shard, and the worker answers with the JSON body, or with the error headers
``Nats-Service-Error-Code`` / ``Nats-Service-Error`` / ``Sm-Error`` and an empty body.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from sessionmgr.common.errors import HEADER_ERROR, HEADER_ERROR_CODE, HEADER_SM_ERROR, error_from_headers
from tests.support.cluster import Cluster, nats_client

RETRY_FOR = 5.0  # only "no responders" and 503s (a shard mid-move) are retried, as a patient CLI user would


@pytest.fixture(scope="module")
async def nc(cluster: Cluster) -> AsyncIterator[NATS]:
    async with nats_client(cluster.servers.nats_url) as client:
        yield client


async def cli(nc: NATS, sid: str, op: str, body: Any = None) -> Msg:
    payload = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    deadline = time.monotonic() + RETRY_FOR
    while True:
        try:
            msg = await nc.request(f"sessions.{sid}.{op}", payload, timeout=2.0)
        except nats.errors.NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        error = error_from_headers(msg.headers)
        if error is not None and error.retryable and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            continue
        return msg


def ok_json(msg: Msg) -> Any:
    headers = msg.headers or {}
    assert HEADER_ERROR_CODE not in headers, f"unexpected error reply: {headers}"
    return json.loads(msg.data)


def assert_error(msg: Msg, code: str, status: int) -> None:
    headers = msg.headers or {}
    assert headers.get(HEADER_SM_ERROR) == code, headers
    assert headers.get(HEADER_ERROR_CODE) == str(status), headers
    assert headers.get(HEADER_ERROR), "Nats-Service-Error should carry a human-readable detail"
    assert msg.data == b""


def new_sid() -> str:
    return secrets.token_urlsafe(12)


async def test_create_incr_get(nc: NATS) -> None:
    sid = new_sid()
    created_msg = await cli(nc, sid, "session.create", {"user_id": "cli-user", "metadata": {"k": "v"}})
    created = ok_json(created_msg)
    assert created["session_id"] == sid
    assert created["user_id"] == "cli-user"
    assert created["version"] == 1
    assert created["state"] == "active"
    assert created["metadata"] == {"k": "v"}
    assert created["context"] == {}
    for field in ("created_at", "last_updated", "expires_at"):
        assert isinstance(created[field], str)

    incr = ok_json(await cli(nc, sid, "context.incr", {"key": "n", "by": 5}))
    assert incr["action"] == "context.incr"
    assert incr["result"] == {"key": "n", "value": 5}
    assert incr["version"] == 2

    got = ok_json(await cli(nc, sid, "session.get"))
    assert got["session_id"] == sid
    assert got["version"] == 2
    assert got["context"] == {"n": 5}
    assert got["metadata"] == {"k": "v"}


async def test_reply_headers_carry_status_and_version(nc: NATS) -> None:
    sid = new_sid()
    created = await cli(nc, sid, "session.create", {"user_id": "cli-user"})
    ok_json(created)
    assert (created.headers or {}).get("Sm-Version") == "1"
    assert (created.headers or {}).get("Sm-Status") == "201"
    got = await cli(nc, sid, "session.get")
    assert (got.headers or {}).get("Sm-Status") == "200"


async def test_update_and_delete(nc: NATS) -> None:
    sid = new_sid()
    ok_json(await cli(nc, sid, "session.create", {"user_id": "cli-user", "metadata": {"k": "v"}}))
    updated = ok_json(await cli(nc, sid, "session.update", {"state": "idle", "metadata": {"x": 1}}))
    assert updated["state"] == "idle" and updated["version"] == 2
    assert updated["metadata"] == {"k": "v", "x": 1}
    stale = await cli(nc, sid, "session.update", {"state": "active", "expected_version": 1})
    assert_error(stale, "version_mismatch", 412)
    deleted = await cli(nc, sid, "session.delete")
    assert HEADER_ERROR_CODE not in (deleted.headers or {})
    assert deleted.data == b""
    assert_error(await cli(nc, sid, "session.get"), "session_not_found", 404)


async def test_unknown_action(nc: NATS) -> None:
    sid = new_sid()
    ok_json(await cli(nc, sid, "session.create", {"user_id": "cli-user"}))
    msg = await cli(nc, sid, "no.such.action", {})
    assert_error(msg, "unknown_action", 422)
    assert "no.such.action" in (msg.headers or {})[HEADER_ERROR]


async def test_get_missing_session(nc: NATS) -> None:
    assert_error(await cli(nc, new_sid(), "session.get"), "session_not_found", 404)


async def test_action_on_missing_session(nc: NATS) -> None:
    assert_error(await cli(nc, new_sid(), "context.incr", {"key": "n"}), "session_not_found", 404)


async def test_create_twice(nc: NATS) -> None:
    sid = new_sid()
    ok_json(await cli(nc, sid, "session.create", {"user_id": "cli-user"}))
    assert_error(await cli(nc, sid, "session.create", {"user_id": "cli-user"}), "session_exists", 409)


async def test_create_needs_a_user(nc: NATS) -> None:
    assert_error(await cli(nc, new_sid(), "session.create", {"metadata": {}}), "validation_error", 400)


async def test_malformed_json(nc: NATS) -> None:
    assert_error(await cli(nc, new_sid(), "session.create", b"{not json"), "bad_request", 400)


async def test_unknown_field(nc: NATS) -> None:
    assert_error(await cli(nc, new_sid(), "session.create", {"user_id": "u", "nope": 1}), "validation_error", 400)


async def test_invalid_session_id_is_refused(nc: NATS) -> None:
    assert_error(await cli(nc, "a%2Eb", "session.get"), "bad_request", 400)
    assert_error(await cli(nc, "x" * 65, "session.get"), "bad_request", 400)


# ---- WhatsApp sessions over the CLI subjects (issue 7) --------------------------------------------


async def _cli_status(nc: NATS, sid: str, wanted: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        connection = ok_json(await cli(nc, sid, "session.get"))["connection"]
        if connection["status"] == wanted or time.monotonic() > deadline:
            assert connection["status"] == wanted, connection
            return connection  # type: ignore[no-any-return]
        await asyncio.sleep(0.02)


async def test_whatsapp_lifecycle_and_messages_over_cli_subjects(nc: NATS) -> None:
    sid, other = f"wa-{secrets.token_hex(6)}", f"wa-{secrets.token_hex(6)}"
    phone, other_phone = "4930" + str(secrets.randbelow(10**8)), "4940" + str(secrets.randbelow(10**8))
    for session_id, number in ((sid, phone), (other, other_phone)):
        ok_json(await cli(nc, session_id, "session.create", {"user_id": "cli-user", "config": {"bot": "echo" if session_id == other else None}}))
        assert ok_json(await cli(nc, session_id, "connection.start"))["result"]["status"] == "STARTING"
        await _cli_status(nc, session_id, "SCAN_QR_CODE")
        assert ok_json(await cli(nc, session_id, "auth.qr"))["result"]["qr"].startswith("2@")
        ok_json(await cli(nc, session_id, "simulate.scan", {"phone": number}))
        await _cli_status(nc, session_id, "WORKING")

    sent = ok_json(await cli(nc, sid, "message.send_text", {"chat_id": f"{other_phone}@c.us", "text": "hi from the CLI"}))["result"]
    assert sent["status"] == "sent"
    deadline = time.monotonic() + 10
    while True:  # the echo bot on the other session answers
        history = ok_json(await cli(nc, sid, "message.list", {"chat_id": f"{other_phone}@c.us"}))["result"]["messages"]
        if any(not m["from_me"] and m["text"] == "hi from the CLI" for m in history):
            break
        assert time.monotonic() < deadline, history
        await asyncio.sleep(0.02)
    assert_error(await cli(nc, sid, "connection.start"), "invalid_connection_status", 409)
    assert ok_json(await cli(nc, sid, "connection.logout"))["result"]["status"] == "STOPPED"
