"""Which shards this worker serves, driven by the supervisor's map in JetStream KV.

Taking a shard that moves from a live worker is a handoff: we ask the previous owner to stop
intake, finish its in-flight requests and let go (``sm.ctl.<worker>.release``), then raise the
shard's fencing epoch in Redis (any later write by an older owner now fails), load the shard's
sessions (warm start) and subscribe. Clients see only the short gap, which the gateway's
retries absorb. Taking a dead worker's shard skips the handoff: the epoch fences it.
A rejected write drops the shard at once, so a worker that wakes from a pause lets go even
before it reads the new map.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from sessionmgr.common import subjects
from sessionmgr.common.models import ReleaseShard, ShardMap, json_encoder
from sessionmgr.worker.cache import SessionCache
from sessionmgr.worker.store import SessionStore

log = structlog.get_logger(__name__)

MessageHandler = Callable[[Msg], Awaitable[None]]
_WARM_LIMIT = 5000


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
        handoff_timeout: float,
    ) -> None:
        self._worker_id = worker_id
        self._nc = nc
        self._store = store
        self._cache = cache
        self._on_message = on_message
        self._pending_limit = pending_limit
        self._handoff_timeout = handoff_timeout
        self._owned: dict[int, OwnedShard] = {}
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self._in_flight: Counter[int] = Counter()
        self._idle_waiters: dict[int, asyncio.Event] = {}
        self.moves = 0
        # Set by the worker: what else lives and dies with a shard (its WhatsApp connections).
        self.on_taken: Callable[[int], None] | None = None
        self.on_released: Callable[[int], Awaitable[None]] | None = None

    # ---- the Ownership protocol used by SessionService ------------------------------------

    def epoch_of(self, shard: int) -> int | None:
        owned = self._owned.get(shard)
        return None if owned is None else owned.epoch

    def fenced(self, shard: int, epoch_in_force: int) -> None:
        owned = self._owned.get(shard)
        if owned is not None and owned.epoch < epoch_in_force:
            log.warning("shard_fenced", shard=shard, our_epoch=owned.epoch, epoch_in_force=epoch_in_force)
            # Releasing is I/O and this runs inside a request; the shard stops serving right now.
            self._owned.pop(shard, None)
            self._spawn(self._finish_release(shard, owned))

    @property
    def shards(self) -> list[int]:
        return sorted(self._owned)

    # ---- in-flight accounting, so a release can wait for the shard's requests -------------

    @property
    def in_flight(self) -> int:
        return sum(self._in_flight.values())

    def begin(self, shard: int) -> None:
        self._in_flight[shard] += 1

    def end(self, shard: int) -> None:
        # On the request path: no lock, no await; only a release that waits gets woken.
        left = self._in_flight[shard] - 1
        if left > 0:
            self._in_flight[shard] = left
            return
        del self._in_flight[shard]
        waiter = self._idle_waiters.pop(shard, None)
        if waiter is not None:
            waiter.set()

    async def _wait_idle(self, shard: int) -> None:
        if not self._in_flight[shard]:
            return
        idle = self._idle_waiters.setdefault(shard, asyncio.Event())
        try:
            async with asyncio.timeout(self._handoff_timeout):
                await idle.wait()
        except TimeoutError:
            log.warning("release_in_flight_timeout", shard=shard, in_flight=self._in_flight[shard])

    # ---- reconciling with the map ---------------------------------------------------------

    async def apply_map(self, shard_map: ShardMap) -> None:
        async with self._lock:
            wanted = {p: e for p, e in enumerate(shard_map.shards) if e.owner == self._worker_id}
            lost = [p for p, owned in self._owned.items() if p not in wanted or wanted[p].epoch != owned.epoch]
            await asyncio.gather(*(self._release(p) for p in lost))
            taking = [(p, e.epoch, e.previous) for p, e in wanted.items() if p not in self._owned]
            # Handoffs from several previous owners overlap instead of queueing.
            await asyncio.gather(*(self._take(p, epoch, previous) for p, epoch, previous in taking))
        async with self._changed:
            self._changed.notify_all()

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until every shard has been given away (the supervisor moved them), or time out."""
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: not self._owned)
            except TimeoutError:
                return False
        return True

    async def release_all(self) -> None:
        async with self._lock:
            await asyncio.gather(*(self._release(p) for p in list(self._owned)))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def on_release_request(self, request: ReleaseShard) -> None:
        """The shard's new owner asks us to let go; we answer once our requests for it are done."""
        owned = self._owned.get(request.shard)
        if owned is not None and owned.epoch < request.epoch:
            await self._release(request.shard)
        else:
            await self._wait_idle(request.shard)

    async def _take(self, shard: int, epoch: int, previous: str | None) -> None:
        if previous is not None and previous != self._worker_id:
            await self._ask_release(previous, shard, epoch)
        in_force = await self._store.acquire_epoch(shard, epoch)
        if in_force > epoch:
            log.warning("shard_epoch_stale", shard=shard, epoch=epoch, epoch_in_force=in_force)
            return
        await self._warm(shard)
        sub = await self._nc.subscribe(
            subjects.shard_wildcard(shard),
            queue=subjects.shard_queue(shard, epoch),
            cb=self._on_message,
            pending_msgs_limit=self._pending_limit,
        )
        self._owned[shard] = OwnedShard(epoch, sub)
        self.moves += 1
        log.info("shard_taken", shard=shard, epoch=epoch, previous=previous)
        if self.on_taken is not None:
            self.on_taken(shard)

    async def _ask_release(self, previous: str, shard: int, epoch: int) -> None:
        payload = json_encoder.encode(ReleaseShard(shard=shard, epoch=epoch))
        try:
            await self._nc.request(subjects.release_subject(previous), payload, timeout=self._handoff_timeout)
        except Exception as exc:  # noqa: BLE001 - it may be dead or paused: the epoch fences it regardless
            log.info("handoff_without_release", shard=shard, previous=previous, reason=type(exc).__name__)

    async def _release(self, shard: int) -> None:
        owned = self._owned.pop(shard, None)
        if owned is not None:
            await self._finish_release(shard, owned)

    async def _finish_release(self, shard: int, owned: OwnedShard) -> None:
        await self._unsubscribe(owned.subscription)  # stop intake first
        await self._wait_idle(shard)  # then let in-flight requests finish
        if shard not in self._owned:  # not re-taken meanwhile
            if self.on_released is not None:
                await self.on_released(shard)  # the devices stop before the new owner reconnects them
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

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _unsubscribe(sub: Subscription) -> None:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the connection may be gone; the shard is released either way
            log.debug("unsubscribe_failed", exc_info=True)
