"""Canonical log lines: one per request, written where it entered (the gateway for REST, the
worker for a request sent straight over NATS), carrying the request, trace, session and worker
IDs, never the token."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import structlog
from litestar.testing import AsyncTestClient

from sessionmgr.common.tracing import configure_tracing
from sessionmgr.gateway.app import create_app
from tests.conftest import token_for
from tests.support.cluster import Cluster, nats_client


async def _worker_line(cluster: Cluster, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The worker's request_handled line for ``request_id``. It is written just after the reply
    is sent, so the file is re-read until it shows up."""
    deadline = time.monotonic() + timeout
    while True:
        for name in cluster.workers:
            for line in cluster.log_text(name).splitlines():
                if request_id in line and '"request_handled"' in line:
                    return json.loads(line)
        assert time.monotonic() < deadline, f"no worker logged request_handled for {request_id}"
        await asyncio.sleep(0.02)


async def test_each_request_gets_one_canonical_line_where_it_entered(cluster: Cluster, user: str) -> None:
    token = token_for(user)
    headers = {"Authorization": f"Bearer {token}"}
    # No exporter: nothing is sampled, yet spans have IDs, so logs still correlate by trace_id.
    app = create_app(cluster.settings, tracer_provider=configure_tracing("logs-gateway", set_global=False))
    async with AsyncTestClient(app=app, base_url="http://gateway.local") as api:
        created = await api.post("/sessions", json={}, headers=headers)
        sid = created.json()["session_id"]
        with structlog.testing.capture_logs() as logs:
            ran = await api.post(f"/sessions/{sid}/request", json={"action": "context.incr", "payload": {"key": "n"}}, headers=headers)
            denied = await api.get(f"/sessions/{sid}", headers={"Authorization": f"Bearer {token}x"})
    assert ran.status_code == 200 and denied.status_code == 401

    lines = [entry for entry in logs if entry["event"] == "request_handled"]
    assert len(lines) == 2, logs
    ok, rejected = lines
    assert ok["route"] == "/sessions/{session_id}/request" and ok["method"] == "POST"
    assert ok["status"] == 200 and ok["outcome"] == "ok" and ok["error_code"] is None
    assert ok["session_id"] == sid
    assert ok["duration_ms"] > 0
    assert len(ok["trace_id"]) == 32 and len(ok["span_id"]) == 16
    assert ok["request_id"] == ran.json()["request_id"] == ran.headers["x-request-id"], "one request ID, end to end"
    assert rejected["status"] == 401 and rejected["error_code"] == "unauthorized" and rejected["outcome"] == "error"
    assert rejected["request_id"] == denied.headers["x-request-id"]

    assert ok["worker_id"] in cluster.workers, "the gateway's line names the worker that answered"

    # Straight over NATS the worker is the edge: it writes the line, in the caller's trace.
    trace_id = "5" * 32
    async with nats_client(cluster.servers.nats_url) as nc:
        direct = await nc.request(
            f"sessions.{sid}.context.incr", b'{"key": "n"}', timeout=5,
            headers={"Sm-Request-Id": "direct-nats-1", "traceparent": f"00-{trace_id}-{'6' * 16}-00"},
        )  # fmt: skip
        refused = await nc.request(f"sessions.{sid}.no.such", b"{}", timeout=5)
    assert direct.headers and direct.headers.get("Sm-Worker") == ok["worker_id"], "replies name their worker"
    assert refused.headers and refused.headers.get("Sm-Error") and refused.headers.get("Sm-Worker") == ok["worker_id"], "errors too"
    worker = await _worker_line(cluster, "direct-nats-1")
    assert worker["service"] == "worker" and worker["worker_id"] == ok["worker_id"]
    assert worker["session_id"] == sid and worker["op"] == "context.incr"
    assert worker["outcome"] == "ok" and worker["error_code"] is None and worker["duration_ms"] > 0
    assert worker["trace_id"] == trace_id, "the worker's line is in the caller's trace"
    assert len(worker["span_id"]) == 16
    # The worker logs in order, so by now it would have written a line for the gateway's request.
    worker_log = cluster.log_text(ok["worker_id"])
    assert ok["request_id"] not in worker_log, "a request from the gateway is logged once, by the gateway"

    everything = json.dumps(logs, default=str) + "".join(cluster.log_text(name) for name in cluster.workers)
    assert token not in everything and "Bearer" not in everything
    assert "authorization" not in everything.lower()
