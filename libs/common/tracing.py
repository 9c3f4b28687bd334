"""OpenTelemetry set-up and W3C trace context carried in NATS headers.

No exporter is configured unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific
variable) is set, so an unconfigured deployment pays for span objects but never for export.
"""

from __future__ import annotations

import os

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def configure_tracing(service_name: str, **attributes: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service_name, **attributes}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def inject_trace_headers(headers: dict[str, str]) -> dict[str, str]:
    propagate.inject(headers)
    return headers


def extract_trace_context(headers: dict[str, str] | None) -> otel_context.Context:
    return propagate.extract(headers or {})
