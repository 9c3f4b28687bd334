"""TLS for the clients every service builds (NATS, Redis) and for the gateway's HTTPS listener.

Client contexts verify the server's certificate and host name against ``*_TLS_CA`` (or the
system's CAs when none is given) and speak TLS 1.2 or newer; a client certificate is sent when
one is configured (NATS mutual TLS). Nothing here reads the environment: settings come in.
"""

from __future__ import annotations

import ssl
from typing import Any

from redis.asyncio.connection import SSLConnection

from sessionmgr.common.settings import Settings


def client_context(ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def nats_tls_enabled(settings: Settings) -> bool:
    return bool(settings.nats_tls_ca or settings.nats_tls_cert) or settings.nats_url.startswith(("tls://", "wss://"))


def nats_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The context for ``nats.connect(tls=...)``, or None for a plain connection."""
    if not nats_tls_enabled(settings):
        return None
    return client_context(settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key)


def redis_tls_options(settings: Settings) -> dict[str, Any]:
    """Extra connection-pool arguments for redis-py: TLS with certificate and host name checks.

    redis-py builds a new SSLContext for every connection (loading the system CA store and the CA
    file each time: tens of milliseconds of CPU), enough for a pool that opens dozens of
    connections at once to time out. Every connection of the pool shares one context instead.
    """
    if not settings.db_tls:
        return {}
    context = client_context(settings.db_tls_ca)

    class SharedContextSSLConnection(SSLConnection):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.ssl_context.context = context  # RedisSSLContext.get() returns it as built

    return {
        "connection_class": SharedContextSSLConnection,
        "ssl_ca_certs": settings.db_tls_ca,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_min_version": ssl.TLSVersion.TLSv1_2,
    }


def server_tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn arguments for HTTPS when ``TLS_CERT_FILE``/``TLS_KEY_FILE`` are set."""
    if not settings.tls_cert_file:
        return {}
    return {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
