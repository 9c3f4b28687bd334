"""Per-user rate limits and the session cap, shared by gateway replicas through Redis.

Low limits come from settings; every test uses a fresh user, so the shared suite never trips them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from sessionmgr.common import procs
from sessionmgr.common.redis_client import create_redis
from sessionmgr.gateway.ratelimit import RateLimiter, bucket_key
from sessionmgr.worker.store import user_index_key
from tests.conftest import auth
from tests.integration.test_api import assert_problem
from tests.support.cluster import Cluster, redis_client
from tests.support.security import gateway_client


def assert_429(resp: httpx.Response) -> int:
    assert_problem(resp, 429, "rate_limited")
    retry_after = int(resp.headers["retry-after"])
    assert 1 <= retry_after <= 60
    return retry_after


async def test_requests_per_user_are_limited_with_retry_after(cluster: Cluster, user: str) -> None:
    settings = cluster.settings.with_overrides(rate_limit_per_minute=5)
    async with gateway_client(settings) as api:
        for _ in range(5):
            assert (await api.get("/sessions", headers=auth(user))).status_code == 200
        retry_after = assert_429(await api.get("/sessions", headers=auth(user)))
        assert retry_after >= 11  # one request per 12 s refills
        assert_429(await api.post("/sessions", json={}, headers=auth(user)))
        # Another user has a budget of their own.
        assert (await api.get("/sessions", headers=auth(user + "-other"))).status_code == 200
    async with redis_client(cluster.servers.redis_port) as redis:
        ttl = await redis.pttl(bucket_key(user, "requests"))
        assert 0 < ttl <= 60_000


async def test_limits_are_shared_by_gateway_replicas(cluster: Cluster, user: str) -> None:
    settings = cluster.settings.with_overrides(rate_limit_per_minute=4)
    async with gateway_client(settings) as first, gateway_client(settings) as second:
        assert (await first.get("/sessions", headers=auth(user))).status_code == 200
        assert (await second.get("/sessions", headers=auth(user))).status_code == 200
        assert (await first.get("/sessions", headers=auth(user))).status_code == 200
        assert (await second.get("/sessions", headers=auth(user))).status_code == 200
        assert_429(await first.get("/sessions", headers=auth(user)))
        assert_429(await second.get("/sessions", headers=auth(user)))


async def test_session_creation_has_a_lower_limit(cluster: Cluster, user: str) -> None:
    settings = cluster.settings.with_overrides(rate_limit_per_minute=100, create_rate_limit_per_minute=2)
    async with gateway_client(settings) as api:
        for _ in range(2):
            assert (await api.post("/sessions", json={}, headers=auth(user))).status_code == 201
        body = assert_problem(await api.post("/sessions", json={}, headers=auth(user)), 429, "rate_limited")
        assert "creation" in body["detail"]
        assert (await api.get("/sessions", headers=auth(user))).status_code == 200  # reads still go


async def test_session_cap_is_409_until_one_is_deleted(cluster: Cluster, user: str) -> None:
    settings = cluster.settings.with_overrides(max_sessions_per_user=3)
    async with gateway_client(settings) as api:
        ids = [(await api.post("/sessions", json={}, headers=auth(user))).json()["session_id"] for _ in range(3)]
        body = assert_problem(await api.post("/sessions", json={}, headers=auth(user)), 409, "session_limit_reached")
        assert "3" in body["detail"]
        assert (await api.delete(f"/sessions/{ids[0]}", headers=auth(user))).status_code == 204
        assert (await api.post("/sessions", json={}, headers=auth(user))).status_code == 201
        assert_problem(await api.post("/sessions", json={}, headers=auth(user)), 409, "session_limit_reached")


async def test_entries_of_vanished_sessions_do_not_count(cluster: Cluster, user: str) -> None:
    settings = cluster.settings.with_overrides(max_sessions_per_user=2)
    async with redis_client(cluster.servers.redis_port) as redis:
        # Index entries whose data is gone (expired sessions the index still lists).
        await redis.zadd(user_index_key(user), {"0000000000001:gone-1": 0, "0000000000002:gone-2": 0})
    async with gateway_client(settings) as api:
        assert (await api.post("/sessions", json={}, headers=auth(user))).status_code == 201
        assert (await api.post("/sessions", json={}, headers=auth(user))).status_code == 201
        assert_problem(await api.post("/sessions", json={}, headers=auth(user)), 409, "session_limit_reached")


async def test_limiter_lets_requests_through_when_its_redis_is_away(cluster: Cluster, user: str) -> None:
    dead_port = procs.free_port()  # nothing listens: the limiter fails open, the workers still have Redis
    settings = cluster.settings.with_overrides(rate_limit_per_minute=1, db_port=dead_port)
    async with gateway_client(settings) as api:
        started = time.monotonic()
        for _ in range(20):
            assert (await api.get("/sessions", headers=auth(user))).status_code == 200
        # After the first failure the limiter is bypassed for a while, not retried per request.
        assert time.monotonic() - started < 5.0


@pytest.fixture
async def batched(cluster: Cluster) -> AsyncIterator[tuple[RateLimiter, Redis]]:
    """A limiter of 3,000 requests a minute (20 ms per token, batches of 10) and its Redis."""
    settings = cluster.settings.with_overrides(rate_limit_per_minute=3000)
    redis = create_redis(settings)
    try:
        yield RateLimiter(redis, settings), redis
    finally:
        await redis.aclose()


async def test_a_gateway_takes_request_tokens_in_batches(batched: tuple[RateLimiter, Redis], user: str) -> None:
    limiter, redis = batched
    for _ in range(21):
        await limiter.check(user)
    # Three batches of ten were charged (600 ms ahead of now), not 21 single tokens (420 ms).
    assert 500 < await redis.pttl(bucket_key(user, "requests")) <= 600


async def test_concurrent_requests_of_one_user_share_a_batch_instead_of_each_paying_for_one(batched: tuple[RateLimiter, Redis], user: str) -> None:
    limiter, redis = batched
    # 64 connections of one user at once, three times over: 192 requests.
    for _ in range(3):
        await asyncio.gather(*(limiter.check(user) for _ in range(64)))
    # Charged about what was used (192 tokens: 3.84 s ahead), rounded up to whole batches,
    # not a batch per request that found the lease empty (up to 1,920 tokens: 38 s).
    assert 3_800 < await redis.pttl(bucket_key(user, "requests")) <= 4_400
