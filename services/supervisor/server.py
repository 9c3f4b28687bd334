"""The supervisor: follows heartbeats, owns the shard map, moves shards off dead workers."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import msgspec
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from opentelemetry import trace

from sessionmgr.common import subjects
from sessionmgr.common.models import ShardMap, heartbeat_decoder, json_encoder, shard_map_decoder
from sessionmgr.common.settings import Settings
from sessionmgr.supervisor.assignment import initial_map, reassign
from sessionmgr.supervisor.lease import LeaderLeaseHolder
from sessionmgr.supervisor.membership import Membership

log = structlog.get_logger(__name__)
tracer = trace.get_tracer("sessionmgr.supervisor")
_bye_decoder = msgspec.json.Decoder(dict)


class Supervisor:
    def __init__(self, settings: Settings, supervisor_id: str) -> None:
        self.settings = settings
        self.supervisor_id = supervisor_id
        self.membership = Membership(settings.failure_timeout)
        self._started = time.monotonic()
        self._map: ShardMap | None = None
        self._map_revision = 0
        self._changed = asyncio.Event()
        self.nc: NATS | None = None

    async def run(self, stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            self.nc = await nats.connect(
                self.settings.nats_url,
                name=f"supervisor-{self.supervisor_id}",
                user=self.settings.nats_user,
                password=self.settings.nats_password,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
            )
            stack.push_async_callback(self.nc.drain)
            kv = await self._bucket()
            lease = LeaderLeaseHolder(kv, self.supervisor_id, ttl=self.settings.failure_timeout)
            stack.push_async_callback(lease.resign)
            await self.nc.subscribe(f"{subjects.HEARTBEAT_PREFIX}.*", cb=self._on_heartbeat)
            await self.nc.subscribe(f"{subjects.BYE_PREFIX}.*", cb=self._on_bye)
            log.info("supervisor_started", supervisor_id=self.supervisor_id)
            async with asyncio.TaskGroup() as group:
                loop = group.create_task(self._control_loop(kv, lease))
                await stop.wait()
                loop.cancel()

    async def _bucket(self) -> KeyValue:
        js = self.nc.jetstream()  # type: ignore[union-attr]
        try:
            return await js.key_value(subjects.SHARD_MAP_BUCKET)
        except BucketNotFoundError:
            config = KeyValueConfig(bucket=subjects.SHARD_MAP_BUCKET, history=1, storage=StorageType.FILE)
            return await js.create_key_value(config)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if self.membership.beat(beat):
            log.info("worker_joined", worker_id=beat.worker_id, pid=beat.pid)
            self._changed.set()
        elif beat.draining:
            self._changed.set()

    async def _on_bye(self, msg: Msg) -> None:
        worker_id = msg.subject.rsplit(".", 1)[-1]
        log.info("worker_left", worker_id=worker_id)
        self.membership.leave(worker_id)
        self._changed.set()

    async def _control_loop(self, kv: KeyValue, lease: LeaderLeaseHolder) -> None:
        # Checked several times per heartbeat interval so a death is acted on soon after the window.
        tick = self.settings.heartbeat_interval / 5
        next_lease = 0.0
        while True:
            try:
                now = time.monotonic()
                if now >= next_lease:
                    was_leader = lease.is_leader
                    if await lease.tick() and not was_leader:
                        self._map = None  # re-read the map we now own
                    next_lease = now + self.settings.heartbeat_interval / (1 if lease.is_leader else 2)
                if lease.is_leader:
                    await self._reconcile(kv, lease.term)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - NATS restarts; keep supervising once it is back
                log.warning("control_loop_error", exc_info=True)
                self._map = None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=tick)
            except TimeoutError:
                pass

    async def _load_map(self, kv: KeyValue, term: int) -> None:
        try:
            entry = await kv.get(subjects.SHARD_MAP_KEY)
            self._map, self._map_revision = shard_map_decoder.decode(entry.value), entry.revision
        except KeyNotFoundError:
            # Epochs start at the clock in ms so a map rebuilt after losing the bucket still
            # outranks every epoch already written to Redis.
            fresh = initial_map(self.settings.shard_count, term=term, first_epoch=int(time.time() * 1000), now=time.time())
            self._map_revision = await kv.create(subjects.SHARD_MAP_KEY, json_encoder.encode(fresh))
            self._map = fresh
        if len(self._map.shards) != self.settings.shard_count:
            raise RuntimeError(f"shard map has {len(self._map.shards)} shards but SHARD_COUNT is {self.settings.shard_count}")

    async def _reconcile(self, kv: KeyValue, term: int) -> None:
        if self._map is None:
            await self._load_map(kv, term)
        assert self._map is not None
        live = self.membership.live()
        if time.monotonic() - self._started < self.settings.failure_timeout:
            # Just started: we have not heard every worker yet. Only fill empty or self-evident slots.
            owners = {e.owner for e in self._map.shards if e.owner}
            live = sorted(set(live) | owners) if live else []
        new_map, moved = reassign(self._map, live, term=term, now=time.time())
        if not moved:
            return
        with tracer.start_as_current_span("supervisor.reassign", attributes={"sm.moved": len(moved), "sm.live_workers": len(live)}):
            try:
                self._map_revision = await kv.update(subjects.SHARD_MAP_KEY, json_encoder.encode(new_map), last=self._map_revision)
            except KeyWrongLastSequenceError:
                log.warning("shard_map_changed_underneath", term=term)
                self._map = None
                return
        previous = self._map
        self._map = new_map
        log.info(
            "shards_moved",
            count=len(moved),
            live_workers=live,
            moves=[f"{p}:{previous.shards[p].owner}->{new_map.shards[p].owner}" for p in moved][:64],
        )
