"""Prometheus metrics move by the right amounts: the gateway's /metrics, each worker's and the
supervisor's METRICS_PORT, scraped over HTTP before and after a known workload."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from sessionmgr.gateway.app import create_app
from tests.conftest import auth
from tests.support.cluster import Cluster, HeartbeatWatch, Servers, nats_client, read_shard_map

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@pytest.fixture
async def metered(isolated_servers: Servers) -> AsyncIterator[tuple[Cluster, HeartbeatWatch]]:
    """A supervisor and two workers with metrics listeners on ports of their own."""
    settings = isolated_servers.settings(drain_timeout=0.5)
    cluster = Cluster(isolated_servers, settings, metrics=True)
    try:
        async with nats_client(isolated_servers.nats_url) as nc:
            watch = await HeartbeatWatch(nc, settings.failure_timeout).start()
            cluster.start_supervisor("supervisor-1")
            names = {cluster.start_worker(), cluster.start_worker()}
            await watch.wait_covered(settings.shard_count, names)
            yield cluster, watch
            await watch.stop()
    finally:
        cluster.stop()


def _url(cluster: Cluster, name: str) -> str:
    return f"http://127.0.0.1:{cluster.metrics_ports[name]}/metrics"


async def _scrape_workers(cluster: Cluster) -> Samples:
    """Every worker's samples summed by series."""
    total: Samples = {}
    for name in cluster.workers:
        for key, v in (await scrape(_url(cluster, name))).items():
            total[key] = total.get(key, 0.0) + v
    return total


async def test_counters_move_by_the_workload(metered: tuple[Cluster, HeartbeatWatch]) -> None:
    cluster, _ = metered
    app = create_app(cluster.settings)
    n = 5
    async with AsyncTestClient(app=app, base_url="http://gateway.local") as api:
        gateway_before = parse((await api.get("/metrics")).text)
        workers_before = await _scrape_workers(cluster)

        headers = auth("metrics-user")
        ids = []
        for _ in range(n):
            created = await api.post("/sessions", json={}, headers=headers)
            assert created.status_code == 201
            ids.append(created.json()["session_id"])
        for sid in ids[:3]:
            ran = await api.post(f"/sessions/{sid}/request", json={"action": "context.incr", "payload": {"key": "n"}}, headers=headers)
            assert ran.status_code == 200
        assert (await api.get("/sessions/no-such-session", headers=headers)).status_code == 404
        assert (await api.post(f"/sessions/{ids[0]}/request", json={"action": "made.up", "payload": {}}, headers=headers)).status_code == 422
        assert (await api.get("/sessions")).status_code == 401
        assert (await api.get("/nowhere")).status_code == 404
        started = await api.post(f"/sessions/{ids[4]}/request", json={"action": "connection.start"}, headers=headers)
        assert started.status_code == 200

        scraped = await api.get("/metrics")
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        gateway = parse(scraped.text)
        assert "/metrics" not in (await api.get("/schema/openapi.json")).json()["paths"]
    workers = await _scrape_workers(cluster)

    def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    http = "sm_http_request_duration_seconds_count"
    assert moved(gateway, gateway_before, http, method="POST", route="/sessions", status_class="2xx") == n
    assert moved(gateway, gateway_before, http, method="POST", route="/sessions/{session_id}/request", status_class="2xx") == 4  # 3 incr, 1 connection.start
    assert moved(gateway, gateway_before, http, route="unmatched", status_class="4xx") == 1
    assert moved(gateway, gateway_before, "sm_http_errors_total", code="session_not_found") == 1
    assert moved(gateway, gateway_before, "sm_http_errors_total", code="unknown_action") == 1
    assert moved(gateway, gateway_before, "sm_http_errors_total", code="unauthorized") == 1
    assert moved(gateway, gateway_before, "sm_http_errors_total", code="not_found") == 1
    assert moved(gateway, gateway_before, "sm_nats_request_duration_seconds_count", op="session.create") == n
    assert moved(gateway, gateway_before, "sm_nats_request_duration_seconds_count", op="context.incr") == 3
    assert moved(gateway, gateway_before, "sm_nats_request_duration_seconds_count", op="unknown") == 1, "made-up actions are not labels"
    assert value(gateway, "sm_nats_request_duration_seconds_count", op="made.up") == 0
    assert value(gateway, "sm_gateway_retries_total") == 0

    handled = "sm_worker_request_duration_seconds_count"
    assert moved(workers, workers_before, handled, op="session.create") == n
    assert moved(workers, workers_before, handled, op="context.incr") == 3
    assert moved(workers, workers_before, handled, op="session.get") == 1
    assert moved(workers, workers_before, handled, op="unknown") == 1
    assert moved(workers, workers_before, handled, op="connection.start") == 1, "WhatsApp actions are known labels"
    assert value(workers, "sm_whatsapp_connections") >= 1
    assert value(workers, "sm_whatsapp_sessions_by_status", status="STOPPED") >= n - 1
    assert sum(value(workers, "sm_whatsapp_sessions_by_status", status=s) for s in ("STARTING", "SCAN_QR_CODE")) >= 1
    assert moved(workers, workers_before, "sm_worker_errors_total", code="session_not_found") == 1
    assert moved(workers, workers_before, "sm_worker_errors_total", code="unknown_action") == 1
    assert moved(workers, workers_before, "sm_redis_duration_seconds_count", command="EVALSHA") >= n + 3
    assert value(workers, "sm_worker_sessions") >= n
    assert value(workers, "sm_worker_sessions_by_state", state="active") >= n
    assert value(workers, "sm_worker_shards") == cluster.settings.shard_count
    assert value(workers, "sm_worker_in_flight") == 0
    assert value(workers, "sm_worker_max_in_flight") == 2 * cluster.settings.worker_max_in_flight
    assert value(workers, "sm_degraded_queue_depth") == 0
    assert value(workers, "sm_worker_shard_moves_total") >= cluster.settings.shard_count


