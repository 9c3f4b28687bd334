"""The Redis clients every service builds the same way: the redis-py pool, and the worker's pipelined connection.

redis-py's default asyncio pool raises ``MaxConnectionsError`` the moment it is exhausted; the
blocking pool makes a burst wait (bounded) for a free connection instead of failing requests.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from sessionmgr.common.redis_observe import RedisObserver, observed_redis
from sessionmgr.common.redis_pipelined import PipelinedRedis
from sessionmgr.common.settings import Settings
from sessionmgr.common.tls import client_context, redis_tls_options

POOL_WAIT_S = 2.0
# Both clients: how long to connect, and how late a reply may be before the connection is dropped.
CONNECT_TIMEOUT_S = 1.0
REPLY_TIMEOUT_S = 1.0


def create_redis(settings: Settings, observer: RedisObserver | None = None) -> Redis:
    """With an ``observer``, every command is timed (and traced inside sampled traces)."""
    pool = BlockingConnectionPool(
        host=settings.db_host,
        port=settings.db_port,
        password=settings.db_password,
        db=settings.db_index,
        max_connections=settings.redis_max_connections,
        timeout=POOL_WAIT_S,
        socket_timeout=REPLY_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=5,
        **redis_tls_options(settings),  # DB_TLS / DB_TLS_CA
        # One quick retry (a dropped pooled connection), then fail fast: the caller decides
        # (the worker queues the change in degraded mode) instead of stalling for seconds.
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
    )
    return Redis(connection_pool=pool) if observer is None else observed_redis(pool, observer)


def create_pipelined_redis(settings: Settings, observer: RedisObserver | None = None) -> PipelinedRedis:
    """The worker's request-path connection (see ``redis_pipelined``), from the same settings."""
    return PipelinedRedis(
        host=settings.db_host,
        port=settings.db_port,
        password=settings.db_password,
        db=settings.db_index,
        ssl_context=client_context(settings.db_tls_ca) if settings.db_tls else None,
        connect_timeout=CONNECT_TIMEOUT_S,
        reply_timeout=REPLY_TIMEOUT_S,
        observer=observer,
    )
