"""One API request is one trace: gateway server span -> NATS producer span -> worker consumer
span -> Redis client spans, exported over OTLP/HTTP to a receiver started by the test.

The worker and supervisor processes export because their environment names the receiver
(``OTEL_EXPORTER_OTLP_ENDPOINT``); the in-process gateway gets its own exporting provider.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from litestar.testing import AsyncTestClient
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from sessionmgr.common.hashing import shard_for
from sessionmgr.common.tracing import configure_tracing
from sessionmgr.gateway.app import create_app
from tests.conftest import auth
from tests.support.cluster import Cluster, HeartbeatWatch, Servers, nats_client
from tests.support.otlp import OtlpReceiver, ReceivedSpan

GATEWAY = "session-manager-gateway"
WORKER = "session-manager-worker"


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[OtlpReceiver]:
    otlp = OtlpReceiver().start()
    try:
        yield otlp
    finally:
        otlp.stop()


@pytest.fixture(scope="module")
async def traced_cluster(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> AsyncIterator[Cluster]:
    """Servers, a supervisor and a worker of this module's own, exporting to ``receiver``."""
    servers = Servers(root=tmp_path_factory.mktemp("traced")).start()
    settings = servers.settings(drain_timeout=0.5)
    cluster = Cluster(
        servers,
        settings,
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms instead of 5 s
        },
    )
    try:
        cluster.start_supervisor()
        names = {cluster.start_worker()}
        async with nats_client(servers.nats_url) as nc:
            watch = await HeartbeatWatch(nc, settings.failure_timeout).start()
            await watch.wait_covered(settings.shard_count, names)
            await watch.stop()
        yield cluster
    finally:
        cluster.stop()
        servers.stop()


def _one(spans: list[ReceivedSpan], **where: str) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in where.items())]
    assert len(found) == 1, f"expected one span with {where}, got {found}"
    return found[0]


