"""A worker's Prometheus metrics, served on ``METRICS_PORT``.

Per request only ``sm_worker_request_duration_seconds`` and, on failure, ``sm_worker_errors_total``
are touched (pre-bound children); everything else is read from the worker at scrape time.

| metric | labels | what |
|---|---|---|
| ``sm_worker_request_duration_seconds`` | ``op`` | requests handled, by operation or action |
| ``sm_worker_errors_total`` | ``code`` | requests answered with an error, by code |
| ``sm_worker_sessions`` | | sessions held in memory |
| ``sm_worker_sessions_by_state`` | ``state`` | the same, by session state |
| ``sm_worker_in_flight`` / ``sm_worker_max_in_flight`` | | requests being served / the limit |
| ``sm_worker_utilization_ratio`` | | in flight / limit, at scrape time |
| ``sm_worker_shards`` | | shards this worker owns |
| ``sm_worker_shard_moves_total`` | | shards taken or released |
| ``sm_redis_duration_seconds`` | ``command`` | Redis round trips |
| ``sm_degraded_queue_depth`` | | changes queued while storage is away (degraded mode) |
| ``sm_whatsapp_connections`` | | WhatsApp connections (engines) live on this worker |
| ``sm_whatsapp_sessions_by_status`` | ``status`` | sessions in memory by connection status (STOPPED ... FAILED) |
| ``sm_webhook_deliveries_total`` | ``outcome`` | webhook deliveries: enqueued, enqueue_failed, delivered, retried, dead_lettered |

Average occupancy over a window is ``rate(sm_worker_request_duration_seconds_sum[5m]) /
sm_worker_max_in_flight`` (busy request-seconds per second over the slots there are).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sessionmgr.common import subjects
from sessionmgr.common.metrics import WORKER_BUCKETS, LabelCache, new_registry, safe_code
from sessionmgr.common.redis_observe import RedisObserver

if TYPE_CHECKING:
    from sessionmgr.worker.server import Worker

UNKNOWN_OP = "unknown"
WEBHOOK_OUTCOMES = ("enqueued", "enqueue_failed", "delivered", "retried", "dead_lettered")


class WorkerMetrics:
    def __init__(self, known_actions: Iterable[str], registry: CollectorRegistry | None = None, tracer: Tracer | None = None) -> None:
        self.registry = registry or new_registry()
        self.request_duration = Histogram(
            "sm_worker_request_duration_seconds",
            "Requests a worker handled (lock wait, storage and reply included), by operation or action",
            ["op"],
            buckets=WORKER_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter("sm_worker_errors", "Requests a worker answered with an error, by code", ["code"], registry=self.registry)
        self.degraded_queue_depth = Gauge(
            "sm_degraded_queue_depth",
            "Changes queued while session storage is unreachable (degraded mode); 0 when storage is healthy",
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "sm_webhook_deliveries", "Webhook deliveries by outcome (enqueued, enqueue_failed, delivered, retried, dead_lettered)", ["outcome"], registry=self.registry
        )
        self._webhook_outcomes = {o: self.webhook_deliveries.labels(outcome=o) for o in WEBHOOK_OUTCOMES}
        self.redis = RedisObserver(self.registry, tracer)
        self._known_ops = frozenset((*subjects.SESSION_OPS, *known_actions))
        self._ops: LabelCache[Any] = LabelCache(lambda op: self.request_duration.labels(op=op), limit=128, preset=(*sorted(self._known_ops), UNKNOWN_OP))
        self._errors: LabelCache[Any] = LabelCache(lambda code: self.errors.labels(code=code), limit=64)
        self._state = _WorkerStateCollector()
        self.registry.register(self._state)

    def watch(self, worker: Worker) -> None:
        """Read sessions, in-flight requests and shards from ``worker`` at every scrape."""
        self._state.worker = worker

    def count_webhook(self, outcome: str) -> None:
        """``WebhookService(count=...)``: one delivery outcome (WEBHOOK_OUTCOMES)."""
        child = self._webhook_outcomes.get(outcome)
        if child is not None:
            child.inc()

    def observe_request(self, op: str, seconds: float, error_code: str | None) -> None:
        self._ops[op if op in self._known_ops else UNKNOWN_OP].observe(seconds)
        if error_code is not None:
            self._errors[safe_code(error_code)].inc()


class _WorkerStateCollector(Collector):
    """Gauges read from the worker when Prometheus scrapes (on the worker's own event loop)."""

    def __init__(self) -> None:
        self.worker: Worker | None = None

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.worker)

    def _families(self, worker: Worker | None) -> Iterator[Metric]:
        sessions = GaugeMetricFamily("sm_worker_sessions", "Sessions held in this worker's memory")
        by_state = GaugeMetricFamily("sm_worker_sessions_by_state", "Sessions in memory by state", labels=["state"])
        in_flight = GaugeMetricFamily("sm_worker_in_flight", "Requests being served right now")
        limit = GaugeMetricFamily("sm_worker_max_in_flight", "Concurrent requests this worker accepts (WORKER_MAX_IN_FLIGHT)")
        utilization = GaugeMetricFamily("sm_worker_utilization_ratio", "In-flight requests over the limit, 0-1")
        shards = GaugeMetricFamily("sm_worker_shards", "Shards this worker owns")
        moves = CounterMetricFamily("sm_worker_shard_moves", "Shards this worker took or released")
        connections = GaugeMetricFamily("sm_whatsapp_connections", "WhatsApp connections (engines) live on this worker")
        by_status = GaugeMetricFamily("sm_whatsapp_sessions_by_status", "Sessions in memory by WhatsApp connection status", labels=["status"])
        if worker is not None:
            cache = worker._cache  # noqa: SLF001 - the worker's own state, read-only
            owned = worker.shards
            current = owned.in_flight if owned is not None else 0
            maximum = worker.settings.worker_max_in_flight
            sessions.add_metric([], len(cache))
            states: Tally[str] = Tally()
            statuses: Tally[str] = Tally()
            for session in cache.sessions():  # one pass over up to WORKER_CACHE_MAX_SESSIONS
                states[session.state] += 1
                statuses[session.connection.status] += 1
            for state, count in sorted(states.items()):
                by_state.add_metric([state], count)
            for status, count in sorted(statuses.items()):
                by_status.add_metric([status], count)
            connections.add_metric([], len(worker.connections) if worker.connections is not None else 0)
            in_flight.add_metric([], current)
            limit.add_metric([], maximum)
            utilization.add_metric([], current / maximum)
            shards.add_metric([], len(owned.shards) if owned is not None else 0)
            moves.add_metric([], owned.moves if owned is not None else 0)
        yield from (sessions, by_state, in_flight, limit, utilization, shards, moves, connections, by_status)
