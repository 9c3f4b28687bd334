"""NATS request/reply with the retry policy every caller of a worker needs.

No responders or a timeout while a shard moves is retried with exponential backoff and full
jitter until the caller's deadline. That is safe because every mutating request carries an
idempotency key which the worker's write script checks atomically with the write.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from sessionmgr.common.errors import ServiceUnavailableError, error_from_headers

HEADER_USER = "Sm-User"
HEADER_ADMIN = "Sm-Admin"
HEADER_REQUEST_ID = "Sm-Request-Id"
HEADER_IDEMPOTENCY_KEY = "Idempotency-Key"
HEADER_IF_MATCH = "If-Match"
HEADER_CLIENT_IP = "Sm-Client-Ip"
HEADER_READ_ONLY = "Sm-Read-Only"
# The gateway made the Idempotency-Key itself: it only has to outlive the gateway's own retries.
HEADER_KEY_GENERATED = "Sm-Key-Generated"
# The sender writes this request's canonical log line (the gateway does, with the worker's ID):
# the worker then logs its own request_handled line at debug level, so a request is logged once.
HEADER_LOGGED_BY = "Sm-Logged-By"

# Reply headers (worker -> gateway or CLI).
HEADER_STATUS = "Sm-Status"  # the HTTP status the answer maps to
HEADER_VERSION = "Sm-Version"  # the session version after the request (ETag)
HEADER_QUEUED = "Sm-Queued-Request"  # request id of a change queued in degraded mode (202)
HEADER_STALE = "Sm-Stale"  # "1": read served from memory while storage is away
HEADER_WORKER = "Sm-Worker"  # the ID of the worker that answered

# "No responders" is answered at once, so retrying often is cheap and finds the new owner soon.
_BACKOFF_BASE = 0.01
_BACKOFF_CAP = 0.1


async def request(
    nc: NATS,
    subject: str,
    payload: bytes,
    headers: dict[str, str],
    *,
    deadline: float,
    attempt_timeout: float,
    on_no_responders: Callable[[str], Awaitable[None]] | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> Msg:
    """Send until a worker answers, a terminal error comes back, or ``deadline`` (monotonic) passes.

    ``on_retry(reason)`` is told about each retry: ``no_responders``, ``timeout`` or the
    retryable error's code (``not_owner``, ``storage_unavailable``, ...).
    """
    attempt = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServiceUnavailableError("no worker answered before the request deadline")
        if not nc.is_connected:
            # Buffering a request while NATS is away would only turn into a timeout: fail fast.
            raise ServiceUnavailableError("message bus unavailable")
        try:
            msg = await nc.request(subject, payload, timeout=min(attempt_timeout, remaining), headers=headers)
        except nats.errors.NoRespondersError:
            reason = "no_responders"
            if on_no_responders is not None:
                await on_no_responders(subject)
        except nats.errors.TimeoutError:
            reason = "timeout"
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError):
            raise ServiceUnavailableError("message bus unavailable") from None
        else:
            error = error_from_headers(msg.headers)
            if error is None:
                return msg
            if not error.retryable:
                raise error
            reason = error.code
        if on_retry is not None:
            on_retry(reason)
        attempt += 1
        delay = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
