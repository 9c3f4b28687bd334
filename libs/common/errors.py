"""One error hierarchy for the whole system.

Each class carries a stable machine-readable ``code`` and its HTTP ``status``. A worker sends an
error as reply headers (``Nats-Service-Error`` / ``Nats-Service-Error-Code`` as NATS micro does,
plus ``Sm-Error`` with our code); :func:`error_from_headers` turns them back into the same class
and the gateway maps that class to a problem+json response in one place. Retryable errors differ
from terminal ones by type (``retryable``), never by message text.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SessionManagerError(Exception):
    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    retryable: ClassVar[bool] = False

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.title
        self.extra = extra
        super().__init__(self.detail)


class BadRequestError(SessionManagerError):
    code, status, title = "bad_request", 400, "Malformed request"


class ValidationFailedError(SessionManagerError):
    code, status, title = "validation_error", 400, "Request body failed validation"


class UnknownActionError(SessionManagerError):
    code, status, title = "unknown_action", 422, "Unknown action"


class AuthenticationError(SessionManagerError):
    code, status, title = "unauthorized", 401, "Missing or invalid bearer token"


class ForbiddenError(SessionManagerError):
    code, status, title = "forbidden", 403, "Not allowed"


class SessionNotFoundError(SessionManagerError):
    code, status, title = "session_not_found", 404, "Session not found"


class NotFoundError(SessionManagerError):
    code, status, title = "not_found", 404, "Not found"


class InvalidTransitionError(SessionManagerError):
    code, status, title = "invalid_transition", 409, "State transition not allowed"


class ConnectionStatusError(SessionManagerError):
    """The WhatsApp connection's status does not allow the action (the detail names the status)."""

    code, status, title = "invalid_connection_status", 409, "Not allowed in the connection's current status"


class SessionExistsError(SessionManagerError):
    code, status, title = "session_exists", 409, "Session already exists"


class VersionMismatchError(SessionManagerError):
    code, status, title = "version_mismatch", 412, "Version does not match If-Match"


class PayloadTooLargeError(SessionManagerError):
    code, status, title = "payload_too_large", 413, "Request body too large"


class IdempotencyConflictError(SessionManagerError):
    code, status, title = "idempotency_conflict", 422, "Idempotency-Key reused with a different request"


class LimitExceededError(SessionManagerError):
    code, status, title = "limit_exceeded", 422, "A size or count limit was exceeded"


class RateLimitedError(SessionManagerError):
    """Too many requests from one user; ``retry_after`` (seconds) becomes the Retry-After header."""

    code, status, title = "rate_limited", 429, "Too many requests"


class SessionLimitError(SessionManagerError):
    """The user already holds ``MAX_SESSIONS_PER_USER`` sessions: delete some first (not a rate: 409)."""

    code, status, title = "session_limit_reached", 409, "Too many sessions for this user"


class ServiceUnavailableError(SessionManagerError):
    code, status, title, retryable = "unavailable", 503, "No worker answered in time", True


class NotOwnerError(SessionManagerError):
    """The worker does not (or no longer) own the shard: fenced or mid-handoff. Retry elsewhere."""

    code, status, title, retryable = "not_owner", 503, "Shard is moving to another worker", True


class StorageUnavailableError(SessionManagerError):
    code, status, title, retryable = "storage_unavailable", 503, "Session storage is unavailable", True


class InternalError(SessionManagerError):
    pass


_BY_CODE: dict[str, type[SessionManagerError]] = {}


def _register(cls: type[SessionManagerError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(SessionManagerError)

HEADER_ERROR = "Nats-Service-Error"
HEADER_ERROR_CODE = "Nats-Service-Error-Code"
HEADER_SM_ERROR = "Sm-Error"


def error_headers(error: SessionManagerError) -> dict[str, str]:
    # Header values must be single-line ASCII-safe text.
    detail = " ".join(error.detail.split())[:500]
    return {HEADER_ERROR: detail, HEADER_ERROR_CODE: str(error.status), HEADER_SM_ERROR: error.code}


def error_from_headers(headers: dict[str, str] | None) -> SessionManagerError | None:
    if not headers or HEADER_ERROR_CODE not in headers:
        return None
    cls = _BY_CODE.get(headers.get(HEADER_SM_ERROR, ""), InternalError)
    return cls(headers.get(HEADER_ERROR) or None)