async def test_an_api_request_is_one_trace_across_gateway_worker_and_redis(traced_cluster: Cluster, receiver: OtlpReceiver) -> None:
    provider = configure_tracing(GATEWAY, exporter=OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"), set_global=False)
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    try:
        app = create_app(traced_cluster.settings, tracer_provider=provider)
        async with AsyncTestClient(app=app, base_url="http://gateway.local") as client:
            created = await client.post(
                "/sessions",
                json={"metadata": {"bot": "trace"}},
                headers={**auth("tracer"), "traceparent": f"00-{trace_id}-{caller_span}-01"},
            )
        assert created.status_code == 201, created.text
        provider.force_flush()

        def complete(spans: list[ReceivedSpan]) -> bool:
            ours = [s for s in spans if s.trace_id == trace_id]
            return (
                any(s.service == GATEWAY and s.kind == "SERVER" for s in ours)
                and any(s.service == GATEWAY and s.kind == "PRODUCER" for s in ours)
                and any(s.service == WORKER and s.kind == "CONSUMER" for s in ours)
                and any(s.service == WORKER and s.kind == "CLIENT" and "db.operation.name" in s.attributes for s in ours)
            )

        spans = [s for s in await receiver.wait_for(complete, what="the request's spans") if s.trace_id == trace_id]
    finally:
        provider.shutdown()

    server = _one(spans, service=GATEWAY, kind="SERVER")
    producer = _one(spans, service=GATEWAY, kind="PRODUCER")
    consumer = _one(spans, service=WORKER, kind="CONSUMER")
    assert server.parent_span_id == caller_span, "the gateway joins the caller's trace"
    assert server.name == "POST /sessions" and server.attributes["http.route"] == "/sessions"
    assert server.attributes["http.response.status_code"] == 201
    assert producer.parent_span_id == server.span_id
    assert producer.attributes["sm.op"] == "session.create"
    assert consumer.parent_span_id == producer.span_id, "the worker continues the trace from the NATS headers"
    assert consumer.attributes["sm.op"] == "session.create"

    redis_spans = [s for s in spans if s.service == WORKER and s.kind == "CLIENT"]
    assert redis_spans and all(s.attributes.get("db.system") == "redis" for s in redis_spans)
    assert all(s.parent_span_id == consumer.span_id for s in redis_spans), "Redis client spans hang off the consumer span, never nested"
    assert any(s.name == "redis ZADD" for s in redis_spans), [s.name for s in redis_spans]


async def test_a_direct_nats_request_with_traceparent_joins_the_callers_trace(traced_cluster: Cluster, receiver: OtlpReceiver) -> None:
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    async with nats_client(traced_cluster.servers.nats_url) as nc:
        reply = await nc.request(
            "sessions.traced-nats-1.session.create",
            b'{"user_id": "nats-user"}',
            timeout=5,
            headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
        )
    assert not (reply.headers or {}).get("Nats-Service-Error-Code"), reply.headers
    spans = await receiver.wait_for(
        lambda spans: any(s.trace_id == trace_id and s.kind == "CONSUMER" for s in spans), what="the worker's consumer span"
    )
    consumer = _one(spans, trace_id=trace_id, kind="CONSUMER")
    assert consumer.parent_span_id == caller_span
    assert consumer.service == WORKER


async def test_the_supervisor_traces_reassignments(traced_cluster: Cluster, receiver: OtlpReceiver) -> None:
    """The initial assignment (and every later move) is a ``supervisor.reassign`` span."""
    spans = await receiver.wait_for(lambda spans: any(s.name == "supervisor.reassign" for s in spans), what="a reassignment span")
    reassign = next(s for s in spans if s.name == "supervisor.reassign")
    assert reassign.service == "session-manager-supervisor"
    assert reassign.attributes["sm.moved"] >= 1
    assert reassign.attributes.get("sm.moves.join", 0) >= 1


async def test_a_reassignment_links_to_the_request_that_found_no_responders(isolated_servers: Servers, receiver: OtlpReceiver) -> None:
    """Kill a worker, ask for a session on one of its shards: the gateway's "no responders" hint
    carries the request's trace context, and the supervisor's reassignment span links to it."""
    # A slow heartbeat so the hint, not a late heartbeat, is what exposes the dead worker.
    settings = isolated_servers.settings(heartbeat_interval=1.0, heartbeat_misses=3, drain_timeout=0.5)
    cluster = Cluster(isolated_servers, settings, extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"})
    provider = configure_tracing(GATEWAY, exporter=OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"), set_global=False)
    try:
        cluster.start_supervisor()
        names = {cluster.start_worker(), cluster.start_worker()}
        async with nats_client(isolated_servers.nats_url) as nc:
            watch = await HeartbeatWatch(nc, settings.failure_timeout).start()
            await watch.wait_covered(settings.shard_count, names)
            victim = sorted(names)[0]
            victim_shards = set(watch.live()[victim].shards)
            await watch.stop()
        session_id = next(sid for sid in (f"hinted-{i}" for i in range(10_000)) if shard_for(sid, settings.shard_count) in victim_shards)
        cluster.workers[victim].kill()

        trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
        app = create_app(settings, tracer_provider=provider)
        async with AsyncTestClient(app=app, base_url="http://gateway.local") as client:
            got = await client.get(f"/sessions/{session_id}", headers={**auth("hinter"), "traceparent": f"00-{trace_id}-{caller_span}-01"})
        assert got.status_code == 404, got.text  # answered by the new owner
        provider.force_flush()

        spans = await receiver.wait_for(
            lambda spans: any(s.name == "supervisor.reassign" and any(t == trace_id for t, _ in s.links) for s in spans),
            what="a reassignment span linked to the request",
        )
    finally:
        provider.shutdown()
        cluster.stop()
    producer = _one(spans, trace_id=trace_id, kind="PRODUCER")
    reassign = next(s for s in spans if s.name == "supervisor.reassign" and any(t == trace_id for t, _ in s.links))
    assert (trace_id, producer.span_id) in reassign.links
    assert reassign.attributes["sm.moves.death"] == len(victim_shards)
