"""Operator routes for webhook dead letters: list and redrive, scope ``sessions:admin`` only.

The gateway forwards to ``sm.webhooks.admin.*``, which any worker answers; worker errors come back
as the same exception classes and become problem+json like every other route's.
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody, Parameter

from sessionmgr.common import bus
from sessionmgr.common.errors import ForbiddenError
from sessionmgr.common.webhook_models import (
    ADMIN_DEAD_LETTERS,
    ADMIN_REDRIVE,
    MAX_PAGE,
    DeadLetterPage,
    DeadLetterQuery,
    RedriveReply,
    RedriveRequest,
    webhook_json,
)
from sessionmgr.gateway.guards import authenticate_before_request
from sessionmgr.gateway.openapi_errors import document_errors
from sessionmgr.gateway.state import GatewayState

WEBHOOK_ERRORS = {
    400: "Invalid query or body (limit 1-100, ids of dead letters, either ids or all)",
    401: "Missing, malformed, expired or wrongly signed token (WWW-Authenticate: Bearer)",
    403: "The token lacks scope sessions:admin",
    429: "Rate limit exceeded (Retry-After)",
    500: "The dead-letter store could not be read or changed; try again",
    503: "No worker answered in time (Retry-After)",
}
_SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def webhook_route_handlers() -> list[type[Controller]]:
    """The controllers to mount, their error responses documented."""
    document_errors([WebhookController], WEBHOOK_ERRORS)
    return [WebhookController]


def _admin(request: Request) -> tuple[GatewayState, dict[str, str]]:
    """The gateway's state and the headers to forward, for a caller with scope sessions:admin."""
    state: GatewayState = request.app.state.gateway
    principal = state.verifier.authenticate(request.headers.get("authorization"))
    if not principal.is_admin:
        raise ForbiddenError("webhook dead letters need scope sessions:admin")
    return state, {bus.HEADER_USER: principal.user_id, bus.HEADER_ADMIN: "1"}


def _json(msg_data: bytes) -> Response[bytes]:
    return Response(msg_data, media_type="application/json")


class WebhookController(Controller):
    path = "/webhooks"
    tags = ["webhooks"]
    before_request = authenticate_before_request  # 401 and 429 before any body is read

    @get(
        "/dead-letters",
        summary="List webhook deliveries given up on, oldest first",
        description="Each item's `id` is what a redrive names. Page on with `after=<next_after>`.",
        responses={200: ResponseSpec(data_container=DeadLetterPage, description="A page of dead letters")},
    )
    async def list_dead_letters(
        self,
        request: Request,
        limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 50,
        after: Annotated[int, Parameter(ge=0, le=2**62)] = 0,
        session_id: Annotated[str | None, Parameter(pattern=_SESSION_ID_PATTERN, max_length=64)] = None,
    ) -> Response[bytes]:
        state, headers = _admin(request)
        payload = webhook_json.encode(DeadLetterQuery(limit=limit, after=after, session_id=session_id))
        msg = await state.workers.call(ADMIN_DEAD_LETTERS, payload, headers, op="webhooks.dead_letters")
        return _json(msg.data)

    @post(
        "/dead-letters/redrive",
        summary="Deliver dead letters again: the given ids, or all (of one session)",
        status_code=200,
        responses={200: ResponseSpec(data_container=RedriveReply, description="What was moved back to delivery")},
    )
    async def redrive_dead_letters(self, request: Request, data: JSONBody[RedriveRequest]) -> Response[bytes]:
        state, headers = _admin(request)
        msg = await state.workers.call(ADMIN_REDRIVE, webhook_json.encode(data), headers, op="webhooks.redrive")
        return _json(msg.data)

