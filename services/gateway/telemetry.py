"""Per HTTP request: a server span, the request metrics and one canonical log line.

:func:`instrument_http` wraps the app's whole ASGI handler (outside Litestar's router), so
router 404/405s and errors raised anywhere are measured too. The server span joins the caller's
trace when it sends ``traceparent``; probes and scrapes (``/healthz``, ``/readyz``, ``/metrics``)
are measured but not traced, and their log line is at debug level.

The request ID is the one the route sends to the worker (``Sm-Request-Id``), so every line
either side logs for the request shares it; :class:`RequestContext` carries it (and the session
ID, and the ID of the worker that answered) from :meth:`WorkerClient.call
<sessionmgr.gateway.workers.WorkerClient.call>` back here. This line is the request's canonical
one: the worker logs its own ``request_handled`` only at debug level (``Sm-Logged-By``).
Requests that reach no worker get one of their own. It is returned as ``X-Request-Id``.
Headers are never logged: the Authorization header and its token stay out of the logs.
"""

from __future__ import annotations

from contextvars import ContextVar
from time import perf_counter
from typing import Any

import msgspec
import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from sessionmgr.common.ids import is_valid_session_id, new_request_id
from sessionmgr.common.tracing import unsampled_root_span
from sessionmgr.gateway.metrics import UNMATCHED_ROUTE, GatewayMetrics

log = structlog.get_logger("sessionmgr.gateway.requests")

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_TRACE_HEADERS = (b"traceparent", b"tracestate")
_NO_PARENT = otel_context.Context()  # what extracting from a request without trace headers gives


class RequestContext:
    """What the handlers learn about the request that the canonical line needs."""

    __slots__ = ("request_id", "session_id", "worker_id", "_log_tokens")

    def __init__(self) -> None:
        self.request_id: str | None = None
        self.session_id: str | None = None
        self.worker_id: str | None = None  # the worker that answered (the reply's Sm-Worker)
        self._log_tokens: dict[str, Any] | None = None

    def adopt(self, request_id: str, session_id: str | None) -> None:
        """The first call to a worker names the request; later log lines of it carry the IDs."""
        if self.request_id is None:
            self.request_id = request_id
        if session_id is not None and self.session_id is None:
            self.session_id = session_id
        if self._log_tokens is None:
            bound = {"request_id": self.request_id, **({"session_id": self.session_id} if self.session_id else {})}
            self._log_tokens = structlog.contextvars.bind_contextvars(**bound)

    def ensure_request_id(self) -> str:
        if self.request_id is None:
            self.request_id = new_request_id()
        return self.request_id

    def unbind(self) -> None:
        if self._log_tokens is not None:
            try:
                structlog.contextvars.reset_contextvars(**self._log_tokens)
            except ValueError:  # bound in another context (a handler run in its own task): nothing leaked here
                pass
            self._log_tokens = None


_current: ContextVar[RequestContext | None] = ContextVar("sm_gateway_request", default=None)


def current_request() -> RequestContext | None:
    return _current.get()


class _ProblemCode(msgspec.Struct):
    code: str = ""


_problem_decoder = msgspec.json.Decoder(_ProblemCode)


def _error_code(body: bytes, status: int) -> str:
    try:
        code = _problem_decoder.decode(body).code
    except (msgspec.DecodeError, msgspec.ValidationError):
        code = ""
    return code or f"http_{status}"


def instrument_http(
    app: ASGIApp, *, metrics: GatewayMetrics, tracer: Tracer, response_headers: dict[str, str] | None = None
) -> ASGIApp:
    """``response_headers`` are added to every response that does not set them itself.

    Here rather than in a Litestar ``before_send`` hook: that hook wraps ``send`` a second time
    for every request, and this wrapper already sees every response (router 404/405s included).
    """
    extra_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (response_headers or {}).items()]

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = perf_counter()
        method: str = scope.get("method", "GET")
        path: str = scope.get("path", "")
        quiet = path in QUIET_PATHS
        ctx = RequestContext()
        token = _current.set(ctx)
        status = 500  # if the app fails before answering
        error_code: str | None = None
        span = None
        if not quiet:
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ()) if k in _TRACE_HEADERS}
            span = None if carrier else unsampled_root_span(tracer)
            if span is None:
                span = tracer.start_span(
                    method,  # renamed "<method> <route>" once routing has found the route
                    context=propagate.extract(carrier) if carrier else _NO_PARENT,
                    kind=SpanKind.SERVER,
                    attributes={"http.request.method": method, "url.path": path},
                )

        async def send_wrapper(message: Message) -> None:
            nonlocal status, error_code
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if extra_headers:
                    present = {name.lower() for name, _ in headers}
                    headers.extend(pair for pair in extra_headers if pair[0] not in present)
                headers.append((b"x-request-id", ctx.ensure_request_id().encode()))
                message["headers"] = headers  # type: ignore[typeddict-unknown-key]
            elif message["type"] == "http.response.body" and status >= 400 and error_code is None:
                error_code = _error_code(message.get("body", b""), status)
            await send(message)

        try:
            if span is None:
                await app(scope, receive, send_wrapper)
            else:
                with trace.use_span(span, end_on_exit=False, record_exception=True, set_status_on_exception=True):
                    await app(scope, receive, send_wrapper)
        finally:
            duration = perf_counter() - started
            route: str = scope.get("path_template") or UNMATCHED_ROUTE
            if status >= 400 and error_code is None:
                error_code = f"http_{status}"
            metrics.observe_http(method, route, status, duration, error_code)
            span_context = None
            if span is not None:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, error_code))
                span.end()
                span_context = span.get_span_context()
            session_id = ctx.session_id
            if session_id is None:
                candidate = scope.get("path_params", {}).get("session_id")
                session_id = candidate if isinstance(candidate, str) and is_valid_session_id(candidate) else None
            fields: dict[str, Any] = {
                "method": method,
                "route": route,
                "status": status,
                "outcome": "ok" if status < 400 else "error",
                "error_code": error_code,
                "duration_ms": round(duration * 1000, 2),
                "request_id": ctx.ensure_request_id(),
            }
            if session_id is not None:
                fields["session_id"] = session_id
            if ctx.worker_id is not None:
                fields["worker_id"] = ctx.worker_id
            if span_context is not None and span_context.is_valid:
                fields["trace_id"] = format(span_context.trace_id, "032x")
                fields["span_id"] = format(span_context.span_id, "016x")
            (log.debug if quiet else log.info)("request_handled", **fields)
            ctx.unbind()
            _current.reset(token)

    return handle