async def test_supervisor_counts_joins_deaths_and_failover_time(metered: tuple[Cluster, HeartbeatWatch]) -> None:
    cluster, watch = metered
    shard_count = cluster.settings.shard_count
    before = await scrape(_url(cluster, "supervisor-1"))
    assert value(before, "sm_supervisor_leader") == 1
    assert value(before, "sm_supervisor_live_workers") == 2
    assert value(before, "sm_shards_unowned") == 0
    assert value(before, "sm_shard_moves_total", reason="join") >= shard_count  # the first assignment, then the rebalance
    assert value(before, "sm_failover_seconds_count") == 0

    victim, survivor = sorted(cluster.workers)
    # Count from the map, the authority: a heartbeat can predate the end of the initial handoffs.
    shard_map = await read_shard_map(watch._nc)  # noqa: SLF001 - the watch's own connection
    lost = sum(1 for entry in shard_map.shards if entry.owner == victim)
    assert lost > 0
    cluster.workers[victim].kill()
    await watch.wait_covered(shard_count, {survivor})

    # The survivor can serve the new map a moment before the supervisor's own bookkeeping has
    # run: scrape until the moves show up (or the deadline says they never will).
    deadline = time.monotonic() + 10
    while True:
        after = await scrape(_url(cluster, "supervisor-1"))
        deaths = value(after, "sm_shard_moves_total", reason="death") - value(before, "sm_shard_moves_total", reason="death")
        if deaths >= lost or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert value(after, "sm_shard_moves_total", reason="death") - value(before, "sm_shard_moves_total", reason="death") == lost
    assert value(after, "sm_failover_seconds_count") == 1
    assert 0 <= value(after, "sm_failover_seconds_sum") < 5
    assert value(after, "sm_supervisor_live_workers") == 1
    assert value(after, "sm_shards_unowned") == 0


async def test_metrics_listener_answers_only_metrics(metered: tuple[Cluster, HeartbeatWatch]) -> None:
    cluster, _ = metered
    name = next(iter(cluster.workers))
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(f"http://127.0.0.1:{cluster.metrics_ports[name]}/other")).status_code == 404
        assert (await client.post(_url(cluster, name))).status_code == 405
        head = await client.head(_url(cluster, name))
    assert head.status_code == 200 and head.content == b""
