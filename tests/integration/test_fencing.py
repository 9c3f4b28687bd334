"""The write script itself: a writer with an older epoch is rejected, whatever it writes."""

from __future__ import annotations

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
