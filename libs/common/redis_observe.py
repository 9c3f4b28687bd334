"""Redis round-trip metrics and client spans, measured where every command passes: the client.

:class:`ObservedRedis` times each command (and each pipeline) into ``sm_redis_duration_seconds
{command}`` and, inside a sampled trace, opens a CLIENT span for it. This is cheaper than
``opentelemetry-instrumentation-redis`` (which formats every command's arguments even when the
trace is not sampled, and still gives no latency metric), and it does not nest a second client
span inside one the caller already opened (``sessions.py`` wraps its load and write calls).
Calls outside a sampled trace (warm starts, epoch fencing) get the metric only.
"""

from __future__ import annotations

from time import perf_counter
from collections.abc import Awaitable
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import CollectorRegistry, Histogram
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from sessionmgr.common.metrics import REDIS_BUCKETS, LabelCache

PIPELINE = "PIPELINE"
T = TypeVar("T")


class RedisObserver:
    """Owns ``sm_redis_duration_seconds`` and the tracer for Redis client spans."""

    def __init__(self, registry: CollectorRegistry, tracer: Tracer | None = None) -> None:
        self.duration = Histogram(
            "sm_redis_duration_seconds",
            "Redis round trips as the worker sees them (pool wait included), by command",
            ["command"],
            buckets=REDIS_BUCKETS,
            registry=registry,
        )
        self._by_command: LabelCache[Any] = LabelCache(lambda c: self.duration.labels(command=c), limit=48, preset=(PIPELINE,))
        self._tracer = tracer or trace.get_tracer("sessionmgr.redis")

    async def observe(self, command: str, operation: Awaitable[T]) -> T:
        """Await ``operation`` (one round trip running ``command``), timed and, inside a sampled
        trace, under a client span: what every Redis client of ours reports through."""
        span = self._start_span(command)
        started = perf_counter()
        error: BaseException | None = None
        try:
            return await operation
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._by_command[command].observe(perf_counter() - started)
            if span is not None:
                if error is not None:
                    span.record_exception(error)
                    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                span.end()

    def _start_span(self, command: str) -> Span | None:
        parent = trace.get_current_span()
        # Only inside a sampled trace, and never a client span inside another client span.
        if not parent.is_recording() or getattr(parent, "kind", None) is SpanKind.CLIENT:
            return None
        return self._tracer.start_span(
            f"redis {command}",
            kind=SpanKind.CLIENT,
            attributes={"db.system": "redis", "db.system.name": "redis", "db.operation.name": command},
        )


def _command_name(args: tuple[Any, ...]) -> str:
    name = args[0] if args else "?"
    return name.decode() if isinstance(name, bytes) else str(name).upper()


class ObservedRedis(Redis):
    """``redis.asyncio.Redis`` that reports every command to a :class:`RedisObserver`."""

    sm_observer: RedisObserver

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        return await self.sm_observer.observe(_command_name(args), super().execute_command(*args, **options))

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = ObservedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.sm_observer = self.sm_observer
        return pipe


class ObservedPipeline(Pipeline):
    """A pipeline is one round trip: timed as ``command="PIPELINE"``."""

    sm_observer: RedisObserver

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return await self.sm_observer.observe(PIPELINE, super().execute(raise_on_error))


def observed_redis(pool: Any, observer: RedisObserver) -> ObservedRedis:
    client = ObservedRedis(connection_pool=pool)
    client.sm_observer = observer
    return client
