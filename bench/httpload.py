"""The Python load generator: a minimal HTTP/1.1 keep-alive client on a raw asyncio Protocol.

httpx or aiohttp spend more CPU per request than the gateway's own HTTP layer, which would make
the generator, not the system, the bottleneck on a 2-core machine. This client only writes
pre-built request bytes and parses the status line, Content-Length or chunked framing.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from array import array
from dataclasses import dataclass
from typing import Any

from harness import Window

_NO_BODY = -1
_CHUNKED = -2


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time (no pipelining, like wrk)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._status = 0
        self._length = _NO_BODY
        self._close_after = False
        self.closed = False
        self.sent_at = 0.0  # perf_counter of the request in flight, 0.0 when idle (read by the watchdog)

    # ---- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(str(exc) if exc else "connection closed"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is not None:
            self._parse()

    # ---- requests --------------------------------------------------------------------------

    def request(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Send ``raw`` (a complete request); the future gives (status, body)."""
        assert self._transport is not None and self._waiter is None
        self._waiter = self._loop.create_future()
        self._status = 0
        self.sent_at = time.perf_counter()
        self._transport.write(raw)
        return self._waiter

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self.sent_at = 0.0
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _parse(self) -> None:
        buf = self._buf
        if self._status == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            try:
                self._status = int(head[9:12])
            except ValueError:
                self._fail(ConnectionError("malformed status line"))
                self.abort()
                return
            self._length = _body_framing(head)
            self._close_after = b"\r\nconnection: close" in head
        if self._length >= 0:
            if len(buf) < self._length:
                return
            body = bytes(buf[: self._length])
            del buf[: self._length]
        elif self._length == _CHUNKED:
            taken = _take_chunked(buf)
            if taken is None:
                return
            body = taken
        else:
            body = b""  # 204/304: no body; the servers under test always frame other responses
        waiter, self._waiter = self._waiter, None
        self.sent_at = 0.0
        if waiter is not None and not waiter.done():
            waiter.set_result((self._status, body))
        if self._close_after:
            self.closed = True  # before abort(): connection_lost only runs on a later loop turn
            self.abort()


def _body_framing(head: bytes) -> int:
    """Content-Length, or _CHUNKED, or _NO_BODY; ``head`` is lower-cased."""
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        return int(head[at + 17 : stop if stop >= 0 else len(head)])
    if b"\r\ntransfer-encoding: chunked" in head:
        return _CHUNKED
    return _NO_BODY


def _take_chunked(buf: bytearray) -> bytes | None:
    """Consume one complete chunked body from ``buf``, or return None and leave it if incomplete."""
    pos = 0
    parts: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        start = eol + 2
        if size == 0:
            if len(buf) < start + 2:  # the final CRLF (no trailers are sent by the servers under test)
                return None
            del buf[: start + 2]
            return b"".join(parts)
        if len(buf) < start + size + 2:
            return None
        parts.append(bytes(buf[start : start + size]))
        pos = start + size + 2


async def connect(host: str, port: int) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: HttpConnection(loop), host, port)
    return protocol


def build_request(method: str, path: str, host: str, token: str | None, body: bytes | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


# ---- fetching with bodies (setup: pre-creating the session pool) -----------------------------


async def fetch_all(host: str, port: int, requests: list[bytes], concurrency: int, timeout_s: float = 10.0) -> list[tuple[int, bytes]]:
    """Send every request once over ``concurrency`` connections; (status, body) in request order."""
    results: list[tuple[int, bytes]] = [(0, b"")] * len(requests)
    next_index = iter(range(len(requests)))

    async def lane() -> None:
        conn = await connect(host, port)
        try:
            for i in next_index:
                if conn.closed:
                    conn = await connect(host, port)
                results[i] = await asyncio.wait_for(conn.request(requests[i]), timeout_s)
        finally:
            conn.abort()

    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, len(requests))))))
    return results


# ---- the timed load loop (runs in a generator process) -----------------------------------------


@dataclass(frozen=True)
class HttpSpec:
    targets: list[tuple[str, int]]
    requests: list[bytes]  # each request picks one at random
    connections: int
    timeout_s: float
    seed: int


