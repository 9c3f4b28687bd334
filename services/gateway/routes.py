"""REST routes: authenticate, validate, forward to the session's shard, map the reply to HTTP."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Annotated

import msgspec
import segno
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, Parameter

from sessionmgr.common import bus, subjects
from sessionmgr.common.errors import BadRequestError, ForbiddenError, NotFoundError, ServiceUnavailableError
from sessionmgr.common.ids import (
    is_valid_action,
    is_valid_idempotency_key,
    is_valid_session_id,
    new_request_id,
    new_session_id,
    session_id_for_key,
)
from sessionmgr.common.models import (
    ActionBody,
    ActionResult,
    CreateSessionBody,
    CreateSessionCommand,
    ListSessionsQuery,
    QueuedReply,
    RequestStatus,
    SessionPage,
    SessionView,
    UpdateSessionBody,
    UpdateSessionCommand,
    json_encoder,
)
from sessionmgr.gateway.auth import Principal
from sessionmgr.gateway.guards import authenticate_before_request
from sessionmgr.gateway.replies import HttpReply, to_response
from sessionmgr.gateway.state import GatewayState

JSON = "application/json"


class QrView(msgspec.Struct):
    qr: str


class _QrResult(msgspec.Struct):
    result: QrView


_qr_decoder = msgspec.json.Decoder(_QrResult)


def render_qr_png(payload: str) -> bytes:
    buffer = io.BytesIO()
    segno.make(payload, error="l", micro=False).save(buffer, kind="png", scale=6, border=4)
    return buffer.getvalue()


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway  # type: ignore[no-any-return]


def _principal(request: Request) -> Principal:
    return require_reader(_state(request).verifier.authenticate(request.headers.get("authorization")))


def require_reader(principal: Principal) -> Principal:
    """``principal``, if it holds a sessions scope."""
    if not principal.can_read:
        raise ForbiddenError("this token has no sessions scope (sessions:read, sessions:write or sessions:admin)")
    return principal


def _writer(request: Request) -> Principal:
    principal = _principal(request)
    if not principal.can_write:
        raise ForbiddenError("this token may only read sessions (scope sessions:read)")
    return principal


def _checked_session_id(session_id: str) -> str:
    if not is_valid_session_id(session_id):
        raise BadRequestError("session IDs are 1-64 characters of A-Z a-z 0-9 _ -")
    return session_id


def _base_headers(request_headers: Mapping[str, str], principal: Principal, *, mutating: bool) -> dict[str, str]:
    headers = {bus.HEADER_USER: principal.user_id, bus.HEADER_REQUEST_ID: new_request_id()}
    if principal.is_admin:
        headers[bus.HEADER_ADMIN] = "1"
    if mutating:
        key = request_headers.get("idempotency-key")
        if key is not None and not is_valid_idempotency_key(key):
            raise BadRequestError("Idempotency-Key must be 1-128 printable ASCII characters")
        # Without a client key the gateway still makes one, so its own retries never apply twice.
        headers[bus.HEADER_IDEMPOTENCY_KEY] = key or headers[bus.HEADER_REQUEST_ID]
        if key is None:
            headers[bus.HEADER_KEY_GENERATED] = "1"
    return headers


def _if_match(request: Request) -> str | None:
    raw = request.headers.get("if-match")
    if raw is None or raw.strip() == "*":
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    if not value.isdigit() or len(value) > 18:
        raise BadRequestError("If-Match must be a session version, as given in ETag")
    return value


def _reply(msg_data: bytes, headers: dict[str, str] | None, *, session_id: str | None = None, extra: dict[str, str] | None = None) -> Response[bytes]:
    return to_response(reply_from_worker(msg_data, headers, session_id=session_id, extra=extra))


def reply_from_worker(msg_data: bytes, headers: dict[str, str] | None, *, session_id: str | None = None, extra: dict[str, str] | None = None) -> HttpReply:
    """The HTTP answer to a worker's reply: status from ``Sm-Status``, ETag, Location, stale warning."""
    headers = headers or {}
    status = int(headers.get(bus.HEADER_STATUS, "200"))
    out = dict(extra or {})
    if bus.HEADER_VERSION in headers:
        out["ETag"] = f'"{headers[bus.HEADER_VERSION]}"'
    if status == 202 and session_id and bus.HEADER_QUEUED in headers:
        # Accepted while storage is away: the change is queued durably; poll its status here.
        out["Location"] = f"/sessions/{session_id}/requests/{headers[bus.HEADER_QUEUED]}"
    if headers.get(bus.HEADER_STALE) == "1":
        out["Warning"] = '110 - "Response is Stale"'
        out["X-Session-Stale"] = "true"
    if status == 204:
        return HttpReply(204, b"", out, None)
    return HttpReply(status, msg_data, out, JSON)


