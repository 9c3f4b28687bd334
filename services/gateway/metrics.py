"""The gateway's Prometheus metrics and its ``GET /metrics`` route (no auth, not in the schema).

| metric | labels | what |
|---|---|---|
| ``sm_http_request_duration_seconds`` | ``method``, ``route``, ``status_class`` | every HTTP request, by route template |
| ``sm_http_errors_total`` | ``code`` | error responses by problem+json ``code`` |
| ``sm_nats_request_duration_seconds`` | ``op`` | NATS request to a worker until its answer, retries included |
| ``sm_gateway_retries_total`` | ``reason`` | NATS attempts retried: ``no_responders``, ``timeout``, or the worker's retryable code |
"""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from prometheus_client import CollectorRegistry, Counter, Histogram

from sessionmgr.common import subjects
from sessionmgr.common.errors import NotOwnerError, ServiceUnavailableError, StorageUnavailableError
from sessionmgr.common.metrics import CONTENT_TYPE, OTHER, REQUEST_BUCKETS, LabelCache, new_registry, render, safe_code, status_class

UNMATCHED_ROUTE = "unmatched"
UNKNOWN_OP = "unknown"
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_RETRY_REASONS = ("no_responders", "timeout", NotOwnerError.code, StorageUnavailableError.code, ServiceUnavailableError.code)
_KNOWN_OPS = (*sorted(subjects.SESSION_OPS), "session.list")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        self.http_duration = Histogram(
            "sm_http_request_duration_seconds",
            "HTTP requests served by the gateway, by method, route template and status class",
            ["method", "route", "status_class"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.http_errors = Counter(
            "sm_http_errors", "HTTP error responses by problem+json code", ["code"], registry=self.registry
        )
        self.nats_duration = Histogram(
            "sm_nats_request_duration_seconds",
            "NATS requests from the gateway to a worker until the answer (retries included), by operation",
            ["op"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "sm_gateway_retries", "NATS request attempts the gateway retried, by reason", ["reason"], registry=self.registry
        )
        self._http: dict[tuple[str, str, str], Any] = {}
        self._errors: LabelCache[Any] = LabelCache(lambda c: self.http_errors.labels(code=c), limit=64)
        # Action names come from clients: only names a worker accepted become label values.
        self._ops: LabelCache[Any] = LabelCache(lambda op: self.nats_duration.labels(op=op), limit=64, preset=(*_KNOWN_OPS, UNKNOWN_OP))
        self._retries: LabelCache[Any] = LabelCache(lambda r: self.retries.labels(reason=r), limit=16, preset=_RETRY_REASONS)

    def observe_http(self, method: str, route: str, status: int, seconds: float, error_code: str | None) -> None:
        key = (method, route, status_class(status))
        child = self._http.get(key)
        if child is None:
            if method not in _METHODS:
                key = (OTHER, route, key[2])
            child = self._http.get(key)
            if child is None:
                # Routes are templates from our own handlers (plus "unmatched"), so this stays small.
                child = self._http[key] = self.http_duration.labels(method=key[0], route=key[1], status_class=key[2])
        child.observe(seconds)
        if status >= 400:
            self._errors[safe_code(error_code)].inc()

    def observe_nats(self, op: str, seconds: float, *, known_op: bool) -> None:
        self._ops[op if known_op else UNKNOWN_OP].observe(seconds)

    def count_retry(self, reason: str) -> None:
        self._retries[reason].inc()


def metrics_route(metrics: GatewayMetrics) -> HTTPRouteHandler:
    """``GET /metrics`` for this app's registry: Prometheus text format, no auth, not in OpenAPI."""

    @get("/metrics", include_in_schema=False, sync_to_thread=False, name="metrics")
    def scrape_metrics() -> Response[bytes]:
        return Response(render(metrics.registry), media_type=CONTENT_TYPE)

    return scrape_metrics
