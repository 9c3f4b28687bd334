"""structlog set-up shared by every service: JSON lines off a TTY, console on one.

Per request, services call ``structlog.contextvars.clear_contextvars()`` then
``bind_contextvars(session_id=..., request_id=...)``; ``merge_contextvars`` runs first in the
chain so those ids, plus ``trace_id``/``span_id`` from the current span, land on every line.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from datetime import UTC, datetime
from typing import IO, Any

import msgspec
import structlog
from opentelemetry import trace

from sessionmgr.common.settings import Settings


class _UtcTimestamper:
    """``timestamp`` as ISO 8601 UTC with microseconds (``2026-11-26T19:00:00.123456Z``).

    structlog's ``TimeStamper`` builds a timezone-aware datetime and formats it for every line,
    about 3 % of a worker's CPU at one line per request; the date and time change once a
    second, so they are formatted once a second here.
    """

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        # Integer nanoseconds: a float's rounding could put a line a microsecond before its time.
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        event_dict["timestamp"] = f"{self._prefix}{nanos // 1000:06d}Z"
        return event_dict


def _add_trace_ids(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if "trace_id" in event_dict:  # the canonical lines bring their own (their span has ended by then)
        return event_dict
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict["trace_id"] = format(ctx.trace_id, "032x")
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


class LoopBatchedBytesLogger:
    """structlog's ``BytesLogger``, but the lines of one event-loop pass go out in one ``write``.

    Under load a service logs a line per request; one ``write`` syscall each was about 7 % of the
    gateway's and the worker's CPU. Lines are queued and written by a callback scheduled right
    after the current pass, so a reply already handed to a transport is sent before its log
    line is written. Outside a running loop (start-up, threads) a line is written at once.
    What is queued when a process is SIGKILLed (at most one pass) is lost; a normal exit,
    including one by an exception, writes it (``atexit``).
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._pending: list[bytes] = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        atexit.register(self.flush)

    def msg(self, message: bytes) -> None:
        self._pending.append(message)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        # Scheduled on another (stopped) loop does not count: that callback may never run.
        if self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_soon(self.flush)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        self._scheduled_on = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._file.write(b"\n".join(pending) + b"\n")
            self._file.flush()
        except (OSError, ValueError):  # stderr closed or gone: nowhere left to log to
            pass


def configure_logging(settings: Settings, service: str, **bound: Any) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    use_json = settings.log_format == "json" or (settings.log_format == "auto" and not sys.stderr.isatty())
    if use_json:
        # msgspec encodes straight to bytes and a bytes logger writes them: the fast path structlog's
        # performance guide recommends (there with orjson).
        encoder = msgspec.json.Encoder(enc_hook=repr)
        renderer: Any = structlog.processors.JSONRenderer(serializer=lambda obj, **_: encoder.encode(obj))
        sink = LoopBatchedBytesLogger(sys.stderr.buffer)
        factory: Any = lambda *_: sink  # noqa: E731 - one sink per process, whatever the logger's name
    else:
        renderer = structlog.dev.ConsoleRenderer()
        factory = structlog.WriteLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _UtcTimestamper(),
            _add_trace_ids,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service, **bound)
    # Third-party libraries log through the standard library; keep them quiet and on stderr.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
