"""Degraded mode: while Redis is unreachable, changes are queued in JetStream, not refused.

A change that cannot be persisted is appended to ``sm.queue.<shard>`` (stream SM_QUEUE, file
storage, work-queue retention) and the client gets ``202`` with a request id to poll in the
``sm-requests`` bucket. From then on the shard is *degraded*: every later change to it is queued
behind the first, so order is kept. When Redis answers again the owner replays the queue in
arrival order through the normal write path, whose idempotency keys make a replay after a crash
apply once, and records each outcome (applied with its result, or rejected with the reason).
The shard leaves degraded mode under the same lock that queueing takes, once nothing is pending.
A new owner learns of a shard's backlog from the stream, so a failover loses no queued change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.kv import KeyValue

from sessionmgr.common.errors import SessionManagerError, StorageUnavailableError, error_headers
from sessionmgr.common.models import QueuedRequest, RequestStatus, json_encoder, queued_request_decoder
from sessionmgr.common.streams import QUEUE_STREAM, queue_consumer, queue_subject
from sessionmgr.worker.keyed_lock import KeyedLock
from sessionmgr.worker.sessions import Call, Reply, SessionService
from sessionmgr.worker.shards import ShardOwnership

log = structlog.get_logger(__name__)
_BATCH = 64


class DegradedMode:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        statuses: KeyValue,
        service: SessionService,
        shards: ShardOwnership,
        locks: KeyedLock,
        call_from_headers: Callable[[dict[str, str], str, str, bytes, str], Call],
        redis_ping: Callable[[], object],
        storage_errors: tuple[type[BaseException], ...],
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        self._on_queue_depth = on_queue_depth
        self._js = js
        self._statuses = statuses
        self._service = service
        self._shards = shards
        self._locks = locks
        self._call_from_headers = call_from_headers
        self._redis_ping = redis_ping
        self._storage_errors = storage_errors
        self._degraded: set[int] = set()
        self._shard_locks: dict[int, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self.redis_down = False
        self.queued_total = 0
        self.applied_total = 0

    # ---- request path ---------------------------------------------------------------------

    def is_degraded(self, shard: int) -> bool:
        return shard in self._degraded

    @property
    def active(self) -> bool:
        return bool(self._degraded) or self.redis_down

    def _lock(self, shard: int) -> asyncio.Lock:
        return self._shard_locks.setdefault(shard, asyncio.Lock())

    async def enqueue(self, call: Call, shard: int, headers: dict[str, str]) -> Reply:
        """Queue a change for ``shard`` and answer 202; raises 503 if even NATS cannot take it."""
        queued_at = datetime.now(UTC)
        request = QueuedRequest(
            request_id=call.request_id, session_id=call.session_id, op=call.op, payload=call.payload, headers=headers, queued_at=queued_at
        )
        async with self._lock(shard):
            self._degraded.add(shard)
            try:
                await self._js.publish(queue_subject(shard), json_encoder.encode(request), headers={"Nats-Msg-Id": call.request_id})
                await self._statuses.put(
                    call.request_id,
                    json_encoder.encode(
                        RequestStatus(request_id=call.request_id, session_id=call.session_id, status="queued", user_id=call.user_id, queued_at=queued_at)
                    ),
                )
            except Exception as exc:  # noqa: BLE001 - neither Redis nor JetStream: the client must retry
                log.error("queue_append_failed", error=type(exc).__name__)
                raise StorageUnavailableError("storage and queue both unavailable; retry later") from None
        self.queued_total += 1
        self._wake.set()
        log.warning("request_queued", shard=shard, request_id=call.request_id)
        body = json_encoder.encode({"request_id": call.request_id, "status": "queued"})
        return Reply(body, None, 202)

    def storage_failed(self) -> None:
        self.redis_down = True
        self._wake.set()

    # ---- recovery -------------------------------------------------------------------------

    async def run(self) -> None:
        """Find shards with a backlog (ours after a failover too) and drain them once Redis answers."""
        while True:
            try:
                await self._discover_backlog()
                if self._degraded or self.redis_down:
                    if await self._redis_ok():
                        self.redis_down = False
                        # Shards drain in parallel; within a shard, strictly in arrival order.
                        owned = [s for s in sorted(self._degraded) if self._shards.epoch_of(s) is not None]
                        await asyncio.gather(*(self._drain(shard) for shard in owned))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep trying; the queue is durable
                log.warning("degraded_loop_error", exc_info=True)
            self._wake.clear()
            try:
                async with asyncio.timeout(0.25 if (self._degraded or self.redis_down) else 2.0):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _redis_ok(self) -> bool:
        try:
            await self._redis_ping()  # type: ignore[misc]
            return True
        except self._storage_errors:
            self.redis_down = True
            return False

    async def _discover_backlog(self) -> None:
        owned = set(self._shards.shards)
        # Degraded shards we no longer own are the new owner's business now.
        self._degraded &= owned
        info = await self._js.stream_info(QUEUE_STREAM, subjects_filter="sm.queue.>")
        depth = 0
        for subject, count in (info.state.subjects or {}).items():
            shard = int(subject.rsplit(".", 1)[1])
            if count and shard in owned:
                self._degraded.add(shard)
                depth += count
        if self._on_queue_depth is not None:
            self._on_queue_depth(depth)

    async def _drain(self, shard: int) -> None:
        sub = await self._js.pull_subscribe(
            queue_subject(shard),
            durable=queue_consumer(shard),
            stream=QUEUE_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=_BATCH, ack_wait=30),
        )
        try:
            while self._shards.epoch_of(shard) is not None:
                try:
                    messages = await sub.fetch(_BATCH, timeout=0.2)
                except Exception:  # noqa: BLE001 - nats TimeoutError: nothing pending right now
                    messages = []
                if not messages:
                    async with self._lock(shard):
                        info = await sub.consumer_info()
                        if info.num_pending == 0 and info.num_ack_pending == 0:
                            self._degraded.discard(shard)
                            log.info("shard_recovered", shard=shard, applied_total=self.applied_total)
                            return
                    continue
                for message in messages:
                    if not await self._apply(message):
                        return  # Redis went away again; the message stays for the next round
                    await message.ack()
        finally:
            await sub.unsubscribe()

    async def _apply(self, message) -> bool:  # type: ignore[no-untyped-def]
        try:
            request = queued_request_decoder.decode(message.data)
        except msgspec.DecodeError:
            log.error("queued_request_unreadable")
            return True
        call = self._call_from_headers(request.headers, request.session_id, request.op, request.payload, request.request_id)
        status = RequestStatus(request_id=request.request_id, session_id=request.session_id, status="applied", user_id=call.user_id, queued_at=request.queued_at)
        try:
            async with self._locks.hold(request.session_id):
                reply = await self._service.handle(call)
            status.http_status = reply.status
            status.result = msgspec.json.decode(reply.body) if reply.body else None
        except self._storage_errors:
            self.redis_down = True
            return False
        except SessionManagerError as error:
            if error.retryable:
                return False
            status.status = "rejected"
            status.http_status = error.status
            status.error = {"code": error.code, "detail": error_headers(error)["Nats-Service-Error"]}
        status.applied_at = datetime.now(UTC)
        await self._statuses.put(request.request_id, json_encoder.encode(status))
        self.applied_total += 1
        return True