@dataclass
class _Tally:
    measure_start: float  # perf_counter clock
    end: float
    ok: int = 0
    status_errors: int = 0
    transport_errors: int = 0

    def __post_init__(self) -> None:
        self.latencies = array("d")
        self.error_kinds: dict[str, int] = {}  # "http 503", "timeout", "connect", ... -> count

    def error(self, kind: str, *, transport: bool) -> None:
        if transport:
            self.transport_errors += 1
        else:
            self.status_errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    stopping: bool = False  # set before the final aborts, whose errors are ours, not the server's

    def in_window(self, t0: float, t1: float) -> bool:
        return t0 >= self.measure_start and t1 <= self.end and not self.stopping


def http_child(spec: HttpSpec, window: Window) -> dict[str, Any]:
    """Entry point of one generator process (see harness.run_children)."""
    try:
        import uvloop

        uvloop.install()  # the same loop as the servers; cuts the generator's own CPU per request
    except ImportError:
        pass
    return asyncio.run(_run(spec, window))


async def _run(spec: HttpSpec, window: Window) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    # Convert the shared wall-clock window to this process's perf_counter clock once.
    offset = time.perf_counter() - time.time()
    tally = _Tally(measure_start=window.measure_start + offset, end=window.end + offset)
    rng = random.Random(spec.seed)
    live: set[HttpConnection] = set()
    usage: dict[str, float] = {}

    def snapshot(name: str) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        usage[name] = ru.ru_utime + ru.ru_stime

    await asyncio.sleep(max(0.0, window.start - time.time()))
    loop.call_later(max(0.0, window.measure_start - time.time()), snapshot, "start")
    tasks = [
        loop.create_task(_drive(spec.targets[i % len(spec.targets)], spec.requests, rng, tally, live, spec.timeout_s))
        for i in range(spec.connections)
    ]
    watchdog = loop.create_task(_watchdog(live, spec.timeout_s))
    await asyncio.sleep(max(0.0, window.end - time.time()))
    snapshot("end")
    # Timers may fire a little early: the clock is not yet past ``end`` for every check.
    tally.stopping = True
    watchdog.cancel()
    for conn in list(live):
        conn.abort()  # requests still in flight at the end are not counted
    await asyncio.gather(*tasks, watchdog, return_exceptions=True)
    return {
        "ok": tally.ok,
        "status_errors": tally.status_errors,
        "transport_errors": tally.transport_errors,
        "latencies": tally.latencies.tobytes(),
        "error_kinds": tally.error_kinds,
        "cpu_s": usage["end"] - usage.get("start", usage["end"]),
    }


async def _drive(
    target: tuple[str, int], requests: list[bytes], rng: random.Random, tally: _Tally, live: set[HttpConnection], timeout_s: float
) -> None:
    """One connection's loop: send, wait for the whole response, record, repeat until the end."""
    choice = rng.choice
    perf = time.perf_counter
    conn: HttpConnection | None = None
    while perf() < tally.end:
        if conn is None or conn.closed:
            if conn is not None:
                live.discard(conn)
            try:
                conn = await connect(*target)
            except OSError:
                now = perf()
                if tally.in_window(now, now):
                    tally.error("connect", transport=True)
                conn = None
                await asyncio.sleep(0.01)  # do not spin on a refused port
                continue
            live.add(conn)
        t0 = perf()
        try:
            status, _ = await conn.request(choice(requests))
        except ConnectionError:
            if tally.in_window(t0, perf()):
                timed_out = perf() - t0 > timeout_s
                tally.error("timeout" if timed_out else "connection lost", transport=True)
            continue
        t1 = perf()
        if tally.in_window(t0, t1):
            tally.latencies.append(t1 - t0)
            if 200 <= status < 300:
                tally.ok += 1
            else:
                tally.error(f"http {status}", transport=False)
    if conn is not None:
        conn.abort()


async def _watchdog(live: set[HttpConnection], timeout_s: float) -> None:
    """Abort connections whose request is older than the timeout: no per-request timer needed."""
    while True:
        await asyncio.sleep(min(0.25, timeout_s / 4))
        now = time.perf_counter()
        for conn in list(live):
            if conn.sent_at and now - conn.sent_at > timeout_s:
                conn.abort()