async def _forward(request: Request, session_id: str, op: str, payload: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str] | None]:
    return await _forward_to(_state(request), session_id, op, payload, headers)


async def _forward_to(state: GatewayState, session_id: str, op: str, payload: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str] | None]:
    subject = subjects.session_subject(session_id, op, state.settings.shard_count)
    msg = await state.workers.call(subject, payload, headers, op=op)
    return msg.data, msg.headers


# The two hot routes, shared by their Litestar handlers and the fast path (sessionmgr.gateway.fastpath).
# ``principal`` has passed require_reader; ``request_headers`` have lower-case names.


async def fetch_session(state: GatewayState, principal: Principal, request_headers: Mapping[str, str], session_id: str) -> HttpReply:
    _checked_session_id(session_id)
    headers = _base_headers(request_headers, principal, mutating=False)
    body, reply_headers = await _forward_to(state, session_id, subjects.OP_GET, b"", headers)
    return reply_from_worker(body, reply_headers, session_id=session_id)


async def run_session_action(state: GatewayState, principal: Principal, request_headers: Mapping[str, str], session_id: str, data: ActionBody) -> HttpReply:
    _checked_session_id(session_id)
    if not is_valid_action(data.action) or data.action in subjects.SESSION_OPS:
        raise BadRequestError("action names are dotted lower-case words, for example context.incr")
    headers = _base_headers(request_headers, principal, mutating=True)
    if not principal.can_write:
        headers[bus.HEADER_READ_ONLY] = "1"  # the worker knows which actions change the session
    body, reply_headers = await _forward_to(state, session_id, data.action, msgspec.json.encode(data.payload), headers)
    return reply_from_worker(body, reply_headers, session_id=session_id)


