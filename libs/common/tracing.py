"""OpenTelemetry set-up and W3C trace context carried in NATS headers.

No exporter is configured unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific
variable) is set; without one, root spans are not sampled, so tracing costs almost nothing.
"""

from __future__ import annotations

import os

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased


def configure_tracing(service_name: str, **attributes: str) -> TracerProvider:
    exporting = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    # Without an exporter, new traces are not recorded (spans still get IDs, so logs carry
    # trace_id and W3C context still flows); a caller's sampled traceparent is still honoured.
    # OTEL_TRACES_SAMPLER, when set, decides instead.
    sampler = None if exporting or os.environ.get("OTEL_TRACES_SAMPLER") else ParentBased(ALWAYS_OFF)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name, **attributes}), sampler=sampler)
    if exporting:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def inject_trace_headers(headers: dict[str, str]) -> dict[str, str]:
    propagate.inject(headers)
    return headers


def extract_trace_context(headers: dict[str, str] | None) -> otel_context.Context:
    return propagate.extract(headers or {})
