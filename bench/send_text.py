"""``message.send_text`` in the benchmark: bring sessions to WORKING, then load the action.

A message can only be sent from a session whose WhatsApp connection is WORKING, so the run first
starts each session's connection (``connection.start``), waits for the simulated engine to ask for
a scan (``SCAN_QR_CODE``), scans it with a made-up phone (``simulate.scan``) and waits for
WORKING, all through the REST API. A system without the action (an older build) answers the
first probe with ``unknown_action``: the row is then skipped with a note instead of failing.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

from httpload import build_request, fetch_all

ACTION = "message.send_text"
SEND_BODY = json.dumps({"action": ACTION, "payload": {"chat_id": "4915550001234@c.us", "text": "benchmark message"}}).encode()
_POLL_S = 0.1
_CONCURRENCY = 16


class Entry(Protocol):
    session_id: str
    token: str


@dataclass(frozen=True)
class Prepared:
    sessions: list[Any]  # the pool entries whose connection is WORKING
    note: str | None  # why there are none (or fewer than asked for)


def _action(entry: Entry, host: str, action: str, payload: dict[str, Any] | None = None) -> bytes:
    body = json.dumps({"action": action, "payload": payload or {}}).encode()
    return build_request("POST", f"/sessions/{entry.session_id}/request", host, entry.token, body)


def _code(body: bytes) -> str:
    try:
        return str(json.loads(body).get("code", ""))
    except (ValueError, AttributeError):
        return ""


def _status(body: bytes) -> str:
    try:
        return str(json.loads(body)["connection"]["status"])
    except (ValueError, KeyError, TypeError):
        return ""


async def _wait_status(addr: tuple[str, int], host: str, entries: list[Any], wanted: str, deadline: float) -> list[Any]:
    """Poll GET until each entry's connection is ``wanted``; the ones that got there in time."""
    pending, done = list(entries), []
    while pending and time.monotonic() < deadline:
        replies = await fetch_all(*addr, [build_request("GET", f"/sessions/{e.session_id}", host, e.token) for e in pending], _CONCURRENCY)
        still = []
        for entry, (status, body) in zip(pending, replies, strict=True):
            (done if status == 200 and _status(body) == wanted else still).append(entry)
        pending = still
        if pending:
            await asyncio.sleep(_POLL_S)
    return done


def _spread_over_users(pool: list[Any], count: int) -> list[Any]:
    """``count`` sessions taken from as many users as possible, round robin.

    Rate limits are per user (RATE_LIMIT_PER_MINUTE): a row drawn from a handful of users would
    measure the limiter under a fast load generator (wrk), not message.send_text.
    """
    by_user: dict[str, list[Any]] = {}
    for entry in pool:
        by_user.setdefault(entry.token, []).append(entry)
    chosen: list[Any] = []
    queues = list(by_user.values())
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


async def _prepare(addr: tuple[str, int], host: str, pool: list[Any], count: int, timeout_s: float) -> Prepared:
    entries = _spread_over_users(pool, count)
    if not entries:
        return Prepared([], "no sessions to connect")
    # Probe: an unknown action answers 422 unknown_action; a known one refuses this session (not WORKING yet).
    [(status, body)] = await fetch_all(*addr, [build_request("POST", f"/sessions/{entries[0].session_id}/request", host, entries[0].token, SEND_BODY)], 1)
    if _code(body) == "unknown_action":
        return Prepared([], f"skipped: this build has no {ACTION} action (HTTP {status} unknown_action)")
    deadline = time.monotonic() + timeout_s
    replies = await fetch_all(*addr, [_action(e, host, "connection.start") for e in entries], _CONCURRENCY)
    started = [e for e, (status, _) in zip(entries, replies, strict=True) if status == 200]
    scanning = await _wait_status(addr, host, started, "SCAN_QR_CODE", deadline)
    phones = [f"49155{index:07d}" for index in range(len(scanning))]
    replies = await fetch_all(*addr, [_action(e, host, "simulate.scan", {"phone": p}) for e, p in zip(scanning, phones, strict=True)], _CONCURRENCY)
    scanned = [e for e, (status, _) in zip(scanning, replies, strict=True) if status == 200]
    working = await _wait_status(addr, host, scanned, "WORKING", deadline)
    note = None if len(working) == len(entries) else f"only {len(working)} of {len(entries)} sessions reached WORKING within {timeout_s:.0f} s"
    return Prepared(working, note)


def prepare_working(addr: tuple[str, int], pool: list[Any], count: int, timeout_s: float = 60.0) -> Prepared:
    """Bring up to ``count`` sessions of ``pool`` to WORKING over the gateway at ``addr``."""
    return asyncio.run(_prepare(addr, f"{addr[0]}:{addr[1]}", pool, count, timeout_s))


def send_requests(sessions: list[Any], host: str) -> list[bytes]:
    return [build_request("POST", f"/sessions/{e.session_id}/request", host, e.token, SEND_BODY) for e in sessions]
