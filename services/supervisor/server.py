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
from sessionmgr.common.models import (
    AdminReply,
    ClusterStatus,
    DrainWorker,
    MoveShard,
    ShardMap,
    WorkerInfo,
    heartbeat_decoder,
    json_encoder,
    shard_map_decoder,
)
from sessionmgr.common.natsauth import connect_options
from sessionmgr.common.settings import Settings
from sessionmgr.common.tracing import RecentLinks, link_from_headers
from sessionmgr.common.streams import ensure_streams
from sessionmgr.supervisor.assignment import initial_map, reassign
from sessionmgr.supervisor.lease import LeaderLeaseHolder
from sessionmgr.supervisor.membership import Membership
from sessionmgr.supervisor.metrics import SupervisorMetrics
from sessionmgr.supervisor.probe import LivenessProbe

log = structlog.get_logger(__name__)
tracer = trace.get_tracer("sessionmgr.supervisor")
_drain_decoder = msgspec.json.Decoder(DrainWorker)
_move_decoder = msgspec.json.Decoder(MoveShard)


class Supervisor:
    def __init__(self, settings: Settings, supervisor_id: str) -> None:
        self.settings = settings
        self.supervisor_id = supervisor_id
        self.membership = Membership(settings.failure_timeout)
        self._started = time.monotonic()
        self._map: ShardMap | None = None
        self._map_revision = 0
        self._changed = asyncio.Event()
        self._map_lock = asyncio.Lock()
        self._kv: KeyValue | None = None
        self._lease: LeaderLeaseHolder | None = None
        self._probe: LivenessProbe | None = None
        self.nc: NATS | None = None
        self.metrics = SupervisorMetrics(settings.failure_timeout)
        self.metrics.watch(self)
        self._causes = RecentLinks(max_age=2 * settings.failure_timeout)

    async def run(self, stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            self.nc = await nats.connect(
                self.settings.nats_url,
                name=f"supervisor-{self.supervisor_id}",
                **connect_options(self.settings),  # NATS_USER/NATS_PASSWORD, NATS_TLS_*, own inbox prefix
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
            )
            stack.push_async_callback(self.nc.drain)
            kv = self._kv = await self._bucket()
            lease = self._lease = LeaderLeaseHolder(kv, self.supervisor_id, ttl=self.settings.failure_timeout)
            stack.push_async_callback(lease.resign)
            await self.nc.subscribe(f"{subjects.HEARTBEAT_PREFIX}.*", cb=self._on_heartbeat)
            await self.nc.subscribe(f"{subjects.BYE_PREFIX}.*", cb=self._on_bye)
            self._probe = LivenessProbe(self.nc, self._declare_dead, timeout=self.settings.heartbeat_interval)
            stack.push_async_callback(self._probe.close)
            await self.nc.subscribe(subjects.UNREACHABLE_HINT, cb=self._on_unreachable_hint)
            await self.nc.subscribe(subjects.ADMIN_STATUS, cb=self._on_status)
            await self.nc.subscribe(subjects.ADMIN_DRAIN, cb=self._on_drain)
            await self.nc.subscribe(subjects.ADMIN_MOVE, cb=self._on_move)
            log.info("supervisor_started", supervisor_id=self.supervisor_id)
            async with asyncio.TaskGroup() as group:
                loop = group.create_task(self._control_loop(kv, lease))
                await stop.wait()
                loop.cancel()

    async def _bucket(self) -> KeyValue:
        js = self.nc.jetstream()  # type: ignore[union-attr]
        await ensure_streams(js)
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

    def _declare_dead(self, worker_id: str) -> None:
        self.metrics.worker_declared_dead(worker_id)
        self.membership.leave(worker_id)
        self._changed.set()

    async def _on_unreachable_hint(self, msg: Msg) -> None:
        if not self._leading() or self._map is None or self._probe is None:
            return
        try:
            shard = int(msg.data)
            owner = self._map.shards[shard].owner
        except (ValueError, IndexError):
            return
        if owner is not None and owner in self.membership.alive():
            # The reassignment this may lead to links back to the request that saw no responders.
            self._causes.add(link_from_headers(msg.headers, **{"sm.cause": "unreachable_hint", "sm.shard": str(shard)}))
            self._probe.suspect(owner, "no responders on its shard")

    def _probe_late_workers(self) -> None:
        """A worker one beat late is probed: if its process is gone we know now, not in 3 beats."""
        if self._probe is None:
            return
        late_after = self.settings.heartbeat_interval * 1.5
        now = time.monotonic()
        for worker_id, state in self.membership.snapshot().items():
            if late_after < now - state.last_seen <= self.settings.failure_timeout:
                self._probe.suspect(worker_id, "late heartbeat")

    async def _on_bye(self, msg: Msg) -> None:
        worker_id = msg.subject.rsplit(".", 1)[-1]
        log.info("worker_left", worker_id=worker_id)
        self.metrics.worker_left(worker_id)
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
                    self._probe_late_workers()
                    async with self._map_lock:
                        await self._reconcile(kv, lease.term)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - NATS restarts; keep supervising once it is back
                log.warning("control_loop_error", exc_info=True)
                self._map = None
            self._changed.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel of shutdown.
            try:
                async with asyncio.timeout(tick):
                    await self._changed.wait()
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
        alive = self.membership.alive()
        if time.monotonic() - self._started < self.settings.failure_timeout:
            # Just started: we have not heard every worker yet, so nobody is presumed dead.
            owners = {e.owner for e in self._map.shards if e.owner}
            live = sorted(set(live) | owners) if live else []
            alive |= owners
        new_map, moved = reassign(self._map, live, alive, term=term, now=time.time())
        if not moved:
            return
        await self._write_map(kv, new_map, moved, live, term)

    async def _write_map(self, kv: KeyValue, new_map: ShardMap, moved: list[int], live: list[str], term: int) -> bool:
        assert self._map is not None
        report = self.metrics.classify(self._map, new_map, moved, self.membership)
        attributes = {"sm.moved": len(moved), "sm.live_workers": len(live), "sm.term": term, **{f"sm.moves.{r}": n for r, n in report.reasons.items()}}
        with tracer.start_as_current_span("supervisor.reassign", attributes=attributes, links=self._causes.take()):
            try:
                self._map_revision = await kv.update(subjects.SHARD_MAP_KEY, json_encoder.encode(new_map), last=self._map_revision)
            except KeyWrongLastSequenceError:
                log.warning("shard_map_changed_underneath", term=term)
                self._map = None
                return False
        previous = self._map
        self._map = new_map
        self.metrics.record(report)
        log.info(
            "shards_moved",
            count=len(moved),
            live_workers=live,
            moves=[f"{p}:{previous.shards[p].owner}->{new_map.shards[p].owner}" for p in moved][:64],
        )
        return True

    # ---- operator requests (answered by the leader only; a standby stays silent) ----------

    def _leading(self) -> bool:
        return self._lease is not None and self._lease.is_leader

    @property
    def is_leader(self) -> bool:
        return self._leading()

    def unowned_shards(self) -> int:
        """Shards whose owner is not alive; 0 until the map is loaded and every worker had time to beat."""
        if self._map is None or time.monotonic() - self._started < self.settings.failure_timeout:
            return 0
        alive = self.membership.alive()
        return sum(1 for entry in self._map.shards if entry.owner is None or entry.owner not in alive)

    async def _on_status(self, msg: Msg) -> None:
        if not self._leading() or self._map is None:
            return
        now = time.monotonic()
        alive = self.membership.alive(now)
        workers = [
            WorkerInfo(
                worker_id=wid,
                pid=state.heartbeat.pid,
                host=state.heartbeat.host,
                shards=state.heartbeat.shards,
                sessions=state.heartbeat.sessions,
                in_flight=state.heartbeat.in_flight,
                draining=state.heartbeat.draining or wid in self._map.drained,
                last_heartbeat_age_s=round(now - state.last_seen, 3),
                live=wid in alive,
            )
            for wid, state in sorted(self.membership.snapshot().items())
        ]
        status = ClusterStatus(leader=self.supervisor_id, term=self._lease.term, workers=workers, shard_map=self._map)  # type: ignore[union-attr]
        await msg.respond(json_encoder.encode(status))

    async def _on_drain(self, msg: Msg) -> None:
        if not self._leading():
            return
        try:
            command = _drain_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await msg.respond(json_encoder.encode(AdminReply(ok=False, detail=str(exc))))
            return

        def change(current: ShardMap) -> ShardMap:
            drained = set(current.drained)
            (drained.discard if command.undrain else drained.add)(command.worker_id)
            pinned = {p: w for p, w in current.pinned.items() if w != command.worker_id or command.undrain}
            return msgspec.structs.replace(current, drained=sorted(drained), pinned=pinned)

        verb = "undrained" if command.undrain else "drained"
        await self._admin_change(msg, change, f"{verb} {command.worker_id}")

    async def _on_move(self, msg: Msg) -> None:
        if not self._leading():
            return
        try:
            command = _move_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await msg.respond(json_encoder.encode(AdminReply(ok=False, detail=str(exc))))
            return
        if not 0 <= command.shard < self.settings.shard_count:
            await msg.respond(json_encoder.encode(AdminReply(ok=False, detail=f"shard must be 0..{self.settings.shard_count - 1}")))
            return
        if command.worker_id not in self.membership.live():
            await msg.respond(json_encoder.encode(AdminReply(ok=False, detail=f"{command.worker_id} is not a live, undrained worker")))
            return

        def change(current: ShardMap) -> ShardMap:
            return msgspec.structs.replace(current, pinned={**current.pinned, command.shard: command.worker_id})

        await self._admin_change(msg, change, f"shard {command.shard} pinned to {command.worker_id}")

    async def _admin_change(self, msg: Msg, change, detail: str) -> None:  # type: ignore[no-untyped-def]
        assert self._kv is not None and self._lease is not None
        async with self._map_lock:
            for _ in range(3):
                if self._map is None:
                    await self._load_map(self._kv, self._lease.term)
                assert self._map is not None
                changed = change(self._map)
                new_map, moved = reassign(changed, self.membership.live(), self.membership.alive(), term=self._lease.term, now=time.time())
                if not moved:
                    new_map = msgspec.structs.replace(changed, term=self._lease.term, updated_at=time.time())
                if await self._write_map(self._kv, new_map, moved, self.membership.live(), self._lease.term):
                    await msg.respond(json_encoder.encode(AdminReply(ok=True, detail=f"{detail}; {len(moved)} shard(s) moved")))
                    return
        await msg.respond(json_encoder.encode(AdminReply(ok=False, detail="shard map kept changing; try again")))
