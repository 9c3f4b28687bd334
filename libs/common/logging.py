"""structlog set-up shared by every service: JSON lines off a TTY, console on one.

Per request, services call ``structlog.contextvars.clear_contextvars()`` then
``bind_contextvars(session_id=..., request_id=...)``; ``merge_contextvars`` runs first in the
chain so those ids, plus ``trace_id``/``span_id`` from the current span, land on every line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import structlog
from opentelemetry import trace

from sessionmgr.common.settings import Settings


def _add_trace_ids(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if "trace_id" in event_dict:  # the canonical lines bring their own (their span has ended by then)
        return event_dict
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict["trace_id"] = format(ctx.trace_id, "032x")
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def configure_logging(settings: Settings, service: str, **bound: Any) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    use_json = settings.log_format == "json" or (settings.log_format == "auto" and not sys.stderr.isatty())
    if use_json:
        # msgspec encodes straight to bytes and BytesLogger writes them: the fast path structlog's
        # performance guide recommends (there with orjson).
        encoder = msgspec.json.Encoder(enc_hook=repr)
        renderer: Any = structlog.processors.JSONRenderer(serializer=lambda obj, **_: encoder.encode(obj))
        factory: Any = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer()
        factory = structlog.WriteLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
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
