"""Session operations as the owning worker runs them: validate, apply, persist, then answer.

Every change is computed on a copy, written with one fenced compare-and-set script, and only
then made visible in memory and acknowledged. Callers serialise calls per session.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import msgspec
from opentelemetry import trace

from sessionmgr.common import subjects
from sessionmgr.common.errors import (
    BadRequestError,
    ForbiddenError,
    IdempotencyConflictError,
    LimitExceededError,
    NotOwnerError,
    SessionExistsError,
    SessionManagerError,
    SessionNotFoundError,
    ValidationFailedError,
    VersionMismatchError,
)
from sessionmgr.common.ids import is_valid_user_id
from sessionmgr.common.models import (
    ActionResult,
    ChatMessage,
    CreateSessionCommand,
    ListSessionsQuery,
    Session,
    SessionConfig,
    SessionPage,
    UpdateSessionCommand,
    copy_json,
    json_encoder,
    view_of,
)
from sessionmgr.common.settings import Settings
from sessionmgr.common.validation import check_metadata
from sessionmgr.worker.actions import ActionRegistry
from sessionmgr.worker.cache import SessionCache
from sessionmgr.worker.events import EventPublisher
from sessionmgr.worker.lifecycle import INITIAL_STATE, check_transition
from sessionmgr.worker.store import ABSENT, IdempotencyRecord, SessionStore, decode_record

tracer = trace.get_tracer("sessionmgr.worker")
_NO_SPAN: AbstractContextManager[None] = nullcontext()


def _redis_span(name: str) -> AbstractContextManager[Any]:
    """A Redis client span inside a sampled trace; outside one (the default) nothing to create."""
    if not trace.get_current_span().is_recording():
        return _NO_SPAN
    return tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes={"db.system": "redis"})

_create_decoder = msgspec.json.Decoder(CreateSessionCommand)
_update_decoder = msgspec.json.Decoder(UpdateSessionCommand)
_list_decoder = msgspec.json.Decoder(ListSessionsQuery)
_any_decoder = msgspec.json.Decoder()
_MAX_VERSION_RETRIES = 3
# Keys the gateway generated only guard its own retries (bounded by REQUEST_TIMEOUT); keep them a minute.
GENERATED_KEY_TTL_MS = 60_000


class Ownership(Protocol):
    def epoch_of(self, shard: int) -> int | None: ...

    def fenced(self, shard: int, epoch_in_force: int) -> None: ...


@dataclass(slots=True)
class Call:
    session_id: str
    op: str
    payload: bytes
    user_id: str | None  # None: a trusted operator on the NATS CLI subjects
    admin: bool
    request_id: str
    idem_key: str | None = None
    idem_key_generated: bool = False
    read_only: bool = False
    if_match: int | None = None
    client_ip: str | None = None

    def may_access(self, session: Session) -> bool:
        return self.admin or self.user_id is None or self.user_id == session.user_id

    def visible(self, session: Session | None) -> Session:
        """``session`` if it exists for this caller; someone else's is as absent as a missing one."""
        if session is None or not self.may_access(session):
            raise SessionNotFoundError(f"no session {self.session_id!r}")
        return session


@dataclass(slots=True)
class Reply:
    body: bytes
    version: int | None
    status: int = 200
    replayed: bool = False  # the stored answer to an earlier request with the same idempotency key


@dataclass(slots=True)
class Change:
    """What one compute step decided: the new session (None deletes it) and what goes with it."""

    session: Session | None
    body: bytes
    status: int = 200
    messages: Sequence[ChatMessage] = ()  # history entries written in the same script
    live: bool | None = None  # join (True) or leave (False) the shard's live-connection index
    events: Sequence[tuple[str, Any]] | None = None  # (type, data); None: the op's usual event


Compute = Callable[[Session | None], Change]
ConfigCheck = Callable[[SessionConfig], None]


class ActionExtension(Protocol):
    """Actions served outside the context-action registry (the WhatsApp connection's)."""

    ops: frozenset[str]

    def mutates(self, op: str) -> bool: ...

    async def handle(self, call: Call) -> Reply: ...


