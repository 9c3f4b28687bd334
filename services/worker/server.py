"""The worker process: serves the shards it is given, one request per session at a time.

nats-py runs one subscription's callbacks one after another, so the callback only takes a slot
from a bounded semaphore (back-pressure onto NATS) and hands the message to a tracked task;
a per-session FIFO lock keeps each session's requests in arrival order while different sessions
run concurrently.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from contextlib import AsyncExitStack

import msgspec
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError
from opentelemetry import trace
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sessionmgr.common import bus, subjects
from sessionmgr.common.errors import (
    BadRequestError,
    InternalError,
    NotOwnerError,
    SessionManagerError,
    StorageUnavailableError,
    error_headers,
)
from sessionmgr.common.ids import is_valid_idempotency_key, is_valid_session_id
from sessionmgr.common.natsauth import connect_options
from sessionmgr.common.redis_client import create_pipelined_redis, create_redis
from sessionmgr.common.models import Heartbeat, ReleaseShard, ShardMap, WorkerBye, json_encoder, shard_map_decoder
from sessionmgr.common.settings import Settings
from sessionmgr.common.streams import ensure_streams, request_status_bucket
from sessionmgr.common.tracing import consumer_span, log_ids
from sessionmgr.worker.actions import registry
from sessionmgr.worker.cache import SessionCache
from sessionmgr.worker.keyed_lock import KeyedLock
from sessionmgr.worker.metrics import WorkerMetrics
from sessionmgr.worker.degraded import DegradedMode
from sessionmgr.worker.events import EventPublisher
from sessionmgr.worker.expiry import ExpirySweeper
from sessionmgr.worker.sessions import Call, Reply, SessionService
from sessionmgr.worker.shards import ShardOwnership
from sessionmgr.worker.store import SessionStore
from sessionmgr.worker.webhooks import WebhookService
from sessionmgr.worker.bots import BotRegistry
from sessionmgr.worker.connections import ConnectionManager
from sessionmgr.worker.engine import EngineRegistry
from sessionmgr.worker.sim_engine import SimulatedEngine
from sessionmgr.worker.whatsapp import WhatsAppActions, make_config_check

log = structlog.get_logger(__name__)
tracer = trace.get_tracer("sessionmgr.worker")

# What a queued request must carry to be replayed exactly as it arrived.
_REPLAY_HEADERS = (
    bus.HEADER_USER,
    bus.HEADER_ADMIN,
    bus.HEADER_REQUEST_ID,
    bus.HEADER_IDEMPOTENCY_KEY,
    bus.HEADER_IF_MATCH,
    bus.HEADER_CLIENT_IP,
    bus.HEADER_READ_ONLY,
    bus.HEADER_KEY_GENERATED,
)


def _forwarded(headers: dict[str, str]) -> dict[str, str]:
    return {name: headers[name] for name in _REPLAY_HEADERS if name in headers}
_release_decoder = msgspec.json.Decoder(ReleaseShard)
# Redis unreachable, slow or its pool exhausted: retryable, not an internal error.
_STORAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)


class Worker:
    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self._debug_logs = settings.log_level.upper() == "DEBUG"
        self.worker_id = worker_id
        self._slots = asyncio.Semaphore(settings.worker_max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._control_tasks: set[asyncio.Task[None]] = set()
        self._beat_now = asyncio.Event()
        self._locks = KeyedLock()
        self._cache = SessionCache(settings.worker_cache_max_sessions)
        self._accepting = True
        self._last_tick = time.monotonic()
        self._map_revision = 0
        self.nc: NATS | None = None
        self.shards: ShardOwnership | None = None
        self.service: SessionService | None = None
        self.connections: ConnectionManager | None = None
        self.metrics = WorkerMetrics([*registry.names(), *WhatsAppActions.ops], tracer=tracer)
        self.metrics.watch(self)
        self.degraded: DegradedMode | None = None

    async def run(self, stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            redis = create_redis(self.settings, self.metrics.redis)
            stack.push_async_callback(redis.aclose)
            pipelined = create_pipelined_redis(self.settings, self.metrics.redis)
            stack.push_async_callback(pipelined.aclose)
            self.nc = await nats.connect(
                self.settings.nats_url,
                name=f"worker-{self.worker_id}",
                **connect_options(self.settings),  # NATS_USER/NATS_PASSWORD, NATS_TLS_*, own inbox prefix
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                reconnected_cb=self._on_reconnected,
            )
            stack.push_async_callback(self._close_nats)
            store = SessionStore(redis, pipelined, shard_count=self.settings.shard_count)
            self.shards = ShardOwnership(
                worker_id=self.worker_id,
                nc=self.nc,
                store=store,
                cache=self._cache,
                on_message=self._on_request,
                pending_limit=self.settings.worker_max_in_flight * 16,
                handoff_timeout=min(self.settings.drain_timeout, self.settings.request_timeout / 2),
            )
            js = self.nc.jetstream()
            await ensure_streams(js)
            webhooks = WebhookService(nc=self.nc, settings=self.settings, count=self.metrics.count_webhook)
            await webhooks.start()
            events = EventPublisher(self.nc, webhooks)
            engines, bots = EngineRegistry(), BotRegistry()
            engines.load_entry_points()
            engines.register("simulated", SimulatedEngine)  # built in, even without package metadata
            bots.load_entry_points()
            self.service = SessionService(
                store=store, cache=self._cache, ownership=self.shards, actions=registry, settings=self.settings, events=events,
                config_check=make_config_check(engines, bots, self.settings),
            )
            self.connections = ConnectionManager(
                settings=self.settings, worker_id=self.worker_id, nc=self.nc, engines=engines, bots=bots,
                service=self.service, store=store, locks=self._locks, events=events,
            )
            self.service.extend(WhatsAppActions(service=self.service, connections=self.connections, store=store, settings=self.settings))
            self.shards.on_taken = self.connections.restore_shard
            self.shards.on_released = self.connections.release_shard
            self.service.on_deleted = self.connections.forget
            stack.push_async_callback(self.connections.close_all)
            self.degraded = DegradedMode(
                js=js,
                statuses=await request_status_bucket(js),
                service=self.service,
                shards=self.shards,
                locks=self._locks,
                call_from_headers=self._call_from_headers,
                redis_ping=redis.ping,
                storage_errors=_STORAGE_ERRORS,
                on_queue_depth=self.metrics.degraded_queue_depth.set,
            )
            sweeper = ExpirySweeper(store=store, shards=self.shards, cache=self._cache, events=events, interval=self.settings.expiry_sweep_interval)
            sweeper.on_expired = self.connections.forget
            await self.nc.subscribe(subjects.QUERY_LIST, queue=subjects.QUERY_QUEUE, cb=self._on_list)
            await self.nc.subscribe(subjects.release_subject(self.worker_id), cb=self._on_release)
            await self.nc.subscribe(subjects.ping_subject(self.worker_id), cb=self._on_ping)
            log.info("worker_started", worker_id=self.worker_id, pid=os.getpid())
            try:
                async with asyncio.TaskGroup() as group:
                    loops = [
                        group.create_task(self._heartbeat_loop()),
                        group.create_task(self._watch_map()),
                        group.create_task(self.degraded.run()),
                        group.create_task(sweeper.run()),
                        group.create_task(webhooks.run()),
                        group.create_task(self.connections.keep_alive()),
                    ]
                    await stop.wait()
                    await self._drain()
                    for loop in loops:
                        loop.cancel()
            finally:
                log.info("worker_stopped", worker_id=self.worker_id)

    async def _close_nats(self) -> None:
        for task in list(self._control_tasks):
            task.cancel()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()

    # ---- requests ---------------------------------------------------------------------------

    async def _on_request(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, msg: Msg) -> None:
        try:
            shard, session_id, op = subjects.parse_shard_subject(msg.subject)
        except ValueError:
            await self._respond_error(msg, BadRequestError("malformed subject"))
            return
        self.shards.begin(shard)  # type: ignore[union-attr]
        try:
            await self._serve_call(msg, shard, session_id, op)
        finally:
            self.shards.end(shard)  # type: ignore[union-attr]

    async def _serve_call(self, msg: Msg, shard: int, session_id: str, op: str) -> None:
        started = time.perf_counter()
        headers = msg.headers or {}
        outcome = "ok"
        error_code = None
        trace_ids: dict[str, str] = {}
        # One canonical line per request, written where it entered: a request from the gateway
        # is logged there (with this worker's ID); one sent straight over NATS is logged here.
        logged_here = not headers.get(bus.HEADER_LOGGED_BY)
        try:
            request_id = headers.get(bus.HEADER_REQUEST_ID) or msg.reply.rsplit(".", 1)[-1][:24] or "-"
            structlog.contextvars.bind_contextvars(session_id=session_id, request_id=request_id, op=op)
            # Inside an unsampled trace (the default) no real span is made: see consumer_span.
            with consumer_span(
                tracer, f"sm.shard {op}", headers,
                lambda: {"messaging.system": "nats", "session.id": session_id, "sm.op": op, "sm.worker_id": self.worker_id},
            ) as span:
                if logged_here or self._debug_logs:
                    trace_ids = log_ids(span)  # for request_handled, logged after the span has ended
                try:
                    call = self._call_from_headers(headers, session_id, op, msg.data, request_id)
                    await self._check_lease()
                    async with self._locks.hold(session_id):
                        reply, stale = await self._handle(call, shard, headers)
                    reply_headers = {bus.HEADER_STATUS: str(reply.status)}
                    if reply.version is not None:
                        reply_headers[bus.HEADER_VERSION] = str(reply.version)
                    if reply.status == 202:
                        reply_headers[bus.HEADER_QUEUED] = call.request_id
                    if stale:
                        reply_headers[bus.HEADER_STALE] = "1"
                    await self._respond(msg, reply.body, reply_headers)
                except SessionManagerError as error:
                    outcome, error_code = "error", error.code
                    await self._respond_error(msg, error)
                except _STORAGE_ERRORS as exc:
                    outcome, error_code = "error", StorageUnavailableError.code
                    log.warning("storage_unavailable", error_type=type(exc).__name__, error=str(exc), queued=False)
                    await self._respond_error(msg, StorageUnavailableError())
                except Exception:
                    outcome, error_code = "error", InternalError.code
                    log.exception("request_failed")
                    await self._respond_error(msg, InternalError("internal error"))
        finally:
            duration = time.perf_counter() - started
            self.metrics.observe_request(op, duration, error_code)
            emit = log.info if logged_here else log.debug
            emit("request_handled", outcome=outcome, error_code=error_code, duration_ms=round(duration * 1000, 2), **trace_ids)
            # No unbind: each request runs in a task of its own (_on_request), whose context copy dies with it.

    async def _handle(self, call: Call, shard: int, headers: dict[str, str]) -> tuple[Reply, bool]:
        """Apply the call, or queue it when Redis is away (degraded mode); reads may be stale then."""
        assert self.service is not None and self.degraded is not None
        mutating = self.service.is_mutating(call.op)
        if mutating and self.degraded.is_degraded(shard):
            return await self.degraded.enqueue(call, shard, _forwarded(headers)), False
        try:
            reply = await self.service.handle(call)
        except _STORAGE_ERRORS as exc:
            self.degraded.storage_failed()
            if not mutating:
                raise
            # Why this change (and the shard's next ones) go to the queue instead of Redis.
            log.warning("storage_unavailable", error_type=type(exc).__name__, error=str(exc), queued=True)
            return await self.degraded.enqueue(call, shard, _forwarded(headers)), False
        return reply, not mutating and (self.degraded.redis_down or self.degraded.is_degraded(shard))

    def _call_from_headers(self, headers: dict[str, str], session_id: str, op: str, payload: bytes, request_id: str) -> Call:
        if not is_valid_session_id(session_id):
            raise BadRequestError("session IDs match [A-Za-z0-9_-]{1,64}")
        idem_key = headers.get(bus.HEADER_IDEMPOTENCY_KEY) or None
        if idem_key is not None and not is_valid_idempotency_key(idem_key):
            raise BadRequestError("Idempotency-Key must be 1-128 printable ASCII characters")
        if_match = headers.get(bus.HEADER_IF_MATCH)
        try:
            expected = int(if_match) if if_match else None
        except ValueError:
            raise BadRequestError("If-Match must be a session version number") from None
        return Call(
            session_id=session_id,
            op=op,
            payload=payload,
            user_id=headers.get(bus.HEADER_USER) or None,
            admin=headers.get(bus.HEADER_ADMIN) == "1",
            read_only=headers.get(bus.HEADER_READ_ONLY) == "1",
            idem_key_generated=headers.get(bus.HEADER_KEY_GENERATED) == "1",
            request_id=request_id,
            idem_key=idem_key,
            if_match=expected,
            client_ip=headers.get(bus.HEADER_CLIENT_IP) or None,
        )

    async def _check_lease(self) -> None:
        """After a stall longer than the failure window our shards may have moved: re-read the map."""
        if time.monotonic() - self._last_tick <= self.settings.failure_timeout:
            return
        log.warning("stalled_rechecking_map", stalled_s=round(time.monotonic() - self._last_tick, 2))
        if not await self._refresh_map():
            raise NotOwnerError("worker stalled and cannot confirm shard ownership")

    async def _respond_error(self, msg: Msg, error: SessionManagerError) -> None:
        await self._respond(msg, b"", error_headers(error))

    async def _respond(self, msg: Msg, body: bytes, headers: dict[str, str]) -> None:
        """Every reply, answer or error, names the worker that sent it."""
        if not msg.reply:
            return
        headers[bus.HEADER_WORKER] = self.worker_id
        try:
            await self.nc.publish(msg.reply, body, headers=headers)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the caller will time out and retry
            log.warning("reply_failed", exc_info=True)

    async def _on_list(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._serve_list(msg))
        self._tasks.add(task)
        task.add_done_callback(self._request_done)

    async def _serve_list(self, msg: Msg) -> None:
        try:
            body = await self.service.list_sessions(msg.data)  # type: ignore[union-attr]
            await self._respond(msg, body, {bus.HEADER_STATUS: "200"})
        except SessionManagerError as error:
            await self._respond_error(msg, error)
        except _STORAGE_ERRORS:
            await self._respond_error(msg, StorageUnavailableError())

    async def _on_reconnected(self) -> None:
        """After a NATS outage the map may have moved on without us: re-read it now."""
        log.info("nats_reconnected")
        task = asyncio.get_running_loop().create_task(self._refresh_map())
        self._control_tasks.add(task)
        task.add_done_callback(self._control_tasks.discard)

    async def _on_ping(self, msg: Msg) -> None:
        await self._respond(msg, b"pong", {})

    async def _on_release(self, msg: Msg) -> None:
        try:
            request = _release_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        task = asyncio.get_running_loop().create_task(self._release_and_ack(msg, request))
        self._control_tasks.add(task)
        task.add_done_callback(self._control_tasks.discard)

    async def _release_and_ack(self, msg: Msg, request: ReleaseShard) -> None:
        await self.shards.on_release_request(request)  # type: ignore[union-attr]
        await self._respond(msg, b"released", {})

    # ---- membership -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        seq = 0
        started_at = time.time()
        host = socket.gethostname()
        while True:
            self._last_tick = time.monotonic()
            seq += 1
            beat = Heartbeat(
                worker_id=self.worker_id,
                pid=os.getpid(),
                host=host,
                started_at=started_at,
                seq=seq,
                sessions=len(self._cache),
                in_flight=self.shards.in_flight,  # type: ignore[union-attr]
                shards=self.shards.shards,  # type: ignore[union-attr]
                draining=not self._accepting,
                degraded=self.degraded is not None and self.degraded.active,
            )
            try:
                await self.nc.publish(subjects.heartbeat_subject(self.worker_id), json_encoder.encode(beat))  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - a missed beat while NATS reconnects is expected
                log.debug("heartbeat_failed", exc_info=True)
            self._beat_now.clear()
            try:
                async with asyncio.timeout(self.settings.heartbeat_interval):
                    await self._beat_now.wait()
            except TimeoutError:
                pass

    async def _watch_map(self) -> None:
        """Follow the shard map; the watcher is re-created if NATS drops it."""
        while True:
            try:
                kv = await self._shard_map_bucket()
                watcher = await kv.watch(subjects.SHARD_MAP_KEY)
                async for entry in watcher:
                    if entry is None or not entry.value:
                        continue
                    await self._apply(shard_map_decoder.decode(entry.value), entry.revision)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep following the map through NATS restarts
                log.warning("shard_map_watch_failed", exc_info=True)
                await asyncio.sleep(0.5)

    async def _shard_map_bucket(self):  # type: ignore[no-untyped-def]
        js = self.nc.jetstream()  # type: ignore[union-attr]
        while True:
            try:
                return await js.key_value(subjects.SHARD_MAP_BUCKET)
            except BucketNotFoundError:
                await asyncio.sleep(0.2)  # the supervisor creates it

    async def _refresh_map(self) -> bool:
        try:
            kv = await self._shard_map_bucket()
            entry = await asyncio.wait_for(kv.get(subjects.SHARD_MAP_KEY), timeout=1.0)
            await self._apply(shard_map_decoder.decode(entry.value), entry.revision)
            self._last_tick = time.monotonic()
            return True
        except Exception:  # noqa: BLE001
            log.warning("shard_map_refresh_failed", exc_info=True)
            return False

    async def _apply(self, shard_map: ShardMap, revision: int) -> None:
        # The watcher and a post-stall refresh can both deliver; never go back to an older map.
        if revision <= self._map_revision:
            return
        self._map_revision = revision
        await self.shards.apply_map(shard_map)  # type: ignore[union-attr]

    async def _drain(self) -> None:
        """Graceful stop: announce draining, keep serving while the supervisor hands every shard
        to another worker (each new owner asks us to release it), then leave."""
        self._accepting = False
        self._beat_now.set()  # the supervisor learns we are draining now, not at the next beat
        log.info("worker_draining", worker_id=self.worker_id, in_flight=self.shards.in_flight)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.settings.drain_timeout
        await self.shards.wait_empty(timeout=self.settings.drain_timeout)  # type: ignore[union-attr]
        await self.shards.release_all()  # type: ignore[union-attr]
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.1, deadline - time.monotonic()))
        try:
            await self.nc.publish(subjects.bye_subject(self.worker_id), json_encoder.encode(WorkerBye(worker_id=self.worker_id)))  # type: ignore[union-attr]
            await self.nc.flush(timeout=1)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the supervisor will see our heartbeats stop instead
            log.warning("bye_failed", exc_info=True)

