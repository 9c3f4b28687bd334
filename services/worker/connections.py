"""The WhatsApp connections of the sessions this worker owns: one engine per live session.

Engine events are queued per session and applied one at a time under the session's lock, so
they interleave with client requests in a single order. Each becomes a fenced, versioned write
through :class:`SessionService`; a write this worker may no longer make (the shard moved, the
epoch was raised) closes the connection at once, which is how a paused or partitioned former
owner is kept from holding the linked device next to the new owner.

Which sessions should be connected is itself persisted (the shard's live index, written with the
status), so a new owner reconnects exactly those, from their stored auth state, without pairing.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import secrets
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sessionmgr.common.errors import (
    LimitExceededError,
    NotOwnerError,
    SessionManagerError,
    SessionNotFoundError,
    StorageUnavailableError,
)
from sessionmgr.common.ids import new_request_id
from sessionmgr.common.models import ChatMessage, Connection, LinkedAccount, Session, copy_json, json_encoder
from sessionmgr.common.settings import Settings
from sessionmgr.worker.bots import BotRegistry
from sessionmgr.worker.engine import (
    AuthUpdated,
    Connected,
    Disconnected,
    Engine,
    EngineError,
    EngineEvent,
    EngineRegistry,
    EngineSpec,
    InboundMessage,
    MessageAck,
    Paired,
    PairingTimedOut,
    QrCode,
)
from sessionmgr.worker.events import EventPublisher
from sessionmgr.worker.keyed_lock import KeyedLock
from sessionmgr.worker.sessions import Call, Change, SessionService
from sessionmgr.worker.store import SessionStore

log = structlog.get_logger(__name__)

LIVE_STATUSES = frozenset({"STARTING", "SCAN_QR_CODE", "WORKING"})
ACK_RANK = {"pending": 0, "sent": 1, "delivered": 2, "read": 3}
_STORAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError, StorageUnavailableError)
_MAX_RECONNECT_DELAY = 30.0
_MAX_QUEUED_EVENTS = 1000
_RESTORE_CONCURRENCY = 32


def new_outbound_id(chat_id: str) -> str:
    """WhatsApp Web's id shape for a message we send: ``true_<chat>_<key>``."""
    return f"true_{chat_id}_3EB0{secrets.token_hex(8).upper()}"


@dataclass(slots=True, eq=False)
class LiveConnection:
    session_id: str
    shard: int
    engine: Engine = field(init=False)
    events: deque[EngineEvent] | None = None  # made on the first event: most connections are idle
    qr: str | None = None
    auth_version: int = 0
    connected: bool = False
    pump: asyncio.Task[None] | None = None
    reconnect: asyncio.Task[None] | None = None
    closed: bool = False


class _Emitter:
    """The engine's handle back into the manager (an engine never sees the manager itself)."""

    __slots__ = ("_manager", "live")

    def __init__(self, manager: ConnectionManager, live: LiveConnection) -> None:
        self._manager = manager
        self.live = live

    def emit(self, event: EngineEvent) -> None:
        self._manager.enqueue(self.live, event)


