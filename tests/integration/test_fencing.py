"""The write script itself: a writer with an older epoch is rejected, whatever it writes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from sessionmgr.common.models import Session
from sessionmgr.worker.store import ABSENT, SessionStore, WriteOutcome
from tests.support.cluster import Servers


def _session(sid: str, version: int) -> Session:
    now = datetime.now(UTC)
    return Session(session_id=sid, user_id="u", state="active", version=version, created_at=now, last_updated=now, expires_at=now + timedelta(hours=1))


async def _write(store: SessionStore, shard: int, epoch: int, sid: str, expected: int, version: int) -> WriteOutcome:
    return await store.write(
        shard=shard, epoch=epoch, session_id=sid, expected_version=expected, user_id="u", session=_session(sid, version),
        ttl_ms=60_000, idem_key=None, record=None, idem_ttl_ms=60_000,
    )


async def test_stale_epoch_cannot_write_once_a_newer_owner_fenced_the_shard(isolated_servers: Servers) -> None:
    # Its own Redis: raising a shard's epoch here would fence a shared cluster's worker.
    redis = Redis(host="127.0.0.1", port=isolated_servers.redis_port)
    try:
        store = SessionStore(redis, shard_count=64)
        sid = uuid.uuid4().hex
        shard = store.shard_of(sid)
        base = 1000
        assert await store.acquire_epoch(shard, base) == base
        assert (await _write(store, shard, base, sid, ABSENT, 1)).status == "OK"

        # A new owner takes the shard with epoch + 1 ...
        assert await store.acquire_epoch(shard, base + 1) == base + 1
        # ... and the old owner, still believing it owns it, is refused: nothing is written.
        stale = await _write(store, shard, base, sid, 1, 2)
        assert stale.status == "FENCED" and int(stale.detail or 0) == base + 1
        assert (await store.load(sid)).version == 1  # type: ignore[union-attr]
        # The old owner cannot win the epoch back either.
        assert await store.acquire_epoch(shard, base) == base + 1
        # The new owner writes normally.
        assert (await _write(store, shard, base + 1, sid, 1, 2)).status == "OK"
    finally:
        await redis.aclose()


async def test_writes_issued_together_are_batched_in_order_and_survive_a_script_flush(isolated_servers: Servers) -> None:
    redis = Redis(host="127.0.0.1", port=isolated_servers.redis_port)
    try:
        store = SessionStore(redis, shard_count=64)
        sids = [uuid.uuid4().hex for _ in range(20)]
        await redis.script_flush()  # the pipelined EVALSHAs meet NOSCRIPT and are rerun once
        outcomes = await asyncio.gather(*(_write(store, store.shard_of(s), 0, s, ABSENT, 1) for s in sids))
        assert [o.status for o in outcomes] == ["OK"] * 20
        # Same session twice in one batch: the first write wins, the second sees the new version.
        sid = sids[0]
        first, second = await asyncio.gather(_write(store, store.shard_of(sid), 0, sid, 1, 2), _write(store, store.shard_of(sid), 0, sid, 1, 2))
        assert (first.status, second.status) == ("OK", "VERSION")
    finally:
        await redis.aclose()
    # Redis gone: every caller of the batch gets the connection error.
    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    try:
        store = SessionStore(dead, shard_count=64)
        results = await asyncio.gather(*(_write(store, 0, 0, uuid.uuid4().hex, ABSENT, 1) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) or "Connect" in type(r).__name__ for r in results), results
    finally:
        await dead.aclose()
