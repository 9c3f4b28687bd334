"""Operator CLI (sm-admin) against a real cluster, and the gateway's deadline when nobody answers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from litestar.testing import AsyncTestClient

from sessionmgr.common import natsauth
from sessionmgr.gateway.app import create_app
from tests.conftest import auth
from tests.support.cluster import env_for, read_shard_map


async def sm_admin(settings, *args: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sessionmgr.supervisor.cli", *args,
        env={**os.environ, **env_for(settings), **natsauth.role_env("cli")},  # nats.conf's operator user
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_cli_lists_workers_and_map_then_drains_and_moves(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=3)
    settings = cluster.settings
    code, out = await sm_admin(settings, "workers", "--json")
    assert code == 0, out
    status = json.loads(out)
    listed = {w["worker_id"]: w for w in status["workers"]}
    assert set(listed) == set(cluster.workers)
    for wid, info in listed.items():
        assert info["pid"] == cluster.workers[wid].pid and info["live"] is True
    assert sum(len(w["shards"]) for w in listed.values()) == settings.shard_count

    code, out = await sm_admin(settings, "workers")
    assert code == 0 and "LAST BEAT" in out and all(w in out for w in cluster.workers)
    code, out = await sm_admin(settings, "map")
    assert code == 0 and out.count("\n") >= settings.shard_count

    drained = sorted(cluster.workers)[0]
    before = await read_shard_map(nc)
    code, out = await sm_admin(settings, "drain", drained)
    assert code == 0, out
    others = set(cluster.workers) - {drained}
    await watch.wait_covered(settings.shard_count, others)
    after = await read_shard_map(nc)
    assert drained in after.drained
    for index, (a, b) in enumerate(zip(before.shards, after.shards, strict=True)):
        if a.owner == drained:
            assert b.owner in others and b.previous == drained, index
        else:
            assert (a.owner, a.epoch) == (b.owner, b.epoch), index
    assert cluster.workers[drained].alive(), "drain keeps the process running"

    target = sorted(others)[0]
    shard = next(i for i, e in enumerate(after.shards) if e.owner != target)
    code, out = await sm_admin(settings, "move", str(shard), target)
    assert code == 0, out
    await watch.wait_until(lambda live: target in live and shard in live[target].shards, what=f"shard {shard} on {target}")
    moved = await read_shard_map(nc)
    assert moved.shards[shard].owner == target and moved.shards[shard].epoch == after.shards[shard].epoch + 1
    assert sum(1 for a, b in zip(after.shards, moved.shards, strict=True) if a.owner != b.owner) == 1

    code, out = await sm_admin(settings, "move", "9999", target)
    assert code == 1 and "shard must be" in out
    code, _ = await sm_admin(settings, "drain", drained, "--undo")
    assert code == 0
    await watch.wait_until(lambda live: drained in live and live[drained].shards, what="undrained worker owning shards")


async def test_no_worker_means_503_with_retry_after_within_the_deadline(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=1, request_timeout=1.5, request_attempt_timeout=0.5)
    headers = auth("lonely")
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        created = await api.post("/sessions", headers=headers)
        assert created.status_code == 201
        sid = created.json()["session_id"]
        for proc in cluster.workers.values():
            proc.kill()
        started = time.monotonic()
        response = await api.get(f"/sessions/{sid}", headers=headers)
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.headers["content-type"].startswith("application/problem+json")
        assert elapsed < cluster.settings.request_timeout + 1.0, elapsed
        # The request outlived the failure window, so the gateway knows no worker is alive.
        assert elapsed > cluster.settings.failure_timeout
        ready = await api.get("/readyz")
        assert ready.status_code == 503 and "heartbeat" in ready.json()["detail"]

        # A worker coming back serves the session again: nothing was lost.
        # Wait for the new worker by name: the dead one's last heartbeat still counts for a moment.
        newcomer = cluster.start_worker()
        await watch.wait_covered(cluster.settings.shard_count, {newcomer})
        again = await api.get(f"/sessions/{sid}", headers=headers)
        assert again.status_code == 200 and again.json()["session_id"] == sid, again.text
