"""A fast path for the two hot routes, in front of Litestar's router.

``POST /sessions/{id}/request`` and ``GET /sessions/{id}`` are most of the gateway's traffic, and
Litestar's per-request machinery (routing, the ``Request`` object, the hook, signature parsing,
the ``Response`` object) cost about a third of its CPU. :func:`serve_hot_routes` answers them in
plain ASGI with the same code the Litestar handlers run: authentication and rate limiting
(:func:`~sessionmgr.gateway.guards.authenticate_and_limit_request`), the route bodies
(:func:`~sessionmgr.gateway.routes.fetch_session`, :func:`~sessionmgr.gateway.routes.run_session_action`)
and the error mapping (:func:`~sessionmgr.gateway.problems.problem_for`). It sits inside
:func:`~sessionmgr.gateway.telemetry.instrument_http`, so the span, metrics, canonical log line
and security headers are the same too.

Anything it is not sure about goes to Litestar unchanged, and the handlers stay registered there
(they are what the OpenAPI schema documents): other paths and methods, a ``root_path``, a chunked
or oversized body, a body that is not a valid ``ActionBody`` (Litestar then gives its own 413 or
validation problem, after authenticating as it always does), and, with CORS on, any request with
an ``Origin`` header. A body read here is handed on to Litestar as it was received.
"""

from __future__ import annotations

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from sessionmgr.common.models import ActionBody
from sessionmgr.gateway.guards import authenticate_and_limit_request
from sessionmgr.gateway.problems import problem_for
from sessionmgr.gateway.replies import HttpReply
from sessionmgr.gateway.routes import fetch_session, require_reader, run_session_action
from sessionmgr.gateway.state import GatewayState

# The route templates Litestar puts in scope["path_template"] for these handlers (metrics, spans, logs).
GET_SESSION_ROUTE = "/sessions/{session_id}"
RUN_ACTION_ROUTE = "/sessions/{session_id}/request"
_PREFIX = "/sessions/"
_ACTION_SUFFIX = "/request"

_action_decoder = msgspec.json.Decoder(ActionBody)


def serve_hot_routes(app: ASGIApp, state: GatewayState, *, cors: bool = False) -> ASGIApp:
    """``app``: Litestar's ASGI handler, which serves everything the fast path passes on."""
    max_body = state.settings.max_body_bytes

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("root_path"):
            await app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if not path.startswith(_PREFIX):
            await app(scope, receive, send)
            return
        rest = path[len(_PREFIX) :]
        if method == "GET":
            session_id, route = rest, GET_SESSION_ROUTE
        elif method == "POST" and rest.endswith(_ACTION_SUFFIX):
            session_id, route = rest[: -len(_ACTION_SUFFIX)], RUN_ACTION_ROUTE
        else:
            await app(scope, receive, send)
            return
        if not session_id or "/" in session_id:
            await app(scope, receive, send)
            return
        headers = _request_headers(scope)
        if cors and "origin" in headers:
            await app(scope, receive, send)
            return
        data: ActionBody | None = None
        if route is RUN_ACTION_ROUTE:
            declared = headers.get("content-length")
            if declared is None or not declared.isdigit() or int(declared) > max_body:
                await app(scope, receive, send)  # chunked, or too large: Litestar reads (and refuses) it
                return
            body, complete = await _read_body(receive, max_body)
            if complete:
                try:
                    data = _action_decoder.decode(body)
                except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                    data = None
            if data is None:
                await app(scope, _replay(body, complete, receive), send)
                return
        scope["path_template"] = route
        scope["path_params"] = {"session_id": session_id}
        try:
            # Authenticated once: the Litestar handlers look the token up again in the cache.
            principal = require_reader(await authenticate_and_limit_request(state, headers.get("authorization"), method=method, path=path))
            if data is None:
                reply = await fetch_session(state, principal, headers, session_id)
            else:
                reply = await run_session_action(state, principal, headers, session_id, data)
        except Exception as exc:  # noqa: BLE001 - every error becomes a problem, as Litestar's handlers do
            reply = problem_for(exc, path)
        await _send_reply(send, reply)

    return handle


def _request_headers(scope: Scope) -> dict[str, str]:
    """Lower-case names; the first of repeated headers wins, as with Litestar's ``headers.get``."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(scope["headers"])}


async def _read_body(receive: Receive, max_body: int) -> tuple[bytes, bool]:
    """The body, and whether it is all there and within ``max_body`` (else what was read so far)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False  # disconnected: Litestar sees the same
        chunk = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
            if size > max_body:
                return b"".join(chunks), False
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """``receive`` as if nothing had been read from it yet."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": not complete}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay  # type: ignore[return-value]


async def _send_reply(send: Send, reply: HttpReply) -> None:
    # As Litestar's Response encodes it: the route's headers, then content-type and content-length.
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in reply.headers.items()]
    if reply.media_type is not None:
        raw.append((b"content-type", reply.media_type.encode("latin-1")))
        raw.append((b"content-length", str(len(reply.body)).encode("latin-1")))
    await send({"type": "http.response.start", "status": reply.status, "headers": raw})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})
