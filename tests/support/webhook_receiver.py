"""A tiny real HTTP/1.1 webhook receiver for tests, on a free loopback port.

Built on ``asyncio.start_server`` in the test's own event loop (keep-alive, Content-Length bodies:
what httpx sends). ``respond(path, headers, attempt_of_this_delivery)`` decides each answer, so a
test scripts failures per delivery; every request is recorded and wakes ``wait_for``. ``stop()``
closes the port (connections refused, as a receiver that is down), ``start()`` opens it again on
the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from sessionmgr.common import procs
from sessionmgr.common.models import SessionEvent, event_decoder
from sessionmgr.common.streams import EVENTS_STREAM
from sessionmgr.common.webhook_models import WEBHOOKS_STREAM
from sessionmgr.worker.webhooks import CONSUMER

SECRET = "whsec-test-0123456789abcdef"


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int  # what the receiver answered
    at: float = field(default_factory=time.monotonic)

    @property
    def delivery(self) -> tuple[str, str]:
        """(event id, path): one delivery, whatever its attempt."""
        return self.headers.get("x-webhook-id", ""), self.path


Responder = Callable[[str, dict[str, str], int], "tuple[int, dict[str, str]] | int"]


class WebhookReceiver:
    def __init__(self, respond: Responder | None = None) -> None:
        self.port = procs.free_port()
        self.respond: Responder = respond or (lambda path, headers, attempt: 200)
        self.received: list[Received] = []
        self._attempts: Counter[tuple[str, str]] = Counter()
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> WebhookReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    def accepted(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.status < 300]

    async def wait_for(self, predicate: Callable[[WebhookReceiver], bool], timeout: float = 20.0, what: str = "deliveries") -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {[(r.path, r.headers.get('x-webhook-event'), r.status) for r in self.received]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                path = request_line.split(" ")[1]
                headers = {}
                for line in lines:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received = Received(path, headers, body, 0)
                self._attempts[received.delivery] += 1
                answer = self.respond(path, headers, self._attempts[received.delivery])
                status, extra = (answer, {}) if isinstance(answer, int) else answer
                self.received.append(Received(path, headers, body, status))
                self._changed.set()
                reply_headers = {"Content-Length": "2", "Content-Type": "text/plain", **extra}
                text = "".join(f"{k}: {v}\r\n" for k, v in reply_headers.items())
                writer.write(f"HTTP/1.1 {status} X\r\n{text}\r\n".encode() + b"ok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()


def signature_ok(received, secret: str = SECRET) -> bool:  # type: ignore[no-untyped-def]
    timestamp = received.headers["x-webhook-timestamp"]
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + received.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(received.headers.get("x-webhook-signature", ""), f"sha256={expected}")


async def session_events(nc: NATS, sid: str, count: int) -> list[SessionEvent]:
    """The session's first ``count`` events, from SM_EVENTS: what webhook deliveries to expect."""
    sub = await nc.jetstream().pull_subscribe(f"sm.events.{sid}.>", stream=EVENTS_STREAM, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    events: list[SessionEvent] = []
    try:
        while len(events) < count:
            for msg in await sub.fetch(count - len(events), timeout=5):
                events.append(event_decoder.decode(msg.data))
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return events


async def wait_settled(nc: NATS, timeout: float = 15.0) -> None:
    """No delivery pending or in flight in SM_WEBHOOKS (then the receiver has all it will get)."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(WEBHOOKS_STREAM, CONSUMER)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        assert time.monotonic() < deadline, f"deliveries still pending: {info.num_pending} + {info.num_ack_pending} in flight"
        await asyncio.sleep(0.05)
