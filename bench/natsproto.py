"""The NATS load generator's client: request/reply over the NATS text protocol on a raw asyncio Protocol.

nats-py spends about 0.09 ms of CPU per request (as much as nats-server), which on a 2-core
machine takes CPU from the system under test; this client about a quarter of that. Like wrk for
HTTP, it does only what the benchmark needs: one connection, one wildcard reply subscription, PUBs built from pre-encoded
parts and written once per event-loop pass, replies matched to futures by the last subject
token, and headers read only from error replies.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import time
from urllib.parse import urlparse

Frame = tuple[bytes, bytes]  # a PUB before and after its reply token (see NatsLean.frame)
Headers = dict[str, str]

_CRLF = b"\r\n"
_M = ord("M")  # first byte of MSG: the common case, checked before anything else
_NO_RESPONDERS = b"NATS/1.0 503"
_ERROR_HEADER = b"Nats-Service-Error-Code"  # the only replies whose headers are worth parsing
_MAX_TICK_S = 0.25


class NoRespondersError(ConnectionError):
    """Nobody subscribes to the subject: nats-server answered with status 503 (nats-py's name)."""


class NatsLean(asyncio.Protocol):
    """One NATS connection sending requests and receiving their replies on one wildcard inbox."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, user: str, password: str, inbox_prefix: str, timeout_s: float, name: str) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._connect = json.dumps(
            {
                "verbose": False, "pedantic": False, "user": user, "pass": password, "headers": True, "no_responders": True,
                "protocol": 1, "name": name, "lang": "python",
            },
            separators=(",", ":"),
        ).encode()  # fmt: skip
        self._inbox = f"{inbox_prefix}.{secrets.token_hex(8)}.".encode()
        self._token_at = len(self._inbox)  # where the reply token starts in a reply's subject
        self._timeout_s = timeout_s
        self._buf = bytearray()
        self._out = bytearray()  # PUBs of this loop pass, written together by _flush
        self._pending: dict[bytes, asyncio.Future[Headers | None]] = {}  # reply token -> its request
        self._next = 0
        # (perf_counter, next token) per tick: tokens below one older than the timeout have expired.
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        self._ticker: asyncio.TimerHandle | None = None
        self.ready: asyncio.Future[None] = loop.create_future()  # done when the server answered CONNECT's PING
        self.server_error = ""  # the last -ERR: explains requests that then time out (a permissions violation)
        self._lost: str | None = None  # why the connection ended, once it has

    # ---- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self._lost = f"{exc or 'connection closed'}{f' ({self.server_error})' if self.server_error else ''}"
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"nats-server closed the connection: {self._lost}"))
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(self._lost))

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        size = len(buf)
        while pos < size:
            eol = buf.find(_CRLF, pos)
            if eol < 0:
                break
            if buf[pos] == _M or buf.startswith(b"HMSG", pos):
                end = self._message(buf, pos, eol, size)
                if end < 0:
                    break  # the payload has not fully arrived
                pos = end
            else:
                self._control(bytes(buf[pos:eol]))
                pos = eol + 2
        del buf[:pos]

    # ---- requests --------------------------------------------------------------------------

    def frame(self, subject: str, payload: bytes) -> Frame:
        """Pre-encode a request once: request() only adds the reply token between the two parts."""
        return b"PUB " + subject.encode() + b" " + self._inbox, b" %d\r\n" % len(payload) + payload + _CRLF

    def request(self, frame: Frame) -> asyncio.Future[Headers | None]:
        """Send one request; the future gives None for a reply, or the headers of an error reply
        (Nats-Service-Error-Code set). It fails with NoRespondersError, TimeoutError or ConnectionError."""
        fut = self._loop.create_future()
        if self._lost is not None:
            fut.set_exception(ConnectionError(self._lost))
            return fut
        self._next += 1
        token = b"%d" % self._next
        self._pending[token] = fut
        out = self._out  # _write inlined, without concatenating the parts first: this is the hot path
        if not out:
            self._loop.call_soon(self._flush)
        out += frame[0]
        out += token
        out += frame[1]
        return fut

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _write(self, data: bytes) -> None:
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out += data

    def _flush(self) -> None:
        # Hand the buffer over and start a new one: the transport may keep a reference to it.
        out, self._out = self._out, bytearray()
        if self._transport is not None and self._lost is None:
            self._transport.write(out)

    # ---- parsing ---------------------------------------------------------------------------

    def _message(self, buf: bytearray, pos: int, eol: int, size: int) -> int:
        """Deliver the MSG or HMSG at ``pos`` (its control line ends at ``eol``); where the next
        frame starts, or -1 if its payload is incomplete."""
        args = bytes(buf[pos:eol]).split()  # [H]MSG <subject> <sid> [reply] [<header bytes>] <total bytes>
        start = eol + 2
        end = start + int(args[-1]) + 2
        if end > size:
            return -1
        fut = self._pending.pop(args[1][self._token_at :], None)
        if fut is None or fut.done():
            return end  # expired, or its lane was cancelled at the end of the run
        if args[0] == b"MSG":
            fut.set_result(None)
            return end
        headers_end = start + int(args[-2])
        if buf.startswith(_NO_RESPONDERS, start, headers_end):
            fut.set_exception(NoRespondersError("no responders"))
        elif buf.find(_ERROR_HEADER, start, headers_end) >= 0:
            fut.set_result(parse_headers(bytes(buf[start:headers_end])))
        else:
            fut.set_result(None)
        return end

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self._write(b"PONG\r\n")  # nats.conf drops clients that leave 3 pings unanswered
        elif line == b"PONG":
            if not self.ready.done():
                self.ready.set_result(None)
                self._tick()
        elif line.startswith(b"-ERR"):
            self.server_error = line[5:].decode(errors="replace").strip(" '")
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(f"nats-server refused the connection: {self.server_error}"))
        elif line.startswith(b"INFO") and not self.ready.done():
            self._handshake(line)
        # +OK (sent only in verbose mode) and later INFOs (cluster changes) need nothing.

    def _handshake(self, info_line: bytes) -> None:
        if json.loads(info_line[5:]).get("tls_required"):
            self.ready.set_exception(ConnectionError("nats-server requires TLS, which this client does not speak"))
            return
        sub = b"SUB " + self._inbox + b"* 1\r\n"
        self._write(b"CONNECT " + self._connect + _CRLF + sub + b"PING\r\n")

    # ---- timeouts --------------------------------------------------------------------------

    def _tick(self) -> None:
        """Fail requests older than the timeout; one timer for all of them, not one per request."""
        now = time.perf_counter()
        self._marks.append((now, self._next + 1))
        expired_below = 0
        while now - self._marks[0][0] >= self._timeout_s:
            expired_below = self._marks.popleft()[1]
        for token in [t for t in self._pending if int(t) < expired_below]:
            fut = self._pending.pop(token)
            if not fut.done():
                fut.set_exception(TimeoutError(f"no reply within {self._timeout_s:g} s"))
        self._ticker = self._loop.call_later(min(_MAX_TICK_S, self._timeout_s / 4), self._tick)


def parse_headers(block: bytes) -> Headers:
    """``NATS/1.0 [status]\\r\\nKey: value\\r\\n...``: the keys and values, without the status line."""
    headers: Headers = {}
    for line in block.decode(errors="replace").split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return headers


async def connect(url: str, *, user: str, password: str, inbox_prefix: str, timeout_s: float, name: str = "sm-bench-nats-lean") -> NatsLean:
    """Connect and authenticate to ``nats://host:port``; requests unanswered after ``timeout_s`` fail."""
    parsed = urlparse(url)
    loop = asyncio.get_running_loop()

    def factory() -> NatsLean:
        return NatsLean(loop, user=user, password=password, inbox_prefix=inbox_prefix, timeout_s=timeout_s, name=name)

    _, client = await asyncio.wait_for(loop.create_connection(factory, parsed.hostname or "127.0.0.1", parsed.port or 4222), 5.0)
    try:
        await asyncio.wait_for(client.ready, 5.0)
    except BaseException:
        client.close()
        raise
    return client
