"""A worker killed with SIGKILL loses nothing: another worker serves its sessions, state intact."""

from __future__ import annotations

import asyncio

from litestar.testing import AsyncTestClient

from sessionmgr.common.hashing import shard_for
from sessionmgr.gateway.app import create_app
from tests.conftest import auth
from tests.support.cluster import read_shard_map


async def test_sigkill_worker_sessions_served_elsewhere_with_state(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=2)
    headers = auth("alice")
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        sessions = []
        for _ in range(12):
            created = await api.post("/sessions", headers=headers)
            assert created.status_code == 201
            sid = created.json()["session_id"]
            for _ in range(3):
                r = await api.post(f"/sessions/{sid}/request", json={"action": "context.incr", "payload": {"key": "n"}}, headers=headers)
                assert r.status_code == 200, r.text
            sessions.append(sid)

        shard_map = await read_shard_map(nc)
        victim = shard_map.shards[shard_for(sessions[0], cluster.settings.shard_count)].owner
        assert victim in cluster.workers
        survivor = next(w for w in cluster.workers if w != victim)
        cluster.workers[victim].kill()

        # The gateway retries through the failover window; no client-visible error.
        results = await asyncio.gather(*(api.get(f"/sessions/{sid}", headers=headers) for sid in sessions))
        for sid, response in zip(sessions, results, strict=True):
            assert response.status_code == 200, (sid, response.text)
            assert response.json()["context"] == {"n": 3}
            assert response.json()["version"] == 4

        await watch.wait_covered(cluster.settings.shard_count, {survivor})
        after = await read_shard_map(nc)
        for index, (old, new) in enumerate(zip(shard_map.shards, after.shards, strict=True)):
            if old.owner == victim:
                assert new.owner == survivor and new.epoch == old.epoch + 1, index
            else:
                assert new == old, f"shard {index} moved though its owner lived"

        # And it keeps taking writes.
        r = await api.post(f"/sessions/{sessions[0]}/request", json={"action": "context.incr", "payload": {"key": "n"}}, headers=headers)
        assert r.status_code == 200 and r.json()["result"]["value"] == 4
