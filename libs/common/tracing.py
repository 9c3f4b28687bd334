"""OpenTelemetry set-up and W3C trace context carried in NATS headers.

No exporter is configured unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific
variable) is set; without one, root spans are not sampled, so tracing costs almost nothing.
With one, the SDK reads the other ``OTEL_*`` variables itself: ``OTEL_EXPORTER_OTLP_HEADERS``,
``_TIMEOUT`` and ``_COMPRESSION``, ``OTEL_TRACES_SAMPLER`` and ``_ARG``, ``OTEL_BSP_*`` (batching),
``OTEL_RESOURCE_ATTRIBUTES``; ``OTEL_TRACES_EXPORTER=none`` turns export off.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.util.types import AttributeValue


def configure_tracing(service_name: str, *, exporter: SpanExporter | None = None, set_global: bool = True, **attributes: str) -> TracerProvider:
    """The process's tracer provider. Tests pass their own ``exporter`` and ``set_global=False``
    (the global provider can be set only once per process) and hand the provider to the app."""
    exporting = exporter is not None or _otlp_endpoint_configured()
    # Without an exporter, new traces are not recorded (spans still get IDs, so logs carry
    # trace_id and W3C context still flows); a caller's sampled traceparent is still honoured.
    # OTEL_TRACES_SAMPLER, when set, decides instead.
    sampler = None if exporting or os.environ.get("OTEL_TRACES_SAMPLER") else ParentBased(ALWAYS_OFF)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name, **attributes}), sampler=sampler)
    if exporting:
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def _otlp_endpoint_configured() -> bool:
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


# Reading or writing ``traceparent`` directly is right only with the SDK's default propagators (read once:
# the SDK itself reads OTEL_PROPAGATORS once, at import).
_DEFAULT_PROPAGATORS = os.environ.get("OTEL_PROPAGATORS", "tracecontext,baggage").replace(" ", "") == "tracecontext,baggage"


def inject_trace_headers(headers: dict[str, str]) -> dict[str, str]:
    """The current trace context as W3C headers: ``traceparent`` (and ``tracestate``, ``baggage``)."""
    if _DEFAULT_PROPAGATORS:
        # The common case (an unsampled trace, no trace state, no baggage) written directly, as
        # the SDK's propagators would write it; they cost about 2 % of the gateway's CPU.
        context = trace.get_current_span().get_span_context()
        if context.is_valid and not context.trace_flags.sampled and not context.trace_state and not baggage.get_all():
            headers["traceparent"] = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
            return headers
    propagate.inject(headers)
    return headers


def extract_trace_context(headers: dict[str, str] | None) -> otel_context.Context:
    return propagate.extract(headers or {})


_RANDOM_TRACE_ID = 0x02  # W3C trace context level 2: the trace ID is random


def _parent_based(tracer: Tracer) -> ParentBased | None:
    real = getattr(tracer, "_tracer", tracer)  # a ProxyTracer hands out the provider's tracer
    sampler = getattr(real, "sampler", None)
    return sampler if isinstance(sampler, ParentBased) else None


def drops_unsampled_children(tracer: Tracer) -> bool:
    """True when ``tracer`` samples parent-based and drops every child of an unsampled remote parent.

    That is the SDK's default (``parentbased_*``) and ours; with any other sampler it is False.
    """
    sampler = _parent_based(tracer)
    return sampler is not None and getattr(sampler, "_remote_parent_not_sampled", None) is ALWAYS_OFF


def unsampled_root_span(tracer: Tracer) -> trace.Span | None:
    """The span ``tracer`` would start for a new trace when its sampler drops every new trace
    (ours without an exporter), built without the sampler and span machinery; else None.

    Like the SDK's, it has fresh random IDs and the random-trace-ID flag, so log lines and the
    requests sent on carry a trace ID all the same.
    """
    sampler = _parent_based(tracer)
    if sampler is None or getattr(sampler, "_root", None) is not ALWAYS_OFF:
        return None
    context = trace.SpanContext(
        random.getrandbits(128) or 1, random.getrandbits(64) or 1, is_remote=False, trace_flags=trace.TraceFlags(_RANDOM_TRACE_ID)
    )
    return trace.NonRecordingSpan(context)


# A W3C trace context; flags "00" or "02" (random trace ID, as the SDK sends) are unsampled.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _unsampled_parent(headers: Mapping[str, str] | None) -> trace.SpanContext | None:
    """The caller's context when it is an unsampled ``traceparent`` alone, read without the
    propagator machinery (about 3 % of a worker's CPU per request); None in every other case."""
    if not headers or "tracestate" in headers or "baggage" in headers:
        return None
    value = headers.get("traceparent")
    match = _TRACEPARENT.fullmatch(value) if value and _DEFAULT_PROPAGATORS else None
    if match is None:
        return None
    trace_id, span_id, flags = int(match[1], 16), int(match[2], 16), int(match[3], 16)
    if not trace_id or not span_id or flags & trace.TraceFlags.SAMPLED:
        return None
    return trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags))


