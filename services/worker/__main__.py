"""``python -m sessionmgr.worker``: one worker process."""

from __future__ import annotations

import asyncio
import sys

from sessionmgr.common.logging import configure_logging
from sessionmgr.common.metrics import serve_metrics
from sessionmgr.common.runtime import run_service
from sessionmgr.common.settings import SettingsError, default_worker_id, load_settings
from sessionmgr.common.tracing import configure_tracing
from sessionmgr.worker.server import Worker


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"worker: {exc}")
    worker_id = settings.worker_id or default_worker_id()
    configure_logging(settings, "worker", worker_id=worker_id)
    provider = configure_tracing(f"{settings.service_name}-worker", **{"service.instance.id": worker_id})
    worker = Worker(settings, worker_id)

    async def serve(stop: asyncio.Event) -> None:
        try:
            async with serve_metrics(worker.metrics.registry, settings.metrics_host, settings.metrics_port):
                await worker.run(stop)
        finally:
            provider.shutdown()

    run_service(serve)


if __name__ == "__main__":
    main()
