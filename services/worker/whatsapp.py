"""The WhatsApp actions of ``POST /sessions/{id}/request`` (and ``sessions.<id>.<action>``).

    connection.start | stop | restart | logout    change the connection (persisted first)
    auth.qr | auth.pairing_code                   pair a new device
    message.send_text | message.list              talk
    simulate.scan | inbound | disconnect          drive the simulated engine (tests, demos)

Each action checks the connection's status and answers 409 naming it when the action does not
apply. Changes are written (fenced, versioned) before the engine is touched, so what a client
was told survives the worker: a new owner reconnects or resends from what is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from sessionmgr.common.errors import (
    ConnectionStatusError,
    ForbiddenError,
    UnknownActionError,
    ValidationFailedError,
)
from sessionmgr.common.models import (
    ActionResult,
    CONNECTION_STATUSES,
    ChatMessage,
    Session,
    SessionConfig,
    json_encoder,
)
from sessionmgr.common.settings import Settings
from sessionmgr.worker.bots import BotRegistry
from sessionmgr.worker.connections import ConnectionManager, status_change, status_data
from sessionmgr.worker.engine import EngineError, EngineRegistry
from sessionmgr.worker.sessions import Call, Change, Reply, SessionService
from sessionmgr.worker.sim_engine import phone_of
from sessionmgr.worker.store import SessionStore
from sessionmgr.worker.webhook_policy import validate_webhooks

_any_decoder = msgspec.json.Decoder()
_MAX_LIST = 200


class SendText(msgspec.Struct, forbid_unknown_fields=True):
    chat_id: str
    text: str


class ListMessages(msgspec.Struct, forbid_unknown_fields=True):
    chat_id: str | None = None
    limit: int = 50
    before: str | None = None  # a message id: only messages older than it (the next page)


class PairingCodeRequest(msgspec.Struct, forbid_unknown_fields=True):
    phone: str


class MessagePage(msgspec.Struct, kw_only=True):
    messages: list[ChatMessage]
    next_before: str | None


def _convert(payload: Any, kind: type[Any]) -> Any:
    try:
        return msgspec.convert(payload, kind)
    except msgspec.ValidationError as exc:
        raise ValidationFailedError(f"payload: {exc}") from None


def _require(session: Session, action: str, allowed: Sequence[str]) -> None:
    status = session.connection.status
    if status not in allowed:
        raise ConnectionStatusError(f"connection is {status}; {action} needs {' or '.join(allowed)}", status=status)


class WhatsAppActions:
    MUTATING = frozenset({"connection.start", "connection.stop", "connection.restart", "connection.logout", "message.send_text"})
    READS = frozenset({"auth.qr", "message.list"})
    ENGINE_COMMANDS = frozenset({"simulate.scan", "simulate.inbound", "simulate.disconnect", "auth.pairing_code"})
    ops = MUTATING | READS | ENGINE_COMMANDS

    def __init__(self, *, service: SessionService, connections: ConnectionManager, store: SessionStore, settings: Settings) -> None:
        self._service = service
        self._connections = connections
        self._store = store
        self._settings = settings

    def mutates(self, op: str) -> bool:
        return op in self.MUTATING

    async def handle(self, call: Call) -> Reply:
        if call.read_only and call.op not in self.READS:
            raise ForbiddenError(f"action {call.op!r} changes the session; this token may only read")
        try:
            payload = _any_decoder.decode(call.payload or b"{}")
        except msgspec.DecodeError as exc:
            raise ValidationFailedError(f"malformed JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ValidationFailedError("payload must be a JSON object")
        handler = getattr(self, "_" + call.op.replace(".", "_"), None)
        if handler is None:
            raise UnknownActionError(f"unknown action {call.op!r}")
        return await handler(call, payload)

    def _result(self, call: Call, result: Any, version: int) -> Reply:
        body = ActionResult(request_id=call.request_id, action=call.op, result=result, version=version)
        return Reply(json_encoder.encode(body), version)

    # ---- connection -----------------------------------------------------------------------

    async def _status_change(self, call: Call, status: str, allowed: Sequence[str], *, linked: bool = False, **changes: Any) -> Session:
        """Persist the new status (with the client's idempotency key) and return the new session.

        A check that fails inside the write (status, ``linked``) lets a retry of a request that
        already succeeded get its first answer back instead of the error.
        """
        written: list[Session] = []

        def compute(current: Session | None) -> Change:
            session = call.visible(current)
            _require(session, call.op, allowed)
            if linked and session.connection.me is None:
                status_now = session.connection.status
                raise ConnectionStatusError(f"connection is {status_now} and no device is linked; nothing to log out", status=status_now)
            change = status_change(self._service, session, status, **changes)
            new = change.session
            assert new is not None
            written.append(new)
            change.body = json_encoder.encode(
                ActionResult(request_id=call.request_id, action=call.op, result=status_data(new.connection), version=new.version)
            )
            return change

        reply = await self._service.mutate(call, compute)
        if reply.replayed:  # the first attempt did the rest
            raise _Replayed(reply)
        return written[-1]

    async def _connection_start(self, call: Call, payload: dict[str, Any]) -> Reply:
        return await self._start(call, ("STOPPED", "FAILED"))

    async def _connection_restart(self, call: Call, payload: dict[str, Any]) -> Reply:
        return await self._start(call, CONNECTION_STATUSES)

    async def _start(self, call: Call, allowed: Sequence[str]) -> Reply:
        """STARTING is persisted first; then a fresh engine (the old one, if any, is stopped)."""
        try:
            session = await self._status_change(call, "STARTING", allowed, failures=0, last_error=None)
        except _Replayed as replay:
            return replay.reply
        await self._connections.open(session)
        return self._result(call, status_data(session.connection), session.version)

    async def _connection_stop(self, call: Call, payload: dict[str, Any]) -> Reply:
        try:
            session = await self._status_change(call, "STOPPED", ("STARTING", "SCAN_QR_CODE", "WORKING", "FAILED"), failures=0)
        except _Replayed as replay:
            return replay.reply
        await self._connections.close(call.session_id)
        return self._result(call, status_data(session.connection), session.version)

    async def _connection_logout(self, call: Call, payload: dict[str, Any]) -> Reply:
        session = await self._service.visible(call)
        if session.connection.me is not None:
            # Unlink first: once the auth state is gone no owner can bring the device back.
            await self._connections.close(call.session_id, logout=True)
            await self._connections.delete_auth(call.session_id)
        try:
            session = await self._status_change(call, "STOPPED", CONNECTION_STATUSES, linked=True, me=None, failures=0, last_error=None)
        except _Replayed as replay:
            return replay.reply
        return self._result(call, status_data(session.connection), session.version)

    # ---- pairing --------------------------------------------------------------------------

    async def _auth_qr(self, call: Call, payload: dict[str, Any]) -> Reply:
        session = await self._service.visible(call)
        _require(session, call.op, ("SCAN_QR_CODE",))
        live = self._connections.get(call.session_id)
        if live is None or live.qr is None:
            raise ConnectionStatusError("connection is SCAN_QR_CODE but no QR code is ready yet; retry", status="SCAN_QR_CODE")
        return self._result(call, {"qr": live.qr}, session.version)

    async def _auth_pairing_code(self, call: Call, payload: dict[str, Any]) -> Reply:
        request: PairingCodeRequest = _convert(payload, PairingCodeRequest)
        session = await self._service.visible(call)
        _require(session, call.op, ("SCAN_QR_CODE",))
        live = self._connections.get(call.session_id)
        if live is None:
            raise ConnectionStatusError("connection is SCAN_QR_CODE but not live on this worker yet; retry", status="SCAN_QR_CODE")
        code = await live.engine.request_pairing_code(request.phone)
        return self._result(call, {"code": code, "phone": request.phone}, session.version)

    # ---- messages -------------------------------------------------------------------------

    async def _message_send_text(self, call: Call, payload: dict[str, Any]) -> Reply:
        request: SendText = _convert(payload, SendText)
        phone_of(request.chat_id)
        if not 1 <= len(request.text) <= self._settings.max_message_text:
            raise ValidationFailedError(f"text must be 1-{self._settings.max_message_text} characters")
        sent: list[ChatMessage] = []

        def compute(current: Session | None) -> Change:
            session = call.visible(current)
            _require(session, call.op, ("WORKING",))
            seq = session.message_seq + 1
            message = self._connections.new_outbound(request.chat_id, request.text, seq)
            new = self._service.next_version(session, message_seq=seq)
            sent.append(message)
            result = {"message_id": message.id, "chat_id": message.chat_id, "status": message.status}
            body = ActionResult(request_id=call.request_id, action=call.op, result=result, version=new.version)
            return Change(new, json_encoder.encode(body), messages=[message])

        reply = await self._service.mutate(call, compute)
        if reply.replayed:
            return reply  # a retry with the same idempotency key: sent once, answered again
        message = sent[-1]
        status = await self._connections.send(call.session_id, message)
        return self._result(call, {"message_id": message.id, "chat_id": message.chat_id, "status": status}, reply.version or 0)

    async def _message_list(self, call: Call, payload: dict[str, Any]) -> Reply:
        query: ListMessages = _convert(payload, ListMessages)
        if not 1 <= query.limit <= _MAX_LIST:
            raise ValidationFailedError(f"limit must be between 1 and {_MAX_LIST}")
        if query.chat_id is not None:
            phone_of(query.chat_id)
        session = await self._service.visible(call)
        history = await self._store.messages(call.session_id)
        if query.chat_id is not None:
            history = [m for m in history if m.chat_id == query.chat_id]
        if query.before is not None:
            cut = next((m.seq for m in history if m.id == query.before), None)
            if cut is None:
                raise ValidationFailedError("before names no message in this session's history")
            history = [m for m in history if m.seq < cut]
        newest_first = sorted(history, key=lambda m: m.seq, reverse=True)
        page = newest_first[: query.limit]
        next_before = page[-1].id if len(newest_first) > query.limit else None
        return self._result(call, MessagePage(messages=page, next_before=next_before), session.version)

    # ---- the simulated engine's commands --------------------------------------------------

    async def _engine_command(self, call: Call, payload: dict[str, Any], allowed: Sequence[str]) -> Reply:
        session = await self._service.visible(call)
        _require(session, call.op, allowed)
        live = self._connections.get(call.session_id)
        if live is None:
            raise ConnectionStatusError(f"connection is {session.connection.status} but not live on this worker yet; retry", status=session.connection.status)
        try:
            live.engine.command(call.op, payload)
        except EngineError as exc:
            raise ConnectionStatusError(f"connection is {session.connection.status}: {exc}", status=session.connection.status) from None
        return self._result(call, {"accepted": True}, session.version)

    async def _simulate_scan(self, call: Call, payload: dict[str, Any]) -> Reply:
        return await self._engine_command(call, payload, ("SCAN_QR_CODE",))

    async def _simulate_inbound(self, call: Call, payload: dict[str, Any]) -> Reply:
        return await self._engine_command(call, payload, ("WORKING",))

    async def _simulate_disconnect(self, call: Call, payload: dict[str, Any]) -> Reply:
        return await self._engine_command(call, payload, ("WORKING",))


class _Replayed(Exception):
    """The change was an idempotent replay: answer with the stored reply, do nothing else."""

    def __init__(self, reply: Reply) -> None:
        super().__init__("replayed")
        self.reply = reply


def make_config_check(engines: EngineRegistry, bots: BotRegistry, settings: Settings) -> Any:
    def check(config: SessionConfig) -> None:
        engines.check(config.engine or settings.whatsapp_default_engine)
        bots.check(config.bot)
        validate_webhooks(list(config.webhooks))

    return check
