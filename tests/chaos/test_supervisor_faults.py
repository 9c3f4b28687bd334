"""Supervisor standby: the leader's death or pause hands leadership over; a deposed leader writes nothing."""

from __future__ import annotations

import asyncio
import time

import pytest
from litestar.testing import AsyncTestClient

from sessionmgr.common import subjects
from sessionmgr.common.models import lease_decoder, shard_map_decoder
from sessionmgr.gateway.app import create_app
from tests.conftest import auth
from tests.support.load import IncrementLoad, assert_exactly_once

pytestmark = pytest.mark.slow
HEADERS = auth("standby-user")


class KeyFollower:
    """Every value written to a KV key, in order, as they happen."""

    def __init__(self) -> None:
        self.values: list[bytes] = []
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher = None

    async def start(self, nc, key: str) -> KeyFollower:  # type: ignore[no-untyped-def]
        kv = await nc.jetstream().key_value(subjects.SHARD_MAP_BUCKET)
        self._watcher = await kv.watch(key)
        self._task = asyncio.create_task(self._follow())
        return self

    async def _follow(self) -> None:
        async for entry in self._watcher:  # type: ignore[union-attr]
            if entry is not None and entry.value:
                self.values.append(entry.value)
                self.changed.set()

    async def wait_for(self, predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate(self.values):
            self.changed.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, "timed out following the KV key"
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        await self._watcher.stop()  # type: ignore[union-attr]
        if self._task:
            await self._task


def _lease(values: list[bytes]):  # type: ignore[no-untyped-def]
    return lease_decoder.decode(values[-1]) if values else None


async def test_standby_takes_over_after_leader_sigkill_and_moves_shards(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=3, supervisors=2)
    lease = await KeyFollower().start(nc, subjects.LEADER_KEY)
    try:
        await lease.wait_for(lambda v: bool(v))
        leader = _lease(lease.values)
        async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
            sessions = [(await api.post("/sessions", headers=HEADERS)).json()["session_id"] for _ in range(12)]
            async with IncrementLoad(api, HEADERS, sessions) as load:
                await load.wait_acks(50)
                killed_at = time.monotonic()
                cluster.supervisors[leader.holder].kill()
                await lease.wait_for(lambda v: _lease(v).holder != leader.holder)
                takeover_s = time.monotonic() - killed_at
                new_leader = _lease(lease.values)
                assert new_leader.term == leader.term + 1
                # Within 2 s plus scheduling slack on a loaded 2-core machine.
                assert takeover_s < 2 * cluster.settings.failure_timeout + 1.5, takeover_s

                # The new leader does the leader's job: a worker death is handled.
                victim = sorted(cluster.workers)[0]
                cluster.workers[victim].kill()
                await watch.wait_covered(cluster.settings.shard_count, set(cluster.workers) - {victim})
                await load.wait_acks(50)
            await assert_exactly_once(api, HEADERS, load.report, sessions)
    finally:
        await lease.stop()


async def test_paused_leader_is_deposed_and_its_map_writes_are_rejected(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=2, supervisors=2)
    lease = await KeyFollower().start(nc, subjects.LEADER_KEY)
    shard_map = await KeyFollower().start(nc, subjects.SHARD_MAP_KEY)
    try:
        await lease.wait_for(lambda v: bool(v))
        old = _lease(lease.values)
        cluster.supervisors[old.holder].pause()
        await lease.wait_for(lambda v: _lease(v).holder != old.holder)
        new = _lease(lease.values)
        # Give the map a reason to change while the old leader sleeps, then wake it.
        joiner = cluster.start_worker()
        await watch.wait_until(lambda live: joiner in live and live[joiner].shards, what="joiner owns shards")
        writes_before_wake = len(shard_map.values)
        cluster.supervisors[old.holder].resume()
        # Awake, the old leader tries to renew with its stale revision; the KV rejects it. Its log
        # is the only outside sign of that, so follow the file.
        deadline = time.monotonic() + 10
        while "leadership_lost" not in cluster.log_text(old.holder):
            assert time.monotonic() < deadline, "deposed leader never noticed it lost the lease"
            await asyncio.sleep(0.1)
        renewals = len(lease.values)
        await lease.wait_for(lambda v: len(v) >= renewals + 2)  # the new leader keeps renewing
        assert {lease_decoder.decode(v).holder for v in lease.values[renewals - 1 :]} == {new.holder}
        # No map written after the takeover carries the deposed leader's term.
        terms = [shard_map_decoder.decode(v).term for v in shard_map.values[writes_before_wake - 1 :]]
        assert all(t >= new.term for t in terms), terms
    finally:
        await lease.stop()
        await shard_map.stop()