class SessionController(Controller):
    path = "/sessions"
    tags = ["sessions"]
    before_request = authenticate_before_request  # 401 and 429 before any body is read (cheaper than a guard)

    @post(
        "/",
        summary="Create a session",
        responses={201: ResponseSpec(data_container=SessionView, description="The new session")},
    )
    async def create_session(self, request: Request, data: JSONBody[CreateSessionBody | None] = None) -> Response[bytes]:
        principal = _writer(request)
        state = _state(request)
        headers = _base_headers(request.headers, principal, mutating=True)
        client_key = request.headers.get("idempotency-key")
        # A retried create must land on the same session: derive its ID from the client's key.
        session_id = session_id_for_key(state.settings.jwt_secret, principal.user_id, client_key) if client_key else new_session_id()
        metadata = dict(data.metadata) if data else {}
        client_version = request.headers.get("x-client-version")
        if client_version and "client_version" not in metadata:
            metadata["client_version"] = client_version[:128]
        if request.client is not None:
            headers[bus.HEADER_CLIENT_IP] = request.client.host
        payload = json_encoder.encode(CreateSessionCommand(metadata=metadata, config=data.config if data else None))
        body, reply_headers = await _forward(request, session_id, subjects.OP_CREATE, payload, headers)
        return _reply(body, reply_headers, session_id=session_id, extra={"Location": f"/sessions/{session_id}"})

    @get("/", summary="List the caller's sessions", responses={200: ResponseSpec(data_container=SessionPage)})
    async def list_sessions(
        self,
        request: Request,
        limit: Annotated[int, Parameter(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Parameter(max_length=256)] = None,
        user_id: Annotated[str | None, Parameter(max_length=128, description="admins only")] = None,
    ) -> Response[bytes]:
        principal = _principal(request)
        owner = principal.user_id
        if user_id is not None and user_id != principal.user_id:
            if not principal.is_admin:
                raise ForbiddenError("listing another user's sessions needs scope sessions:admin")
            owner = user_id
        state = _state(request)
        payload = json_encoder.encode(ListSessionsQuery(user_id=owner, limit=limit, cursor=cursor))
        msg = await state.workers.call(subjects.QUERY_LIST, payload, {bus.HEADER_USER: principal.user_id}, op="session.list")
        return _reply(msg.data, msg.headers)

    @get("/{session_id:str}", summary="Get a session", responses={200: ResponseSpec(data_container=SessionView)})
    async def get_session(self, request: Request, session_id: FromPath[str]) -> Response[bytes]:
        return to_response(await fetch_session(_state(request), _principal(request), request.headers, session_id))

    @put("/{session_id:str}", summary="Change state or metadata", responses={200: ResponseSpec(data_container=SessionView)})
    async def update_session(self, request: Request, session_id: FromPath[str], data: JSONBody[UpdateSessionBody]) -> Response[bytes]:
        principal = _writer(request)
        _checked_session_id(session_id)
        headers = _base_headers(request.headers, principal, mutating=True)
        if_match = _if_match(request)
        if if_match is not None:
            headers[bus.HEADER_IF_MATCH] = if_match
        payload = json_encoder.encode(UpdateSessionCommand(state=data.state, metadata=data.metadata, config=data.config))
        body, reply_headers = await _forward(request, session_id, subjects.OP_UPDATE, payload, headers)
        return _reply(body, reply_headers, session_id=session_id)

    @delete(
        "/{session_id:str}",
        summary="Terminate a session",
        status_code=200,  # the real answer is 204, or 202 while storage is away (set per response)
        responses={204: ResponseSpec(data_container=None, description="Deleted"), 202: ResponseSpec(data_container=QueuedReply, description="Queued")},
    )
    async def delete_session(self, request: Request, session_id: FromPath[str]) -> Response[bytes]:
        principal = _writer(request)
        _checked_session_id(session_id)
        headers = _base_headers(request.headers, principal, mutating=True)
        if_match = _if_match(request)
        if if_match is not None:
            headers[bus.HEADER_IF_MATCH] = if_match
        body, reply_headers = await _forward(request, session_id, subjects.OP_DELETE, b"", headers)
        return _reply(body, reply_headers, session_id=session_id)

    @get(
        "/{session_id:str}/requests/{request_id:str}",
        summary="Status of a change queued while storage was away",
        responses={200: ResponseSpec(data_container=RequestStatus)},
    )
    async def get_request_status(self, request: Request, session_id: FromPath[str], request_id: FromPath[str]) -> Response[bytes]:
        principal = _principal(request)
        _checked_session_id(session_id)
        if not is_valid_session_id(request_id):
            raise BadRequestError("request IDs are 1-64 characters of A-Z a-z 0-9 _ -")
        status = await _state(request).workers.request_status(request_id)
        visible = status is not None and status.session_id == session_id and (principal.is_admin or status.user_id == principal.user_id)
        if not visible:
            raise NotFoundError(f"no queued request {request_id!r} for this session")
        return Response(json_encoder.encode(status), media_type=JSON)

    @post("/{session_id:str}/request", summary="Run an action in the session", responses={200: ResponseSpec(data_container=ActionResult)})
    async def run_action(self, request: Request, session_id: FromPath[str], data: JSONBody[ActionBody]) -> Response[bytes]:
        return to_response(await run_session_action(_state(request), _principal(request), request.headers, session_id, data))

    @get(
        "/{session_id:str}/qr",
        summary="The QR code to link WhatsApp (PNG, or JSON with Accept: application/json)",
        responses={200: ResponseSpec(data_container=QrView, description="image/png by default")},
    )
    async def get_qr(self, request: Request, session_id: FromPath[str]) -> Response[bytes]:
        principal = _principal(request)
        _checked_session_id(session_id)
        headers = _base_headers(request.headers, principal, mutating=False)
        body, _ = await _forward(request, session_id, "auth.qr", b"{}", headers)
        qr = _qr_decoder.decode(body).result
        if "application/json" in request.headers.get("accept", ""):
            return Response(json_encoder.encode(qr), media_type=JSON, headers={"Cache-Control": "no-store"})
        return Response(render_qr_png(qr.qr), media_type="image/png", headers={"Cache-Control": "no-store"})


@get("/healthz", summary="Process is alive", tags=["health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="NATS and at least one worker reachable", tags=["health"])
async def readyz(request: Request) -> Response[bytes]:
    workers = _state(request).workers
    if not workers.connected:
        raise ServiceUnavailableError("not connected to NATS")
    if not workers.workers_alive:
        raise ServiceUnavailableError("no worker heartbeat within the failure window")
    if workers.degraded:
        # Still serving (changes are queued durably), so still ready; but say so.
        return Response(b'{"status":"degraded","detail":"session storage unreachable; changes are queued"}', media_type=JSON)
    return Response(b'{"status":"ready"}', media_type=JSON)