@contextmanager
def consumer_span(
    tracer: Tracer, name: str, headers: Mapping[str, str] | None, attributes: Callable[[], Mapping[str, AttributeValue]]
) -> Iterator[trace.Span]:
    """A CONSUMER span for a message, continuing the trace its headers carry.

    When the sampler would drop the span anyway (inside a trace the sender did not sample, with
    parent-based sampling; or a new trace when new traces are not recorded, our default without
    an exporter), the non-recording span the SDK would have made (same trace ID or a new one, a
    new span ID) is built directly, without the sampler and span machinery (together about 8 %
    of a worker's CPU per request), so log lines and messages sent on still carry the trace.
    ``attributes`` is called only for a span that is recorded.
    """
    dropping = drops_unsampled_children(tracer)
    parent = _unsampled_parent(headers) if dropping else None
    context = None
    if parent is None:
        if headers and ("traceparent" in headers or "baggage" in headers):
            context = extract_trace_context(headers)  # type: ignore[arg-type]
        parent = trace.get_current_span(context).get_span_context() if context is not None else trace.INVALID_SPAN_CONTEXT
    span: trace.Span | None = None
    if not parent.is_valid:
        span = unsampled_root_span(tracer)
    elif dropping and not parent.trace_flags.sampled:
        span = trace.NonRecordingSpan(
            trace.SpanContext(
                parent.trace_id, random.getrandbits(64) or 1, is_remote=False, trace_flags=parent.trace_flags, trace_state=parent.trace_state
            )
        )
    if span is not None:
        token = otel_context.attach(trace.set_span_in_context(span, context))
        try:
            yield span
        finally:
            otel_context.detach(token)
        return
    with tracer.start_as_current_span(name, context=context, kind=SpanKind.CONSUMER, attributes=attributes()) as span:
        yield span


class RecentLinks:
    """Links to recent messages that may cause later work (a hint that leads to a reassignment).

    Kept for ``max_age`` seconds, at most ``limit`` of them; :meth:`take` hands them to the span
    of the work they caused and forgets them.
    """

    def __init__(self, max_age: float, limit: int = 16) -> None:
        self._max_age = max_age
        self._limit = limit
        self._links: list[tuple[float, trace.Link]] = []

    def add(self, link: trace.Link | None) -> None:
        if link is not None:
            self._links = [*self._links[-(self._limit - 1) :], (time.monotonic(), link)]

    def take(self) -> list[trace.Link]:
        oldest = time.monotonic() - self._max_age
        links = [link for at, link in self._links if at >= oldest]
        self._links = []
        return links


def log_ids(span: trace.Span) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of ``span`` for a log line (empty if it has none)."""
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def link_from_headers(headers: dict[str, str] | None, **attributes: str) -> trace.Link | None:
    """A span link to the trace a message came from (its ``traceparent``), if it carried one."""
    if not headers or "traceparent" not in headers:
        return None
    context = trace.get_current_span(extract_trace_context(headers)).get_span_context()
    return trace.Link(context, attributes) if context.is_valid else None
