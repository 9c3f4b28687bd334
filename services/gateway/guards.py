"""Runs before every session route: authenticate (loading JWKS keys off the loop), then rate limit.

The handlers authenticate again through the verifier's token cache, so this costs one dict lookup
there; it runs first so that 401 and 429 come before any body is parsed or any message is sent.
"""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from sessionmgr.gateway.state import GatewayState


async def authenticate_and_limit(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    state: GatewayState = connection.app.state.gateway
    authorization = connection.headers.get("authorization")
    await state.verifier.prepare(authorization)
    principal = state.verifier.authenticate(authorization)
    if state.limiter is not None:
        create = connection.scope["method"] == "POST" and connection.scope["path"].rstrip("/") == "/sessions"
        await state.limiter.check(principal.user_id, create=create)
