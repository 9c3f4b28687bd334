"""Document the problem+json error responses in the OpenAPI schema, so clients (and schema-driven
tests such as schemathesis) know every status a route can answer with.

Litestar documents only what a handler declares; errors are raised from one exception hierarchy
and mapped in problems.py, so the handlers never mention them. This adds them in one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec

from sessionmgr.common.models import Problem

PROBLEM_MEDIA_TYPE = "application/problem+json"

SESSION_ERRORS = {
    400: "Malformed request or invalid field, session ID, action or header",
    401: "Missing, malformed, expired or wrongly signed token (WWW-Authenticate: Bearer)",
    403: "The token's scopes do not allow this",
    404: "Unknown, expired or someone else's session",
    409: "State transition not allowed, or MAX_SESSIONS_PER_USER reached",
    412: "If-Match does not match the session's version",
    413: "Body over MAX_BODY_BYTES",
    422: "Unknown action, Idempotency-Key reused with another body, or a size limit exceeded",
    429: "Rate limit exceeded (Retry-After)",
    503: "No worker answered in time, or storage unavailable (Retry-After)",
}
READY_ERRORS = {503: "NATS not connected or no worker heartbeat within the failure window"}


class Readiness(msgspec.Struct):
    status: str


# /readyz answers with raw bytes; say what they are.
READY_RESPONSES = {200: ResponseSpec(data_container=Readiness, description="Ready")}


def _specs(errors: dict[int, str]) -> dict[int, ResponseSpec]:
    return {status: ResponseSpec(data_container=Problem, media_type=PROBLEM_MEDIA_TYPE, description=text) for status, text in errors.items()}


def document_errors(handlers: Iterable[Any], errors: dict[int, str] = SESSION_ERRORS, extra: dict[int, ResponseSpec] | None = None) -> None:
    """Add problem+json responses (and ``extra`` ones) to every route handler in ``handlers``.

    Idempotent; a status a handler documents itself is kept as it is.
    """
    specs = {**_specs(errors), **(extra or {})}
    for item in handlers:
        candidates = [item] if isinstance(item, HTTPRouteHandler) else [v for v in vars(item).values() if isinstance(v, HTTPRouteHandler)]
        for handler in candidates:
            handler.responses = {**specs, **(handler.responses or {})}
