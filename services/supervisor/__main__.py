"""``python -m sessionmgr.supervisor``: one supervisor (run two for a standby)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

from sessionmgr.common.logging import configure_logging
from sessionmgr.common.metrics import serve_metrics
from sessionmgr.common.runtime import run_service
from sessionmgr.common.settings import SettingsError, load_settings
from sessionmgr.common.tracing import configure_tracing
from sessionmgr.supervisor.server import Supervisor


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"supervisor: {exc}")
    supervisor_id = os.environ.get("SUPERVISOR_ID") or f"{socket.gethostname()}-{os.getpid()}"
    configure_logging(settings, "supervisor", supervisor_id=supervisor_id)
    provider = configure_tracing(f"{settings.service_name}-supervisor")
    supervisor = Supervisor(settings, supervisor_id)

    async def serve(stop: asyncio.Event) -> None:
        try:
            async with serve_metrics(supervisor.metrics.registry, settings.metrics_host, settings.metrics_port):
                await supervisor.run(stop)
        finally:
            provider.shutdown()

    run_service(serve)


if __name__ == "__main__":
    main()
