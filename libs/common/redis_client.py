"""The Redis client every service builds the same way.

redis-py's default asyncio pool raises ``MaxConnectionsError`` the moment it is exhausted; the
blocking pool makes a burst wait (bounded) for a free connection instead of failing requests.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from sessionmgr.common.redis_observe import RedisObserver, observed_redis
from sessionmgr.common.settings import Settings
from sessionmgr.common.tls import redis_tls_options

POOL_WAIT_S = 2.0


def create_redis(settings: Settings, observer: RedisObserver | None = None) -> Redis:
    """With an ``observer``, every command is timed (and traced inside sampled traces)."""
    pool = BlockingConnectionPool(
        host=settings.db_host,
        port=settings.db_port,
        password=settings.db_password,
        db=settings.db_index,
        max_connections=settings.redis_max_connections,
        timeout=POOL_WAIT_S,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        health_check_interval=5,
        **redis_tls_options(settings),  # DB_TLS / DB_TLS_CA
        # One quick retry (a dropped pooled connection), then fail fast: the caller decides
        # (the worker queues the change in degraded mode) instead of stalling for seconds.
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
    )
    return Redis(connection_pool=pool) if observer is None else observed_redis(pool, observer)
