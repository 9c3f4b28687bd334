"""nats.conf's users and permissions against a real nats-server: anonymous and wrong passwords are
refused, and each role can do its job but not another role's (publish on shard subjects, steal
requests, write the shard map, forge heartbeats, read other roles' replies).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from sessionmgr.common import natsauth, subjects
from tests.support.cluster import Cluster, Servers, nats_client

DENIED_WAIT_S = 5.0


class Connection:
    """A client connected as ``role`` that records the server's permission errors."""

    def __init__(self) -> None:
        self.nc: NATS | None = None
        self.errors: asyncio.Queue[str] = asyncio.Queue()

    async def _on_error(self, exc: Exception) -> None:
        await self.errors.put(str(exc))

    async def denied(self, what: str) -> str:
        """Wait for the server's permissions violation naming ``what``."""
        async def first_match() -> str:
            while True:
                err = await self.errors.get()
                if "permissions violation" in err.lower() and what.lower() in err.lower():  # nats-py lower-cases it
                    return err

        return await asyncio.wait_for(first_match(), DENIED_WAIT_S)


@contextlib.asynccontextmanager
async def connect_as(url: str, role: str) -> AsyncIterator[Connection]:
    conn = Connection()
    conn.nc = await nats.connect(url, **natsauth.role_credentials(role), inbox_prefix=natsauth.inbox_prefix(role), error_cb=conn._on_error, max_reconnect_attempts=0)
    try:
        yield conn
    finally:
        await conn.nc.close()


async def _connect_fails(url: str, **credentials: str) -> str:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    with pytest.raises(Exception) as raised:  # noqa: PT011 - nats-py raises several kinds
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, error_cb=on_error, **credentials)
    return " ".join([str(raised.value), *errors]).lower()


async def test_anonymous_connections_are_refused(servers: Servers) -> None:
    assert "authorization" in await _connect_fails(servers.nats_url)


async def test_wrong_password_is_refused(servers: Servers) -> None:
    assert "authorization" in await _connect_fails(servers.nats_url, user="worker", password="guessed")


async def test_every_role_can_connect(servers: Servers) -> None:
    for role in natsauth.ROLES:
        async with connect_as(servers.nats_url, role) as conn:
            assert conn.nc is not None and conn.nc.is_connected


async def _session_exists(url: str, session_id: str) -> bool:
    async with nats_client(url) as dev:
        msg = await dev.request(f"sessions.{session_id}.session.get", b"", timeout=5, headers={"Sm-User": "perm-owner"})
    return (msg.headers or {}).get("Nats-Service-Error-Code") is None


@pytest.mark.parametrize("role", ["worker", "supervisor"])
async def test_only_the_gateway_and_cli_publish_on_shard_subjects(cluster: Cluster, role: str) -> None:
    sid = f"perm-{uuid.uuid4().hex[:12]}"
    subject = subjects.session_subject(sid, subjects.OP_CREATE, cluster.settings.shard_count)
    body = msgspec.json.encode({"user_id": "perm-owner", "metadata": {}})
    async with connect_as(cluster.servers.nats_url, role) as conn:
        assert conn.nc is not None
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await conn.nc.request(subject, body, timeout=1, headers={"Sm-User": "perm-owner"})
        await conn.denied(subject)
    assert not await _session_exists(cluster.servers.nats_url, sid)


async def test_the_cli_user_reaches_sessions_through_the_mapping(cluster: Cluster) -> None:
    sid = f"perm-{uuid.uuid4().hex[:12]}"
    async with connect_as(cluster.servers.nats_url, "cli") as conn:
        assert conn.nc is not None
        msg = await conn.nc.request(f"sessions.{sid}.session.create", b'{"user_id": "perm-owner"}', timeout=5, headers={"Sm-User": "perm-owner"})
        assert (msg.headers or {}).get("Nats-Service-Error-Code") is None, msg.headers
        assert msgspec.json.decode(msg.data)["session_id"] == sid
        assert conn.errors.empty()
    assert await _session_exists(cluster.servers.nats_url, sid)


@pytest.mark.parametrize(("role", "subject"), [("gateway", "sm.shard.>"), ("cli", "sm.shard.>"), ("supervisor", "sm.shard.7.>"), ("cli", "_INBOX_gateway.>"), ("worker", "_INBOX_gateway.>"), ("cli", "sm.hb.*")])
async def test_roles_cannot_listen_where_they_do_not_belong(servers: Servers, role: str, subject: str) -> None:
    async with connect_as(servers.nats_url, role) as conn:
        assert conn.nc is not None
        await conn.nc.subscribe(subject)
        await conn.denied(subject)


@pytest.mark.parametrize("role", ["cli", "gateway"])
async def test_heartbeats_cannot_be_forged(servers: Servers, role: str) -> None:
    async with connect_as(servers.nats_url, role) as conn:
        assert conn.nc is not None
        await conn.nc.publish("sm.hb.forged", b"{}")
        await conn.denied("sm.hb.forged")


@pytest.mark.parametrize("role", ["worker", "gateway", "cli"])
async def test_only_the_supervisor_writes_the_shard_map(cluster: Cluster, role: str) -> None:
    async with nats_client(cluster.servers.nats_url) as dev:
        kv = await dev.jetstream().key_value(subjects.SHARD_MAP_BUCKET)
        before = await kv.get(subjects.SHARD_MAP_KEY)
    async with connect_as(cluster.servers.nats_url, role) as conn:
        assert conn.nc is not None
        subject = f"$KV.{subjects.SHARD_MAP_BUCKET}.{subjects.SHARD_MAP_KEY}"
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await conn.nc.request(subject, b'{"term": 999999, "shards": []}', timeout=1)
        await conn.denied(subject)
        # Nor may it delete or purge the bucket's stream.
        for api in (f"$JS.API.STREAM.DELETE.KV_{subjects.SHARD_MAP_BUCKET}", f"$JS.API.STREAM.PURGE.KV_{subjects.SHARD_MAP_BUCKET}"):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await conn.nc.request(api, b"", timeout=1)
            await conn.denied(api)
    async with nats_client(cluster.servers.nats_url) as dev:
        kv = await dev.jetstream().key_value(subjects.SHARD_MAP_BUCKET)
        after = await kv.get(subjects.SHARD_MAP_KEY)
    assert after.revision >= before.revision
    assert b'"term": 999999' not in after.value and b'"term":999999' not in after.value


async def test_a_worker_reads_the_shard_map(cluster: Cluster) -> None:
    async with connect_as(cluster.servers.nats_url, "worker") as conn:
        assert conn.nc is not None
        kv = await conn.nc.jetstream().key_value(subjects.SHARD_MAP_BUCKET)
        entry = await kv.get(subjects.SHARD_MAP_KEY)
        assert entry.value
        assert conn.errors.empty()
