"""Which shards this worker serves, driven by the supervisor's map in JetStream KV.

Taking a shard: raise its fencing epoch in Redis first (older owners' writes now fail), then
warm its sessions, then subscribe. Losing one: unsubscribe (stop intake); in-flight requests
finish and any late write is rejected by the epoch. A rejected write also drops the shard
at once, so a worker that wakes from a pause lets go even before it reads the new map.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from sessionmgr.common import subjects
from sessionmgr.common.models import ShardMap
from sessionmgr.worker.cache import SessionCache
from sessionmgr.worker.store import SessionStore

log = structlog.get_logger(__name__)

MessageHandler = Callable[[Msg], Awaitable[None]]
_WARM_LIMIT = 2000


@dataclass(slots=True)
class OwnedShard:
    epoch: int
    subscription: Subscription


class ShardOwnership:
    def __init__(
        self,
        *,
        worker_id: str,
        nc: NATS,
        store: SessionStore,
        cache: SessionCache,
        on_message: MessageHandler,
        pending_limit: int,
    ) -> None:
        self._worker_id = worker_id
        self._nc = nc
        self._store = store
        self._cache = cache
        self._on_message = on_message
        self._pending_limit = pending_limit
        self._owned: dict[int, OwnedShard] = {}
        self._lock = asyncio.Lock()
        self._unsubscribing: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self.moves = 0

    # ---- the Ownership protocol used by SessionService ------------------------------------

    def epoch_of(self, shard: int) -> int | None:
        owned = self._owned.get(shard)
        return None if owned is None else owned.epoch

    def fenced(self, shard: int, epoch_in_force: int) -> None:
        owned = self._owned.get(shard)
        if owned is not None and owned.epoch < epoch_in_force:
            log.warning("shard_fenced", shard=shard, our_epoch=owned.epoch, epoch_in_force=epoch_in_force)
            self._owned.pop(shard, None)
            self._drop_sessions(shard)
            # Unsubscribing is I/O and this runs inside a request; the shard is already unusable.
            task = asyncio.get_running_loop().create_task(self._unsubscribe(owned.subscription))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    @property
    def shards(self) -> list[int]:
        return sorted(self._owned)

    # ---- reconciling with the map ---------------------------------------------------------

    async def apply_map(self, shard_map: ShardMap) -> None:
        async with self._lock:
            wanted = {p: entry.epoch for p, entry in enumerate(shard_map.shards) if entry.owner == self._worker_id}
            for shard in [p for p in self._owned if wanted.get(p) != self._owned[p].epoch]:
                await self._release(shard)
            for shard, epoch in wanted.items():
                if shard not in self._owned:
                    await self._take(shard, epoch)
        await self._notify()

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until every shard has been given away (the supervisor moved them), or time out."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: not self._owned), timeout)
            except TimeoutError:
                return False
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def release_all(self) -> None:
        async with self._lock:
            for shard in list(self._owned):
                await self._release(shard)
        if self._unsubscribing:
            await asyncio.gather(*self._unsubscribing, return_exceptions=True)

    async def _take(self, shard: int, epoch: int) -> None:
        in_force = await self._store.acquire_epoch(shard, epoch)
        if in_force > epoch:
            log.warning("shard_epoch_stale", shard=shard, epoch=epoch, epoch_in_force=in_force)
            return
        await self._warm(shard)
        sub = await self._nc.subscribe(
            subjects.shard_wildcard(shard),
            queue=subjects.shard_queue(shard),
            cb=self._on_message,
            pending_msgs_limit=self._pending_limit,
        )
        self._owned[shard] = OwnedShard(epoch, sub)
        self.moves += 1
        log.info("shard_taken", shard=shard, epoch=epoch)

    async def _release(self, shard: int) -> None:
        owned = self._owned.pop(shard, None)
        if owned is None:
            return
        await self._unsubscribe(owned.subscription)
        self._drop_sessions(shard)
        self.moves += 1
        log.info("shard_released", shard=shard, epoch=owned.epoch)

    async def _warm(self, shard: int) -> None:
        """Load the shard's sessions before the first request so failover answers from memory."""
        ids = await self._store.shard_session_ids(shard, _WARM_LIMIT)
        for session in await self._store.load_many(ids):
            if session is not None:
                self._cache.put(session)

    def _drop_sessions(self, shard: int) -> None:
        self._cache.evict_where(lambda sid: self._store.shard_of(sid) == shard)

    @staticmethod
    async def _unsubscribe(sub: Subscription) -> None:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the connection may be gone; the shard is released either way
            log.debug("unsubscribe_failed", exc_info=True)
