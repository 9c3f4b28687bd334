"""The gateway's Litestar app, built by a factory so tests pass their own settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from sessionmgr.common.redis_client import create_redis
from sessionmgr.common.settings import Settings
from sessionmgr.gateway.auth import TokenVerifier
from sessionmgr.gateway.cors import cors_config
from sessionmgr.gateway.fastpath import serve_hot_routes
from sessionmgr.gateway.openapi_errors import READY_ERRORS, READY_RESPONSES, document_errors
from sessionmgr.gateway.problems import EXCEPTION_HANDLERS
from sessionmgr.gateway.ratelimit import RateLimiter
from sessionmgr.gateway.routes import SessionController, healthz, readyz
from sessionmgr.gateway.state import GatewayState
from sessionmgr.gateway.metrics import GatewayMetrics, metrics_route
from sessionmgr.gateway.telemetry import instrument_http
from sessionmgr.gateway.webhook_routes import webhook_route_handlers
from sessionmgr.gateway.workers import WorkerClient

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def create_app(settings: Settings, *, tracer_provider: TracerProvider | None = None, fast_path: bool = True) -> Litestar:
    """``tracer_provider``: the global one unless given (tests pass their own exporting provider).

    ``fast_path``: serve the two hot routes in front of Litestar's router (:mod:`.fastpath`);
    off, Litestar serves every route (tests compare the two).
    """
    metrics = GatewayMetrics()
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("sessionmgr.gateway")
    workers = WorkerClient(settings, metrics=metrics, tracer=tracer)
    document_errors([SessionController])
    document_errors([readyz], READY_ERRORS, READY_RESPONSES)
    redis = create_redis(settings) if RateLimiter.enabled(settings) else None
    limiter = RateLimiter(redis, settings) if redis is not None else None
    state = GatewayState(settings=settings, verifier=TokenVerifier(settings), workers=workers, limiter=limiter)

    @asynccontextmanager
    async def connect_bus(app: Litestar) -> AsyncIterator[None]:
        await workers.connect()
        try:
            yield
        finally:
            await workers.close()
            if redis is not None:
                await redis.aclose()

    app = Litestar(
        route_handlers=[SessionController, *webhook_route_handlers(), healthz, readyz, metrics_route(metrics)],
        lifespan=[connect_bus],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        cors_config=cors_config(settings),  # None (off) unless CORS_ALLOW_ORIGINS is set
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Session Manager",
            version="0.1.0",
            components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")}),
            security=[{"bearer": []}],
        ),
        state=State({"gateway": state}),
        debug=False,
    )
    # Around the whole handler, router included, so unmatched routes (404/405) are measured too
    # and every response, errors included, gets the security headers.
    handler = app.asgi_handler
    if fast_path:
        handler = serve_hot_routes(handler, state, cors=app.cors_config is not None)
    app.asgi_handler = instrument_http(handler, metrics=metrics, tracer=tracer, response_headers=SECURITY_HEADERS)
    return app