class ConnectionManager:
    def __init__(
        self,
        *,
        settings: Settings,
        worker_id: str,
        nc: Any,
        engines: EngineRegistry,
        bots: BotRegistry,
        service: SessionService,
        store: SessionStore,
        locks: KeyedLock,
        events: EventPublisher,
    ) -> None:
        self._settings = settings
        self._worker_id = worker_id
        self._nc = nc
        self._engines = engines
        self._bots = bots
        self._service = service
        self._store = store
        self._locks = locks
        self._events = events
        self._live: dict[str, LiveConnection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._restore_slots = asyncio.Semaphore(_RESTORE_CONCURRENCY)

    def __len__(self) -> int:
        return len(self._live)

    def get(self, session_id: str) -> LiveConnection | None:
        return self._live.get(session_id)

    # ---- opening and closing (callers hold the session's lock) ----------------------------

    async def open(self, session: Session) -> LiveConnection:
        """Create the session's engine and start it from the stored auth state, if any."""
        await self.close(session.session_id)
        live = LiveConnection(session.session_id, self._store.shard_of(session.session_id))
        spec = EngineSpec(session_id=session.session_id, worker_id=self._worker_id, settings=self._settings, nc=self._nc)
        live.engine = self._engines.create(session.config.engine or self._settings.whatsapp_default_engine, spec, _Emitter(self, live))
        self._live[session.session_id] = live
        await self._start_engine(live)
        return live

    async def close(self, session_id: str, *, logout: bool = False) -> None:
        """Stop the engine and forget it; nothing is written (the caller persists any status)."""
        live = self._live.pop(session_id, None)
        if live is None:
            return
        live.closed = True
        live.connected = False
        if live.reconnect is not None:
            live.reconnect.cancel()
        try:
            if logout:
                await live.engine.logout()
            await live.engine.stop()
        except Exception:  # noqa: BLE001 - a failing engine is still gone from here on
            log.warning("engine_stop_failed", session_id=session_id, exc_info=True)

    async def forget(self, session_id: str) -> None:
        """The session was deleted or expired: unlink its device (its auth state is gone with it)."""
        await self.close(session_id, logout=True)

    async def keep_alive(self) -> None:
        """A connected session is in use even when nobody calls the API: renew its TTL in time.

        Runs until cancelled; each renewal is an ordinary fenced write (no event).
        """
        ttl = self._settings.session_ttl
        interval = max(0.5, min(ttl / 4, 60.0))
        while True:
            await asyncio.sleep(interval)
            horizon = datetime.now(UTC).timestamp() + ttl / 2
            for session_id in list(self._live):
                try:
                    async with self._locks.hold(session_id):
                        session = await self._service.current(session_id)
                        if session is None or session.expires_at.timestamp() > horizon or session_id not in self._live:
                            continue

                        def compute(current: Session | None) -> Change:
                            if current is None:
                                raise SessionNotFoundError(f"no session {session_id!r}")
                            return Change(self._service.next_version(current), b"", events=[])

                        await self._service.mutate(self._internal_call(session_id, "engine.keepalive"), compute)
                except (NotOwnerError, SessionNotFoundError, *_STORAGE_ERRORS):
                    continue
                except Exception:  # noqa: BLE001 - one session's failure must not stop the renewals
                    log.warning("keepalive_failed", session_id=session_id, exc_info=True)

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(sid) for sid in list(self._live)))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _start_engine(self, live: LiveConnection) -> None:
        live.auth_version, auth = await self._store.load_auth(live.session_id)
        try:
            await live.engine.start(auth)
        except EngineError as exc:
            self.enqueue(live, Disconnected(reason=str(exc)))
        except Exception as exc:  # noqa: BLE001 - a plug-in's bug counts as a failed attempt, not a 500
            log.exception("engine_start_failed", session_id=live.session_id)
            self.enqueue(live, Disconnected(reason=f"engine error: {type(exc).__name__}"))

    # ---- shard moves ----------------------------------------------------------------------

    def restore_shard(self, shard: int) -> None:
        """A new owner reconnects the shard's live sessions, in the background."""
        self._spawn(self._restore_shard(shard))

    async def _restore_shard(self, shard: int) -> None:
        try:
            ids = await self._store.live_session_ids(shard)
        except _STORAGE_ERRORS:
            log.warning("restore_failed", shard=shard, exc_info=True)
            return
        await asyncio.gather(*(self._restore(sid) for sid in ids))

    async def _restore(self, session_id: str) -> None:
        async with self._restore_slots, self._locks.hold(session_id):
            try:
                self._service.owner_epoch(session_id)
                session = await self._service.current(session_id)
                if session is None or session.connection.status not in LIVE_STATUSES or session_id in self._live:
                    return
                await self.open(session)
                log.info("connection_restored", session_id=session_id, status=session.connection.status)
            except (NotOwnerError, *_STORAGE_ERRORS):
                return

    async def release_shard(self, shard: int) -> None:
        """The shard left this worker: drop its connections without writing (the new owner resumes them)."""
        await asyncio.gather(*(self.close(sid) for sid, live in list(self._live.items()) if live.shard == shard))

    # ---- engine events --------------------------------------------------------------------

    def enqueue(self, live: LiveConnection, event: EngineEvent) -> None:
        if live.closed:
            return
        if live.events is None:
            live.events = deque()
        if len(live.events) >= _MAX_QUEUED_EVENTS:
            # Bounded: an engine flooding faster than Redis takes the writes loses the excess, loudly.
            log.warning("engine_event_dropped", session_id=live.session_id, event=type(event).__name__, queued=len(live.events))
            return
        live.events.append(event)
        if live.pump is None:
            live.pump = self._spawn(self._pump(live))

    async def _pump(self, live: LiveConnection) -> None:
        try:
            await self._drain_events(live)
        finally:
            live.pump = None
            if live.events is not None and not live.events:
                live.events = None

    async def _drain_events(self, live: LiveConnection) -> None:
        assert live.events is not None
        backoff = 0.05
        while live.events and not live.closed:
            event = live.events[0]
            try:
                async with self._locks.hold(live.session_id):
                    if live.closed:
                        return
                    await self._apply(live, event)
                live.events.popleft()
                backoff = 0.05
            except (NotOwnerError, SessionNotFoundError) as exc:
                # Fenced, moved or deleted: this worker must not hold the device any longer.
                log.info("connection_dropped", session_id=live.session_id, reason=type(exc).__name__)
                if self._live.get(live.session_id) is live:
                    await self.close(live.session_id)
                return
            except _STORAGE_ERRORS:
                # Keep the event (an inbound message must not be lost) and retry while we own it.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:  # noqa: BLE001 - one bad event must not wedge the session
                log.exception("engine_event_failed", session_id=live.session_id, event=type(event).__name__)
                live.events.popleft()

    async def _apply(self, live: LiveConnection, event: EngineEvent) -> None:
        if isinstance(event, QrCode):
            live.qr = event.qr
            await self._set_status(live, "SCAN_QR_CODE")
        elif isinstance(event, (Paired, AuthUpdated)):
            await self._save_auth(live, event.auth)
        elif isinstance(event, Connected):
            live.qr = None
            live.connected = True
            await self._set_status(live, "WORKING", me=event.me, failures=0, last_error=None)
            await self._send_pending(live)
        elif isinstance(event, Disconnected):
            await self._on_disconnected(live, event)
        elif isinstance(event, PairingTimedOut):
            live.qr = None
            await self._set_status(live, "FAILED", last_error="the QR code was not scanned in time")
            await self.close(live.session_id)
        elif isinstance(event, InboundMessage):
            await self._on_inbound(live, event)
        elif isinstance(event, MessageAck):
            await self._on_ack(live, event)

    async def _on_disconnected(self, live: LiveConnection, event: Disconnected) -> None:
        live.connected = False
        if event.logged_out:
            await self._save_auth(live, None)
            await self._set_status(live, "STOPPED", me=None, failures=0, last_error=f"logged out: {event.reason}")
            await self.close(live.session_id)
            return
        if event.replaced:
            await self._set_status(live, "FAILED", last_error=event.reason)
            await self.close(live.session_id)
            return
        session = await self._session(live)
        failures = session.connection.failures + 1
        if failures >= self._settings.connection_max_failures:
            # The crash-loop guard: stay FAILED until someone starts it again.
            await self._set_status(live, "FAILED", failures=failures, last_error=f"{event.reason} ({failures} failures in a row)")
            await self.close(live.session_id)
            return
        await self._set_status(live, "STARTING", failures=failures, last_error=event.reason)
        delay = min(self._settings.connection_retry_delay * 2 ** (failures - 1), _MAX_RECONNECT_DELAY)
        live.reconnect = self._spawn(self._reconnect(live, delay * random.uniform(0.8, 1.2)))

    async def _reconnect(self, live: LiveConnection, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self._locks.hold(live.session_id):
            if live.closed:
                return
            try:
                self._service.owner_epoch(live.session_id)
                await self._start_engine(live)
            except NotOwnerError:
                await self.close(live.session_id)
            except _STORAGE_ERRORS:
                self.enqueue(live, Disconnected(reason="storage unavailable while reconnecting"))

    # ---- messages -------------------------------------------------------------------------

    async def _on_inbound(self, live: LiveConnection, event: InboundMessage) -> None:
        if await self._store.message(live.session_id, event.id) is not None:
            return  # already in the history: a redelivery after a failover
        bot_name = (await self._session(live)).config.bot
        bot = self._bots.get(bot_name) if bot_name else None
        replies: list[ChatMessage] = []

        def compute(current: Session | None) -> Change:
            if current is None:
                raise SessionNotFoundError(f"no session {live.session_id!r}")
            seq = current.message_seq + 1
            inbound = ChatMessage(
                id=event.id, chat_id=event.chat_id, from_me=False, text=event.text,
                timestamp=datetime.fromtimestamp(event.timestamp, UTC), status="received", seq=seq,
            )
            context = current.context
            replies.clear()
            if bot is not None:
                context = copy_json(current.context)
                for text in bot.on_message(inbound, context)[:8]:
                    seq += 1
                    replies.append(self.new_outbound(event.chat_id, text[: self._settings.max_message_text], seq))
                if len(json_encoder.encode(context)) > self._settings.max_context_bytes:
                    raise LimitExceededError("the bot's context would exceed MAX_CONTEXT_BYTES")
            session = self._service.next_version(current, context=context, message_seq=seq)
            events = [("message", inbound)]
            return Change(session, b"", messages=[inbound, *replies], events=events)

        await self._service.mutate(self._internal_call(live.session_id, "engine.message"), compute)
        for reply in replies:
            await self.send(live.session_id, reply)

    @staticmethod
    def new_outbound(chat_id: str, text: str, seq: int) -> ChatMessage:
        """A message of ours, ``pending`` until the engine has handed it to WhatsApp."""
        return ChatMessage(
            id=new_outbound_id(chat_id), chat_id=chat_id, from_me=True, text=text, timestamp=datetime.now(UTC), status="pending", seq=seq
        )

    async def send(self, session_id: str, message: ChatMessage) -> str:
        """Hand a persisted pending message to the engine; its status once WhatsApp took it."""
        live = self._live.get(session_id)
        if live is None or not live.connected:
            return message.status  # stays pending: sent when the connection is (re)established
        try:
            await live.engine.send_text(message.id, message.chat_id, message.text)
        except EngineError as exc:
            log.info("send_deferred", session_id=session_id, message_id=message.id, reason=str(exc))
            return message.status
        except Exception:  # noqa: BLE001 - stored as pending: resent on the next connect, never lost
            log.exception("engine_send_failed", session_id=session_id, message_id=message.id)
            return message.status
        await self._update_message(live, message, "sent")
        return "sent"

    async def _send_pending(self, live: LiveConnection) -> None:
        """After (re)connecting, send what was accepted but not yet handed over, oldest first."""
        for message in await self._store.messages(live.session_id):
            if message.from_me and message.status == "pending":
                if await self.send(live.session_id, message) != "sent":
                    return

    async def _on_ack(self, live: LiveConnection, event: MessageAck) -> None:
        message = await self._store.message(live.session_id, event.id)
        if message is None:
            return
        await self._update_message(live, message, event.status)

    async def _update_message(self, live: LiveConnection, message: ChatMessage, status: str) -> None:
        if ACK_RANK.get(status, -1) <= ACK_RANK.get(message.status, -1):
            return  # acks only move forward (a late "delivered" after "read" changes nothing)
        shard, epoch = self._service.owner_epoch(live.session_id)
        updated = msgspec.structs.replace(message, status=status)
        written = await self._store.update_message(shard=shard, epoch=epoch, session_id=live.session_id, message=updated)
        if written is None:
            raise NotOwnerError(f"shard {shard} now belongs to a newer owner")
        if written:
            session = await self._session(live)
            await self._events.publish(
                "message.ack", session_id=live.session_id, user_id=session.user_id, version=session.version,
                data=_ack_data(updated), webhooks=session.config.webhooks,
            )

    # ---- status and auth state ------------------------------------------------------------

    async def _session(self, live: LiveConnection) -> Session:
        session = await self._service.current(live.session_id)
        if session is None:
            raise SessionNotFoundError(f"no session {live.session_id!r}")
        return session

    async def _set_status(self, live: LiveConnection, status: str, **changes: Any) -> None:
        """Persist the connection's status (and ``me``/``failures``/``last_error`` when given)."""

        def compute(current: Session | None) -> Change:
            if current is None:
                raise SessionNotFoundError(f"no session {live.session_id!r}")
            if connection_with(current.connection, status, **changes) == current.connection:
                return Change(current, b"", events=[])  # nothing new: no write (see SessionService)
            return status_change(self._service, current, status, **changes)

        await self._service.mutate(self._internal_call(live.session_id, "engine.status"), compute)

    async def _save_auth(self, live: LiveConnection, state: bytes | None) -> None:
        shard, epoch = self._service.owner_epoch(live.session_id)
        for _ in range(2):
            outcome = await self._store.save_auth(
                shard=shard, epoch=epoch, session_id=live.session_id, expected_version=live.auth_version,
                state=state, ttl_ms=self._settings.session_ttl * 1000,
            )
            if outcome.status == "OK":
                live.auth_version += 1
                return
            if outcome.status == "FENCED":
                raise NotOwnerError(f"shard {shard} now belongs to a newer owner")
            live.auth_version = int(outcome.detail or 0)  # VERSION: our count was behind; ours is newer
        raise NotOwnerError("auth state keeps changing under this worker")

    async def delete_auth(self, session_id: str) -> None:
        """Void the stored auth state (logout); the connection must already be closed."""
        shard, epoch = self._service.owner_epoch(session_id)
        version, state = await self._store.load_auth(session_id)
        if state is None:
            return
        outcome = await self._store.save_auth(shard=shard, epoch=epoch, session_id=session_id, expected_version=version, state=None, ttl_ms=1)
        if outcome.status == "FENCED":
            raise NotOwnerError(f"shard {shard} now belongs to a newer owner")

    def _internal_call(self, session_id: str, op: str) -> Call:
        return Call(session_id=session_id, op=op, payload=b"", user_id=None, admin=True, request_id=new_request_id())

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        # A fresh context: the task must not log under the request that happened to start it.
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


_UNSET: Any = object()


def connection_with(
    connection: Connection, status: str, *, me: LinkedAccount | None = _UNSET, failures: int | None = None, last_error: str | None = _UNSET
) -> Connection:
    return Connection(
        status=status,
        since=connection.since if status == connection.status and connection.since else datetime.now(UTC),
        me=connection.me if me is _UNSET else me,
        last_error=connection.last_error if last_error is _UNSET else last_error,
        failures=connection.failures if failures is None else failures,
    )


def status_change(service: SessionService, current: Session, status: str, **changes: Any) -> Change:
    """The next version of ``current`` with its connection in ``status``: the write, the shard's
    live index and the ``session.status`` event, for engine events and client actions alike."""
    connection = connection_with(current.connection, status, **changes)
    session = service.next_version(current, connection=connection)
    return Change(session, b"", live=status in LIVE_STATUSES, events=[("session.status", status_data(connection))])


def status_data(connection: Connection) -> dict[str, Any]:
    return {"status": connection.status, "me": connection.me, "last_error": connection.last_error}


def _ack_data(message: ChatMessage) -> dict[str, Any]:
    return {"id": message.id, "chat_id": message.chat_id, "status": message.status}


__all__ = ["ConnectionManager", "LiveConnection", "LIVE_STATUSES", "SessionManagerError"]
