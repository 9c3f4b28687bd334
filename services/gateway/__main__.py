"""``python -m sessionmgr.gateway``: the HTTP gateway on ``PORT`` (default 3000)."""

from __future__ import annotations

import sys

import uvicorn

from sessionmgr.common.logging import configure_logging
from sessionmgr.common.runtime import tune_gc
from sessionmgr.common.settings import SettingsError, load_settings
from sessionmgr.common.tls import server_tls_options
from sessionmgr.common.tracing import configure_tracing
from sessionmgr.gateway.app import create_app
from sessionmgr.gateway.http_protocol import CoalescingHttpToolsProtocol


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"gateway: {exc}")
    configure_logging(settings, "gateway")
    provider = configure_tracing(f"{settings.service_name}-gateway")
    app = create_app(settings)
    tune_gc()
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http=CoalescingHttpToolsProtocol,  # httptools, one write per response
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=int(settings.drain_timeout),
            # Longer than the usual 60 s idle timeout of load balancers and client pools, so the
            # server never closes a kept-alive connection just as a client reuses it.
            timeout_keep_alive=75,
            **server_tls_options(settings),  # HTTPS with TLS_CERT_FILE / TLS_KEY_FILE
        )
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
