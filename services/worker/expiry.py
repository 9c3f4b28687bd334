"""Session expiry: Redis drops a session's data ``SESSION_TTL`` after its last change; the
shard's owner notices (per-shard expiry index), forgets it and publishes one ``expired`` event.

The index lives with the shard (same slot), so after a failover the new owner finds what
expired while nobody was looking; the confirm script is fenced, so only the owner reports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from sessionmgr.worker.cache import SessionCache
from sessionmgr.worker.events import EventPublisher
from sessionmgr.worker.shards import ShardOwnership
from sessionmgr.worker.store import SessionStore

log = structlog.get_logger(__name__)


class ExpirySweeper:
    def __init__(self, *, store: SessionStore, shards: ShardOwnership, cache: SessionCache, events: EventPublisher, interval: float) -> None:
        self._store = store
        self._shards = shards
        self._cache = cache
        self._events = events
        self._interval = interval
        self.on_expired: Callable[[str], Awaitable[None]] | None = None

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: try again next round
                log.debug("expiry_sweep_failed", error=type(exc).__name__)
            await asyncio.sleep(self._interval)

    async def sweep_once(self) -> int:
        expired = 0
        now_ms = int(time.time() * 1000)
        owned = [(shard, epoch) for shard in self._shards.shards if (epoch := self._shards.epoch_of(shard)) is not None]
        # One round trip for every shard's index, beside the requests on the pipelined connection:
        # a call per shard through the pool was about 3 % of a busy worker's CPU.
        found = await asyncio.gather(*(self._store.expired_candidates(shard, now_ms) for shard, _ in owned))
        for (shard, epoch), candidates in zip(owned, found, strict=True):
            for session_id, user_id in candidates:
                if not await self._store.confirm_expired(shard, epoch, session_id, user_id):
                    continue
                cached = self._cache.get(session_id)
                self._cache.evict(session_id)
                if self.on_expired is not None:
                    await self.on_expired(session_id)
                await self._events.publish("expired", session_id=session_id, user_id=user_id, version=cached.version if cached else 0)
                expired += 1
        if expired:
            log.info("sessions_expired", count=expired)
        return expired
