"""Shared fixtures: real servers on free ports, a worker cluster, and the gateway in-process."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient

from sessionmgr.gateway.app import create_app
from sessionmgr.gateway.auth import mint_token
from tests.support.cluster import TEST_JWT_SECRET, Cluster, HeartbeatWatch, Servers, nats_client


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """One nats-server and one redis-server for the whole non-destructive suite."""
    srv = Servers(root=tmp_path_factory.mktemp("servers")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
async def cluster(servers: Servers) -> AsyncIterator[Cluster]:
    """A supervisor and two worker processes serving every shard."""
    settings = servers.settings()
    cl = Cluster(servers, settings)
    try:
        cl.start_supervisor()
        names = {cl.start_worker(), cl.start_worker()}
        async with nats_client(servers.nats_url) as nc:
            watch = await HeartbeatWatch(nc, settings.failure_timeout).start()
            await watch.wait_covered(settings.shard_count, names, each_serves=True)
            await watch.stop()
        yield cl
    finally:
        cl.stop()


@pytest.fixture(scope="session")
async def api(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway app, in this process, talking to the cluster over NATS."""
    app = create_app(cluster.settings)
    async with AsyncTestClient(app=app, base_url="http://gateway.local") as client:
        yield client


def token_for(user: str, *, scope: str | None = None, ttl_s: int = 3600, secret: str = TEST_JWT_SECRET) -> str:
    return mint_token(secret, user, ttl_s=ttl_s, scope=scope)


def auth(user: str, *, scope: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(user, scope=scope)}"}


@pytest.fixture
def user() -> str:
    """A fresh user per test so tests never see each other's sessions."""
    return f"user-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def headers(user: str) -> dict[str, str]:
    return auth(user)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture
async def isolated_servers(tmp_path: Path) -> AsyncIterator[Servers]:
    """Servers of this test's own, for tests that kill, pause or restart things."""
    srv = Servers(root=tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def make_cluster(isolated_servers: Servers) -> AsyncIterator:
    """Factory: ``await make_cluster(workers=4, supervisors=1, **settings)`` -> (Cluster, HeartbeatWatch, nc)."""
    clusters: list[Cluster] = []
    async with nats_client(isolated_servers.nats_url) as nc:
        watches: list[HeartbeatWatch] = []

        async def start(workers: int = 2, supervisors: int = 1, **overrides: object):  # type: ignore[no-untyped-def]
            settings = isolated_servers.settings(**overrides)
            cl = Cluster(isolated_servers, settings)
            clusters.append(cl)
            for _ in range(supervisors):
                cl.start_supervisor()
            names = {cl.start_worker() for _ in range(workers)}
            watch = await HeartbeatWatch(nc, settings.failure_timeout).start()
            watches.append(watch)
            # Settled: each worker has joined the map (rendezvous hashing leaves none of up to
            # a few dozen workers without a shard of 64), not just the first one seen.
            await watch.wait_covered(settings.shard_count, names, each_serves=len(names) <= settings.shard_count // 8)
            return cl, watch, nc

        try:
            yield start
        finally:
            for watch in watches:
                await watch.stop()
            for cl in clusters:
                cl.stop()
