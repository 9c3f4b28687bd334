"""Chaos under load: real worker processes killed, paused and added; nothing acknowledged is lost."""

from __future__ import annotations

import signal

import pytest
from litestar.testing import AsyncTestClient

from sessionmgr.common.hashing import rendezvous_owner
from sessionmgr.gateway.app import create_app
from tests.conftest import auth
from tests.support.cluster import read_shard_map
from tests.support.load import IncrementLoad, assert_exactly_once

pytestmark = pytest.mark.slow
HEADERS = auth("chaos-user")


async def _sessions(api, count: int = 24) -> list[str]:  # type: ignore[no-untyped-def]
    ids = []
    for _ in range(count):
        response = await api.post("/sessions", headers=HEADERS)
        assert response.status_code == 201
        ids.append(response.json()["session_id"])
    return ids


async def test_sigkill_one_of_four_workers_under_load(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=4)
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        sessions = await _sessions(api)
        before = await read_shard_map(nc)
        victim = sorted(cluster.workers)[0]
        async with IncrementLoad(api, HEADERS, sessions) as load:
            await load.wait_acks(100)
            cluster.workers[victim].kill()
            survivors = set(cluster.workers) - {victim}
            await watch.wait_covered(cluster.settings.shard_count, survivors)
            await load.wait_acks(100)
        await assert_exactly_once(api, HEADERS, load.report, sessions)
        after = await read_shard_map(nc)
        for index, (old, new) in enumerate(zip(before.shards, after.shards, strict=True)):
            if old.owner == victim:
                assert new.owner in survivors and new.epoch == old.epoch + 1
            else:
                assert (new.owner, new.epoch) == (old.owner, old.epoch), f"shard {index} moved though its owner lived"


async def test_paused_worker_cannot_write_after_losing_its_shards(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=3)
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        sessions = await _sessions(api)
        victim = sorted(cluster.workers)[1]
        before = await read_shard_map(nc)
        victim_shards = {i for i, e in enumerate(before.shards) if e.owner == victim}
        async with IncrementLoad(api, HEADERS, sessions) as load:
            await load.wait_acks(100)
            cluster.workers[victim].pause()
            others = set(cluster.workers) - {victim}
            await watch.wait_covered(cluster.settings.shard_count, others)  # its shards moved on
            await load.wait_acks(100)
            cluster.workers[victim].resume()
            # Awake again it must learn it lost them; it may later be given shards back, but only
            # with a new epoch, so its old copies are never written.
            await watch.wait_until(lambda live: victim in live, what="paused worker heartbeating again")
            await load.wait_acks(100)
        await assert_exactly_once(api, HEADERS, load.report, sessions)
        after = await read_shard_map(nc)
        for shard in victim_shards:
            assert after.shards[shard].epoch > before.shards[shard].epoch


async def test_join_then_sigterm_moves_only_what_it_must_without_client_errors(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=4)
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        sessions = await _sessions(api)
        async with IncrementLoad(api, HEADERS, sessions) as load:
            await load.wait_acks(100)
            before = await read_shard_map(nc)
            newcomer = cluster.start_worker()
            await watch.wait_until(
                lambda live: newcomer in live and len(live[newcomer].shards) > 0, what="new worker owning shards"
            )
            await watch.wait_covered(cluster.settings.shard_count, set(cluster.workers))
            joined = await read_shard_map(nc)
            moved = [i for i, (a, b) in enumerate(zip(before.shards, joined.shards, strict=True)) if a.owner != b.owner]
            # Exactly the shards rendezvous hashing gives the newcomer, and nothing else: the
            # count itself is random (worker names are), so a range on it would be flaky.
            everyone = sorted({entry.owner for entry in before.shards if entry.owner} | {newcomer})
            must_move = [i for i in range(len(before.shards)) if rendezvous_owner(i, everyone) == newcomer]
            assert moved == must_move, f"moved {moved}, rendezvous gives the newcomer {must_move}"
            assert all(joined.shards[i].owner == newcomer for i in moved), "a join moved shards between old workers"
            await load.wait_acks(100)

            leaving = sorted(w for w in cluster.workers if w != newcomer)[0]
            cluster.workers[leaving].signal(signal.SIGTERM)
            assert cluster.workers[leaving].wait(timeout=15) == 0, "worker did not drain and exit cleanly"
            remaining = set(cluster.workers) - {leaving}
            await watch.wait_covered(cluster.settings.shard_count, remaining)
            left = await read_shard_map(nc)
            for index, (a, b) in enumerate(zip(joined.shards, left.shards, strict=True)):
                if a.owner != leaving:
                    assert (a.owner, a.epoch) == (b.owner, b.epoch), f"shard {index} moved though its owner stayed"
            await load.wait_acks(100)
        await assert_exactly_once(api, HEADERS, load.report, sessions)
        # Graceful moves: the retries absorbed the pause; no client saw an error status.
        assert set(load.report.statuses) == {200}, dict(load.report.statuses)
