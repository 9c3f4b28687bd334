"""Trace context without the SDK's machinery where it would be dropped: a worker's consumer span
continues the caller's trace whichever way the context is read; a gateway's new unsampled trace."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sessionmgr.common import tracing
from sessionmgr.common.tracing import configure_tracing, consumer_span, unsampled_root_span

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Collect(SpanExporter):
    def __init__(self) -> None:
        self.spans: list = []  # type: ignore[type-arg]

    def export(self, spans):  # type: ignore[no-untyped-def]
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": f"00-{TRACE_ID}-{PARENT}-00"},  # read directly
        {"traceparent": f"00-{TRACE_ID}-{PARENT}-02"},  # random trace ID flag, as the SDK sends it
        {"traceparent": f"00-{TRACE_ID}-{PARENT}-00", "tracestate": "vendor=1"},  # read by the propagator
    ],
    ids=["plain", "random-trace-id-flag", "with-tracestate"],
)
def test_an_unsampled_caller_gets_a_non_recording_span_in_its_trace(headers: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    tracer = configure_tracing("test", set_global=False).get_tracer("t")  # no exporter: parent-based, off
    if "tracestate" not in headers:  # the common case skips the propagator altogether
        monkeypatch.setattr(tracing, "extract_trace_context", lambda _: pytest.fail("took the slow path"))
    with consumer_span(tracer, "op", headers, dict) as span:
        context = span.get_span_context()
        assert not span.is_recording()
        assert format(context.trace_id, "032x") == TRACE_ID
        assert context.is_valid and format(context.span_id, "016x") != PARENT
        assert context.trace_flags == int(headers["traceparent"][-2:], 16), "the caller's flags travel on"
    if "tracestate" in headers:
        assert context.trace_state.get("vendor") == "1", "the caller's tracestate travels on"


@pytest.mark.parametrize("traceparent", ["00-" + "0" * 32 + f"-{PARENT}-00", f"00-{TRACE_ID.upper()}-{PARENT}-00", "garbage"])
def test_an_invalid_traceparent_starts_no_trace_of_the_callers(traceparent: str) -> None:
    tracer = configure_tracing("test", set_global=False).get_tracer("t")
    with consumer_span(tracer, "op", {"traceparent": traceparent}, dict) as span:
        assert format(span.get_span_context().trace_id, "032x") != TRACE_ID.lower()
        assert not span.is_recording()


def test_a_sampled_caller_gets_a_recorded_child_span() -> None:
    exporter = Collect()
    provider = configure_tracing("test", exporter=exporter, set_global=False)
    with consumer_span(provider.get_tracer("t"), "op", {"traceparent": f"00-{TRACE_ID}-{PARENT}-01"}, lambda: {"sm.op": "x"}) as span:
        assert span.is_recording()
    provider.force_flush()
    (recorded,) = exporter.spans
    assert format(recorded.context.trace_id, "032x") == TRACE_ID
    assert format(recorded.parent.span_id, "016x") == PARENT


def test_a_new_trace_that_is_not_exported_gets_fresh_ids_without_a_recorded_span() -> None:
    tracer = configure_tracing("test", set_global=False).get_tracer("t")
    first, second = unsampled_root_span(tracer), unsampled_root_span(tracer)
    assert first is not None and second is not None
    assert not first.is_recording() and first.get_span_context().is_valid
    assert first.get_span_context().trace_id != second.get_span_context().trace_id
    assert not first.get_span_context().trace_flags.sampled


def test_with_an_exporter_new_traces_are_left_to_the_sdk() -> None:
    tracer = configure_tracing("test", exporter=Collect(), set_global=False).get_tracer("t")
    assert unsampled_root_span(tracer) is None


def test_a_message_without_trace_context_starts_a_new_unrecorded_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    tracer = configure_tracing("test", set_global=False).get_tracer("t")
    monkeypatch.setattr(tracing, "extract_trace_context", lambda _: pytest.fail("nothing to extract"))
    with consumer_span(tracer, "op", {"Sm-User": "alice"}, dict) as first, consumer_span(tracer, "op", None, dict) as second:
        assert not first.is_recording() and first.get_span_context().is_valid
        assert first.get_span_context().trace_id != second.get_span_context().trace_id


def test_without_trace_context_and_an_exporter_the_message_gets_a_recorded_root_span() -> None:
    exporter = Collect()
    provider = configure_tracing("test", exporter=exporter, set_global=False)
    with consumer_span(provider.get_tracer("t"), "op", {}, dict) as span:
        assert span.is_recording()
    provider.force_flush()
    (recorded,) = exporter.spans
    assert recorded.parent is None


@pytest.mark.parametrize("case", ["unsampled", "sampled", "baggage", "tracestate"])
def test_injected_headers_are_what_the_sdk_propagators_write(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import baggage, context, propagate, trace

    parent = trace.SpanContext(int(TRACE_ID, 16), int(PARENT, 16), is_remote=False, trace_flags=trace.TraceFlags(0x03 if case == "sampled" else 0x02))
    if case == "tracestate":
        parent = trace.SpanContext(parent.trace_id, parent.span_id, False, parent.trace_flags, trace.TraceState([("vendor", "1")]))
    ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    if case == "baggage":
        ctx = baggage.set_baggage("tenant", "a", context=ctx)
    if case == "unsampled":  # the common case writes traceparent itself
        monkeypatch.setattr(propagate, "inject", lambda *_, **__: pytest.fail("took the slow path"))
    token = context.attach(ctx)
    try:
        ours = tracing.inject_trace_headers({})
        monkeypatch.undo()
        sdk: dict[str, str] = {}
        propagate.inject(sdk)
    finally:
        context.detach(token)
    assert ours == sdk and ours["traceparent"].startswith(f"00-{TRACE_ID}-{PARENT}-")