def _decode(decoder: msgspec.json.Decoder, payload: bytes) -> Any:
    try:
        return decoder.decode(payload or b"{}")
    except msgspec.ValidationError as exc:
        raise ValidationFailedError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"malformed JSON: {exc}") from None


class SessionService:
    def __init__(
        self,
        *,
        store: SessionStore,
        cache: SessionCache,
        ownership: Ownership,
        actions: ActionRegistry,
        settings: Settings,
        events: EventPublisher | None = None,
        config_check: ConfigCheck | None = None,
    ) -> None:
        self._store = store
        self._config_check = config_check
        self._extension: ActionExtension | None = None
        # Called (under the session's lock) once a session is gone: its WhatsApp device goes too.
        self.on_deleted: Callable[[str], Awaitable[None]] | None = None
        self._events = events
        self._cache = cache
        self._ownership = ownership
        self._actions = actions
        self._settings = settings
        self._ttl = timedelta(seconds=settings.session_ttl)

    def extend(self, extension: ActionExtension) -> None:
        self._extension = extension

    def is_mutating(self, op: str) -> bool:
        """Whether ``op`` changes the session (and so must be queued while Redis is away)."""
        if op in subjects.SESSION_OPS:
            return op != subjects.OP_GET
        if self._extension is not None and op in self._extension.ops:
            return self._extension.mutates(op)
        try:
            return self._actions.get(op).mutates
        except SessionManagerError:
            return False

    async def handle(self, call: Call) -> Reply:
        if call.op == subjects.OP_GET:
            return await self._get(call)
        if call.op == subjects.OP_CREATE:
            return await self.mutate(call, self._compute_create(call))
        if call.op == subjects.OP_UPDATE:
            return await self.mutate(call, self._compute_update(call))
        if call.op == subjects.OP_DELETE:
            return await self.mutate(call, self._compute_delete(call))
        if self._extension is not None and call.op in self._extension.ops:
            return await self._extension.handle(call)
        return await self._run_action(call)

    # ---- reads --------------------------------------------------------------------------

    async def current(self, session_id: str) -> Session | None:
        session = self._cache.get(session_id)
        if session is None:
            with _redis_span("redis HGET"):
                session = await self._store.load(session_id)
            if session is None:
                return None
            self._cache.put(session)
        if session.expires_at <= datetime.now(UTC):
            self._cache.evict(session_id)
            return None
        return session

    async def visible(self, call: Call) -> Session:
        """The session ``call`` may see, from memory (or Redis), on a shard this worker owns."""
        self.owner_epoch(call.session_id)
        return call.visible(await self.current(call.session_id))

    async def _get(self, call: Call) -> Reply:
        session = await self.visible(call)
        return Reply(json_encoder.encode(view_of(session)), session.version)

    async def list_sessions(self, payload: bytes) -> bytes:
        query: ListSessionsQuery = _decode(_list_decoder, payload)
        if not 1 <= query.limit <= 200:
            raise ValidationFailedError("limit must be between 1 and 200")
        try:
            sessions, cursor = await self._store.list_user_sessions(query.user_id, query.limit, query.cursor)
        except (ValueError, UnicodeDecodeError):
            raise BadRequestError("invalid cursor") from None
        return json_encoder.encode(SessionPage(items=[view_of(s) for s in sessions], next_cursor=cursor))

    # ---- changes ------------------------------------------------------------------------

    def _compute_create(self, call: Call) -> Compute:
        command: CreateSessionCommand = _decode(_create_decoder, call.payload)
        user_id = call.user_id or command.user_id
        if not user_id or not is_valid_user_id(user_id):
            raise ValidationFailedError("user_id is required: 1-128 printable characters without whitespace")
        metadata = dict(command.metadata)
        if call.client_ip:
            metadata["ip_address"] = call.client_ip
        check_metadata(metadata, max_keys=self._settings.max_metadata_keys)
        config = command.config or SessionConfig()
        if self._config_check is not None:
            self._config_check(config)

        def compute(current: Session | None) -> Change:
            if current is not None:
                raise SessionExistsError(f"session {call.session_id!r} already exists")
            now = datetime.now(UTC)
            session = Session(
                session_id=call.session_id,
                user_id=user_id,
                state=INITIAL_STATE,
                version=1,
                created_at=now,
                last_updated=now,
                expires_at=now + self._ttl,
                metadata=metadata,
                context={},
                config=config,
            )
            return Change(session, json_encoder.encode(view_of(session)), 201)

        return compute

    def _compute_update(self, call: Call) -> Compute:
        command: UpdateSessionCommand = _decode(_update_decoder, call.payload)
        expected = call.if_match if call.if_match is not None else command.expected_version
        if command.config is not msgspec.UNSET and self._config_check is not None:
            self._config_check(command.config)

        def compute(current: Session | None) -> Change:
            current = call.visible(current)
            if expected is not None and expected != current.version:
                raise VersionMismatchError(f"session is at version {current.version}, If-Match asked for {expected}")
            state = current.state
            if command.state is not msgspec.UNSET:
                check_transition(current.state, command.state)
                state = command.state
            metadata = current.metadata
            if command.metadata is not msgspec.UNSET:
                metadata = {**current.metadata, **command.metadata}
                metadata = {k: v for k, v in metadata.items() if v is not None}
                check_metadata(metadata, max_keys=self._settings.max_metadata_keys)
            config = current.config if command.config is msgspec.UNSET else command.config
            session = self.next_version(current, state=state, metadata=metadata, config=config)
            return Change(session, json_encoder.encode(view_of(session)))

        return compute

    def _compute_delete(self, call: Call) -> Compute:
        def compute(current: Session | None) -> Change:
            current = call.visible(current)
            if call.if_match is not None and call.if_match != current.version:
                raise VersionMismatchError(f"session is at version {current.version}, If-Match asked for {call.if_match}")
            return Change(None, b"", 204)

        return compute

    async def _run_action(self, call: Call) -> Reply:
        action = self._actions.get(call.op)
        if action.mutates and call.read_only:
            raise ForbiddenError(f"action {action.name!r} changes the session; this token may only read")
        payload = _decode(_any_decoder, call.payload)
        if not action.mutates:
            session = await self.visible(call)
            result = action.handler(copy_json(session.context), payload)
            body = ActionResult(request_id=call.request_id, action=action.name, result=result, version=session.version)
            return Reply(json_encoder.encode(body), session.version)

        def compute(current: Session | None) -> Change:
            current = call.visible(current)
            context = copy_json(current.context)
            result = action.handler(context, payload)
            if len(json_encoder.encode(context)) > self._settings.max_context_bytes:
                raise LimitExceededError(f"session context would exceed {self._settings.max_context_bytes} bytes")
            session = self.next_version(current, context=context)
            body = ActionResult(request_id=call.request_id, action=action.name, result=result, version=session.version)
            return Change(session, json_encoder.encode(body))

        return await self.mutate(call, compute)

    def next_version(self, current: Session, **changes: Any) -> Session:
        now = datetime.now(UTC)
        return msgspec.structs.replace(current, version=current.version + 1, last_updated=now, expires_at=now + self._ttl, **changes)

    def owner_epoch(self, session_id: str) -> tuple[int, int]:
        """(shard, epoch) if this worker owns the session's shard, else NotOwnerError."""
        shard = self._store.shard_of(session_id)
        epoch = self._ownership.epoch_of(shard)
        if epoch is None:
            raise NotOwnerError(f"this worker does not own shard {shard}")
        return shard, epoch

    async def mutate(self, call: Call, compute: Compute) -> Reply:
        # Only an Idempotency-Key's record (and its replay) compares request bodies.
        body_hash = hashlib.blake2b(call.op.encode() + b"\x00" + call.payload, digest_size=16).hexdigest() if call.idem_key else ""
        for _ in range(_MAX_VERSION_RETRIES):
            shard, epoch = self.owner_epoch(call.session_id)
            current = await self.current(call.session_id)
            try:
                change = compute(current)
            except SessionManagerError:
                # A retry whose first attempt succeeded can now fail validation (the state moved on):
                # the stored result, not the error, is the answer.
                replay = await self._replay(call, body_hash)
                if replay is not None:
                    return replay
                raise
            new, body, status = change.session, change.body, change.status
            if new is not None and new is current:
                return Reply(body, new.version, status)  # nothing changed: nothing to write
            version = new.version if new is not None else (current.version + 1 if current else 0)
            record = IdempotencyRecord(body_hash, body, version) if call.idem_key else None
            if current is None and new is not None:
                await self._store.index_add(new)  # the user index is a superset; listings prune it
            with _redis_span("redis EVALSHA write_session"):
                outcome = await self._store.write(
                    shard=shard,
                    epoch=epoch,
                    session_id=call.session_id,
                    expected_version=current.version if current else ABSENT,
                    user_id=(new or current).user_id,  # type: ignore[union-attr]
                    session=new,
                    ttl_ms=self._settings.session_ttl * 1000,
                    idem_key=call.idem_key,
                    record=record,
                    idem_ttl_ms=GENERATED_KEY_TTL_MS if call.idem_key_generated else self._settings.idempotency_ttl * 1000,
                    live=change.live,
                    messages=change.messages,
                    history_limit=self._settings.message_history_limit,
                )
            if outcome.status == "OK":
                if new is None:
                    self._cache.evict(call.session_id)
                    if current is not None:
                        await self._store.index_remove(current)
                    if self.on_deleted is not None:
                        await self.on_deleted(call.session_id)
                else:
                    self._cache.put(new)
                await self._publish_events(call, current, new, version, change.events)
                return Reply(body, new.version if new else None, status)
            if outcome.status == "DUP":
                return self._replay_record(call, body_hash, decode_record(outcome.detail or b""))
            if outcome.status == "FENCED":
                self._cache.evict(call.session_id)
                self._ownership.fenced(shard, int(outcome.detail or 0))
                raise NotOwnerError(f"shard {shard} now belongs to a newer owner")
            # VERSION: our copy is older than Redis (a missed handoff or an expiry); reload and retry.
            self._cache.evict(call.session_id)
        raise NotOwnerError("session changed under this worker; retry")

    async def _publish_events(
        self, call: Call, current: Session | None, new: Session | None, version: int, events: Sequence[tuple[str, Any]] | None
    ) -> None:
        if self._events is None:
            return
        subject = new or current
        assert subject is not None
        if events is not None:
            for event_type, data in events:
                await self._events.publish(
                    event_type, session_id=subject.session_id, user_id=subject.user_id, version=version, data=data,
                    webhooks=subject.config.webhooks,
                )
            return
        if call.op == subjects.OP_CREATE:
            event_type, data = "created", None
        elif call.op == subjects.OP_UPDATE:
            event_type, data = "updated", {"state": subject.state}
        elif call.op == subjects.OP_DELETE:
            event_type, data = "terminated", None
        else:
            event_type, data = "request.applied", {"action": call.op, "request_id": call.request_id}
        await self._events.publish(
            event_type, session_id=subject.session_id, user_id=subject.user_id, version=version, data=data, webhooks=subject.config.webhooks
        )

    async def _replay(self, call: Call, body_hash: str) -> Reply | None:
        if not call.idem_key:
            return None
        record = await self._store.idempotency_record(call.session_id, call.idem_key)
        return None if record is None else self._replay_record(call, body_hash, record)

    def _replay_record(self, call: Call, body_hash: str, record: IdempotencyRecord) -> Reply:
        if record.body_hash != body_hash:
            raise IdempotencyConflictError(f"Idempotency-Key {call.idem_key!r} was first used with a different request")
        status = 204 if not record.reply else (201 if call.op == subjects.OP_CREATE else 200)
        return Reply(record.reply, record.version, status, replayed=True)
