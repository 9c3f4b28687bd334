"""Every error leaves the gateway as ``application/problem+json`` (RFC 9457), mapped here only.

:func:`problem_for` is the one mapping from an exception to a problem; the Litestar exception
handlers and the fast path (:mod:`sessionmgr.gateway.fastpath`) both answer with what it returns.
"""

from __future__ import annotations

import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException

from sessionmgr.common.errors import SessionManagerError
from sessionmgr.common.models import Problem, json_encoder
from sessionmgr.gateway.openapi_errors import PROBLEM_MEDIA_TYPE
from sessionmgr.gateway.replies import HttpReply, to_response

log = structlog.get_logger(__name__)

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


def problem_reply(status: int, code: str, title: str, detail: str, instance: str | None = None, headers: dict[str, str] | None = None) -> HttpReply:
    body = Problem(type=f"https://session-manager.dev/problems/{code}", title=title, status=status, detail=detail, code=code, instance=instance)
    return HttpReply(status, json_encoder.encode(body), dict(headers or {}), PROBLEM_MEDIA_TYPE)


def _domain_problem(exc: SessionManagerError, instance: str) -> HttpReply:
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="session-manager", error="invalid_token"'
    if "retry_after" in exc.extra:
        headers["Retry-After"] = str(exc.extra["retry_after"])
    elif exc.status == 503:
        headers["Retry-After"] = "1"
    return problem_reply(exc.status, exc.code, exc.title, exc.detail, instance, headers)


def _validation_problem(exc: ValidationException, instance: str) -> HttpReply:
    detail = exc.detail
    if isinstance(exc.extra, list) and exc.extra:
        parts = [f"{e.get('key') or 'body'}: {e.get('message')}" if isinstance(e, dict) else str(e) for e in exc.extra]
        detail = "; ".join(parts)
    return problem_reply(400, "validation_error", "Request failed validation", detail, instance)


def _http_problem(exc: HTTPException, instance: str) -> HttpReply:
    status = exc.status_code
    if isinstance(exc, NotAuthorizedException):
        status = 401
    if status >= 500:
        log.error("http_error", status=status, detail=exc.detail)
        return problem_reply(status, "internal_error", "Internal error", "the server could not complete the request", instance)
    code = _HTTP_CODES.get(status, "http_error")
    return problem_reply(status, code, code.replace("_", " ").capitalize(), exc.detail or code, instance, exc.headers)


def _unexpected_problem(exc: Exception, instance: str) -> HttpReply:
    if isinstance(exc, RecursionError):
        # A body nested thousands of levels deep exhausts the decoder's stack: the client's fault.
        return problem_reply(400, "validation_error", "Request failed validation", "JSON nested too deeply", instance)
    log.exception("unhandled_error")
    return problem_reply(500, "internal_error", "Internal error", "the server could not complete the request", instance)


def problem_for(exc: Exception, instance: str) -> HttpReply:
    """The problem for any exception; ``instance`` is the request's path."""
    if isinstance(exc, SessionManagerError):
        return _domain_problem(exc, instance)
    if isinstance(exc, ValidationException):  # before HTTPException: it is one
        return _validation_problem(exc, instance)
    if isinstance(exc, HTTPException):
        return _http_problem(exc, instance)
    return _unexpected_problem(exc, instance)


def handle_exception(request: Request, exc: Exception) -> Response[bytes]:  # type: ignore[type-arg]
    return to_response(problem_for(exc, request.url.path))


EXCEPTION_HANDLERS = {
    SessionManagerError: handle_exception,
    ValidationException: handle_exception,
    HTTPException: handle_exception,
    Exception: handle_exception,
}
