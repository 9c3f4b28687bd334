"""Process runtime: uvloop, signal handling and a clean, bounded shutdown for every service."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)


def run_service(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` until it returns; SIGTERM/SIGINT set ``stop`` so it can drain.

    A crash inside ``main`` (for example a background loop of its TaskGroup) ends the process
    with exit status 1 so a supervisor (systemd, compose, ``make run``) sees it.
    """
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        pass

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(runner())
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("service_crashed")
        sys.exit(1)
