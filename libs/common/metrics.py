"""Prometheus metrics shared by every service: registries, bounded labels and the scrape listener.

Each service builds its metrics in its own :class:`~prometheus_client.CollectorRegistry` (no
global default registry, so tests can build several apps in one process). Hot paths keep the
per-request cost to a dictionary lookup and an ``observe``: label children are created once per
label value and cached (:class:`LabelCache`), and values that live elsewhere (sessions in memory,
shards owned, live workers) are read at scrape time by collectors instead of being updated on
every change.

Workers and supervisors serve ``GET /metrics`` on ``METRICS_PORT`` from their own event loop
(:func:`serve_metrics`); the gateway serves it on its HTTP port.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import structlog
from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

log = structlog.get_logger(__name__)

# Text format 0.0.4: what generate_latest writes and every Prometheus version reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Seconds. HTTP and NATS round trips are milliseconds when healthy and up to REQUEST_TIMEOUT (5 s)
# when no worker answers; Redis calls are sub-millisecond on a LAN.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WORKER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5)
FAILOVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)

OTHER = "other"
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

Child = TypeVar("Child")


def new_registry() -> CollectorRegistry:
    """A registry with the process (CPU, memory, file descriptors) and GC collectors."""
    disable_created_metrics()  # no *_created series: they double the series count for little use
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def status_class(status: int) -> str:
    return _STATUS_CLASSES.get(status // 100, OTHER)


def safe_code(code: str | None) -> str:
    """An error code fit for a label: our codes are short snake_case words; anything else is 'other'."""
    return code if code is not None and _CODE_RE.match(code) else OTHER


class LabelCache(Generic[Child]):
    """Label values -> pre-bound metric children, created once and then only looked up.

    ``limit`` bounds the number of distinct values (a label fed from a request, such as an
    action name, must never grow the series count without bound); past it, values map to
    ``other``.
    """

    __slots__ = ("_children", "_make", "_limit")

    def __init__(self, make: Callable[[str], Child], *, limit: int = 64, preset: tuple[str, ...] = ()) -> None:
        self._make = make
        self._limit = limit
        self._children: dict[str, Child] = {}
        for value in (*preset, OTHER):
            self._children[value] = make(value)

    def __getitem__(self, value: str) -> Child:
        child = self._children.get(value)
        if child is None:
            if len(self._children) >= self._limit:
                return self._children[OTHER]
            child = self._children[value] = self._make(value)
        return child


async def _answer_scrape(registry: CollectorRegistry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(5):
            request_line = await reader.readline()
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
        parts = request_line.decode("latin-1").split()
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, body, content_type = "405 Method Not Allowed", b"only GET\n", "text/plain"
        elif path in ("/metrics", "/"):
            status, body, content_type = "200 OK", render(registry), CONTENT_TYPE
        else:
            status, body, content_type = "404 Not Found", b"metrics are at /metrics\n", "text/plain"
        head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
        await writer.drain()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@asynccontextmanager
async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> AsyncIterator[asyncio.Server | None]:
    """Serve ``GET /metrics`` on ``host:port`` from this event loop while the block runs.

    Port 0 means metrics are off (nothing listens). Serving from the service's own loop needs no
    thread and no locking, and a stalled loop shows up as a failed scrape, as it should.
    """
    if not port:
        yield None
        return
    server = await asyncio.start_server(lambda r, w: _answer_scrape(registry, r, w), host, port, reuse_address=True)
    log.info("metrics_listening", host=host, port=port)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
