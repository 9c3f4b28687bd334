"""Every error leaves the gateway as ``application/problem+json`` (RFC 9457), mapped here only."""

from __future__ import annotations

import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException

from sessionmgr.common.errors import SessionManagerError
from sessionmgr.common.models import Problem, json_encoder

log = structlog.get_logger(__name__)
PROBLEM_MEDIA_TYPE = "application/problem+json"

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def problem_response(status: int, code: str, title: str, detail: str, instance: str | None = None, headers: dict[str, str] | None = None) -> Response[bytes]:
    body = Problem(type=f"https://session-manager.dev/problems/{code}", title=title, status=status, detail=detail, code=code, instance=instance)
    return Response(json_encoder.encode(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def handle_domain_error(request: Request, exc: SessionManagerError) -> Response[bytes]:
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="session-manager", error="invalid_token"'
    if "retry_after" in exc.extra:
        headers["Retry-After"] = str(exc.extra["retry_after"])
    elif exc.status == 503:
        headers["Retry-After"] = "1"
    return problem_response(exc.status, exc.code, exc.title, exc.detail, request.url.path, headers)


def handle_validation_error(request: Request, exc: ValidationException) -> Response[bytes]:
    detail = exc.detail
    if isinstance(exc.extra, list) and exc.extra:
        parts = [f"{e.get('key') or 'body'}: {e.get('message')}" if isinstance(e, dict) else str(e) for e in exc.extra]
        detail = "; ".join(parts)
    return problem_response(400, "validation_error", "Request failed validation", detail, request.url.path)


def handle_http_exception(request: Request, exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    if isinstance(exc, NotAuthorizedException):
        status = 401
    if status >= 500:
        log.error("http_error", status=status, detail=exc.detail)
        return problem_response(status, "internal_error", "Internal error", "the server could not complete the request", request.url.path)
    code = _HTTP_CODES.get(status, "http_error")
    return problem_response(status, code, code.replace("_", " ").capitalize(), exc.detail or code, request.url.path, exc.headers)


def handle_unexpected(request: Request, exc: Exception) -> Response[bytes]:
    if isinstance(exc, RecursionError):
        # A body nested thousands of levels deep exhausts the decoder's stack: the client's fault.
        return problem_response(400, "validation_error", "Request failed validation", "JSON nested too deeply", request.url.path)
    log.exception("unhandled_error")
    return problem_response(500, "internal_error", "Internal error", "the server could not complete the request", request.url.path)


EXCEPTION_HANDLERS = {
    SessionManagerError: handle_domain_error,
    ValidationException: handle_validation_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
