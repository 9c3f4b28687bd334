"""The write script itself: a writer with an older epoch is rejected, whatever it writes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from sessionmgr.common.models import ChatMessage, Session
from sessionmgr.common.redis_pipelined import PipelinedRedis
from sessionmgr.worker.store import ABSENT, SessionStore, WriteOutcome
from tests.support.cluster import Servers, redis_client


@pytest.fixture
async def redis(isolated_servers: Servers) -> AsyncIterator[Redis]:
    # Its own Redis: raising a shard's epoch here would fence a shared cluster's worker.
    async with redis_client(isolated_servers.redis_port) as client:
        yield client


@pytest.fixture
async def store(redis: Redis, isolated_servers: Servers) -> AsyncIterator[SessionStore]:
    pipelined = PipelinedRedis(host="127.0.0.1", port=isolated_servers.redis_port)
    yield SessionStore(redis, pipelined, shard_count=64)
    await pipelined.aclose()


def _session(sid: str, version: int) -> Session:
    now = datetime.now(UTC)
    return Session(session_id=sid, user_id="u", state="active", version=version, created_at=now, last_updated=now, expires_at=now + timedelta(hours=1))


async def _write(store: SessionStore, shard: int, epoch: int, sid: str, expected: int, version: int, **extra: Any) -> WriteOutcome:
    """Version ``version`` of ``sid`` (0: delete it); ``extra``: live, messages, history_limit."""
    return await store.write(
        shard=shard, epoch=epoch, session_id=sid, expected_version=expected, user_id="u", session=_session(sid, version) if version else None,
        ttl_ms=60_000, idem_key=None, record=None, idem_ttl_ms=60_000, **extra,
    )


async def test_stale_epoch_cannot_write_once_a_newer_owner_fenced_the_shard(store: SessionStore) -> None:
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


async def test_writes_issued_together_keep_their_order_and_survive_a_script_flush(store: SessionStore, redis: Redis) -> None:
    sids = [uuid.uuid4().hex for _ in range(20)]
    await redis.script_flush()  # the pipelined EVALSHAs meet NOSCRIPT and are rerun as EVAL
    outcomes = await asyncio.gather(*(_write(store, store.shard_of(s), 0, s, ABSENT, 1) for s in sids))
    assert [o.status for o in outcomes] == ["OK"] * 20
    # Same session twice in one batch: the first write wins, the second sees the new version.
    sid = sids[0]
    first, second = await asyncio.gather(_write(store, store.shard_of(sid), 0, sid, 1, 2), _write(store, store.shard_of(sid), 0, sid, 1, 2))
    assert (first.status, second.status) == ("OK", "VERSION")
    # Redis gone: every caller gets redis-py's connection error (what degraded mode acts on).
    dead = PipelinedRedis(host="127.0.0.1", port=1, connect_timeout=0.2)
    try:
        unreachable = SessionStore(redis, dead, shard_count=64)
        results = await asyncio.gather(*(_write(unreachable, 0, 0, uuid.uuid4().hex, ABSENT, 1) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    finally:
        await dead.aclose()


async def test_auth_state_and_message_acks_are_versioned_fenced_and_live_with_the_session(store: SessionStore) -> None:
    """The engine's credentials and the history's acks obey the same epoch as the session."""
    sid = uuid.uuid4().hex
    shard = store.shard_of(sid)
    base = 5000
    await store.acquire_epoch(shard, base)
    message = ChatMessage(id="true_1@c.us_K1", chat_id="1@c.us", from_me=True, text="hi", timestamp=datetime.now(UTC), status="pending", seq=1)
    assert (await _write(store, shard, base, sid, ABSENT, 1, live=True, messages=[message])).status == "OK"
    assert await store.live_session_ids(shard) == [sid]

    saved = await store.save_auth(shard=shard, epoch=base, session_id=sid, expected_version=0, state=b"creds-1", ttl_ms=60_000)
    assert saved.status == "OK" and await store.load_auth(sid) == (1, b"creds-1")
    # A writer that missed a change (version 0 again) must not overwrite it.
    behind = await store.save_auth(shard=shard, epoch=base, session_id=sid, expected_version=0, state=b"old", ttl_ms=60_000)
    assert behind.status == "VERSION" and await store.load_auth(sid) == (1, b"creds-1")

    await store.acquire_epoch(shard, base + 1)  # a new owner
    stale = await store.save_auth(shard=shard, epoch=base, session_id=sid, expected_version=1, state=b"stale", ttl_ms=60_000)
    assert stale.status == "FENCED" and await store.load_auth(sid) == (1, b"creds-1")
    read = msgspec.structs.replace(message, status="read")
    assert await store.update_message(shard=shard, epoch=base, session_id=sid, message=read) is None  # fenced
    assert (await store.message(sid, message.id)).status == "pending"  # type: ignore[union-attr]
    assert await store.update_message(shard=shard, epoch=base + 1, session_id=sid, message=read) is True
    assert (await store.message(sid, message.id)).status == "read"  # type: ignore[union-attr]

    # Deleting the session takes its history, auth state and live entry with it.
    assert (await _write(store, shard, base + 1, sid, 1, 0)).status == "OK"  # deleted
    assert await store.messages(sid) == [] and await store.load_auth(sid) == (0, None)
    assert await store.live_session_ids(shard) == []


async def test_history_keeps_only_the_newest_messages(store: SessionStore, redis: Redis) -> None:
    sid = uuid.uuid4().hex
    shard = store.shard_of(sid)
    version = ABSENT
    for seq in range(1, 8):
        message = ChatMessage(id=f"m{seq}", chat_id="1@c.us", from_me=False, text=str(seq), timestamp=datetime.now(UTC), status="received", seq=seq)
        assert (await _write(store, shard, 0, sid, version, seq, messages=[message], history_limit=3)).status == "OK"
        version = seq
    assert [m.id for m in await store.messages(sid)] == ["m5", "m6", "m7"]
    assert await redis.hlen(f"sm:{{{shard}}}:m:{sid}") == 3
