"""Real processes for tests: nats-server, redis-server, supervisors and workers on free ports.

Nothing here assumes a service on a standard port, and every process is stopped (SIGTERM, then
SIGKILL) when its owner is done, even after a failed test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from sessionmgr.common import natsauth, procs, subjects
from sessionmgr.common.models import Heartbeat, heartbeat_decoder, shard_map_decoder
from sessionmgr.common.settings import Settings, validate_settings

TEST_JWT_SECRET = "test-secret-0123456789abcdef-0123456789"


@dataclass
class Servers:
    """One nats-server and one redis-server, restartable on the same ports and data."""

    root: Path
    nats_port: int = field(default_factory=procs.free_port)
    redis_port: int = field(default_factory=procs.free_port)
    nats: procs.ManagedProcess | None = None
    redis: procs.ManagedProcess | None = None

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def start_nats(self) -> None:
        self.nats = procs.nats_server(self.nats_port, self.root / "nats", log_path=self.root / "logs" / "nats.log").start()
        self.nats.wait_for_port(self.nats_port)

    def start_redis(self) -> None:
        self.redis = procs.redis_server(self.redis_port, self.root / "redis", log_path=self.root / "logs" / "redis.log").start()
        self.redis.wait_for_port(self.redis_port)

    def start(self) -> Servers:
        self.start_nats()
        self.start_redis()
        return self

    def stop(self) -> None:
        for proc in (self.redis, self.nats):
            if proc is not None:
                proc.stop()

    def settings(self, **overrides: object) -> Settings:
        base = Settings(
            env="test",
            nats_url=self.nats_url,
            db_host="127.0.0.1",
            db_port=self.redis_port,
            jwt_secret=TEST_JWT_SECRET,
            # In-process components of a test are gateways; worker and supervisor processes get
            # their own NATS users (Cluster.start_*), test helpers the full-access dev user.
            nats_user="gateway",
            nats_password=natsauth.role_credentials("gateway")["password"],
            heartbeat_interval=0.2,
            heartbeat_misses=3,
            log_format="json",
        )
        return validate_settings(msgspec.structs.replace(base, **overrides))


def env_for(settings: Settings) -> dict[str, str]:
    """The environment that makes a service process load exactly ``settings``."""
    from sessionmgr.common.settings import ENV_VARS

    env: dict[str, str] = {}
    for var, name in ENV_VARS.items():
        value = getattr(settings, name)
        if value is None:
            continue
        env[var] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@dataclass
class Cluster:
    """Supervisor(s) and workers as real OS processes against ``servers``."""

    servers: Servers
    settings: Settings
    workers: dict[str, procs.ManagedProcess] = field(default_factory=dict)
    supervisors: dict[str, procs.ManagedProcess] = field(default_factory=dict)
    gateways: dict[str, procs.ManagedProcess] = field(default_factory=dict)
    _next_worker: int = 0
    # Added to every process's environment (OTEL_* for the tracing tests, for example).
    extra_env: dict[str, str] = field(default_factory=dict)
    # Give each process its own METRICS_PORT (recorded in metrics_ports by process name).
    metrics: bool = False
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def _log(self, name: str) -> Path:
        return self.servers.root / "logs" / f"{name}.log"

    def _process_env(self, name: str) -> dict[str, str]:
        env = dict(self.extra_env)
        if self.metrics:
            self.metrics_ports[name] = procs.free_port()
            env["METRICS_HOST"] = "127.0.0.1"
            env["METRICS_PORT"] = str(self.metrics_ports[name])
        return env

    def start_supervisor(self, name: str | None = None) -> str:
        name = name or f"supervisor-{len(self.supervisors) + 1}"
        env = {**env_for(self.settings), **self._process_env(name), **natsauth.role_env("supervisor"), "SUPERVISOR_ID": name}
        self.supervisors[name] = procs.service("supervisor", name, env, log_path=self._log(name)).start()
        return name

    def start_gateway(self, name: str = "gateway") -> str:
        """A gateway process; returns its base URL (waits until it listens)."""
        port = procs.free_port()
        env = {**env_for(self.settings), **self._process_env(name), **natsauth.role_env("gateway"), "PORT": str(port), "HOST": "127.0.0.1"}
        proc = procs.service("gateway", name, env, log_path=self._log(name)).start()
        self.gateways[name] = proc
        proc.wait_for_port(port)
        return f"http://127.0.0.1:{port}"

    def start_worker(self, name: str | None = None) -> str:
        self._next_worker += 1
        name = name or f"w{self._next_worker}-{time.monotonic_ns() % 100000}"
        env = {**env_for(self.settings), **self._process_env(name), **natsauth.role_env("worker"), "WORKER_ID": name}
        self.workers[name] = procs.service("worker", name, env, log_path=self._log(name)).start()
        return name

    def stop(self) -> None:
        for proc in [*self.gateways.values(), *self.workers.values(), *self.supervisors.values()]:
            proc.stop(timeout=10)

    def log_text(self, name: str) -> str:
        path = self._log(name)
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(url, **natsauth.role_credentials("dev"), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def redis_client(port: int) -> AsyncIterator[Redis]:
    client = Redis(host="127.0.0.1", port=port)
    try:
        yield client
    finally:
        await client.aclose()


class HeartbeatWatch:
    """Follows worker heartbeats so tests can await cluster states instead of sleeping."""

    def __init__(self, nc: NATS, failure_timeout: float) -> None:
        self._nc = nc
        self._failure_timeout = failure_timeout
        self.latest: dict[str, tuple[Heartbeat, float]] = {}
        self._changed = asyncio.Event()
        self._sub = None

    async def start(self) -> HeartbeatWatch:
        self._sub = await self._nc.subscribe(f"{subjects.HEARTBEAT_PREFIX}.*", cb=self._on_beat)
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_beat(self, msg) -> None:  # type: ignore[no-untyped-def]
        beat = heartbeat_decoder.decode(msg.data)
        self.latest[beat.worker_id] = (beat, time.monotonic())
        self._changed.set()

    def live(self) -> dict[str, Heartbeat]:
        now = time.monotonic()
        return {wid: beat for wid, (beat, seen) in self.latest.items() if now - seen <= self._failure_timeout}

    async def wait_until(self, predicate, timeout: float = 20.0, what: str = "cluster state") -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate(self.live()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; live: { {w: b.shards for w, b in self.live().items()} }")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))

    async def wait_covered(
        self, shard_count: int, workers: set[str] | None = None, timeout: float = 20.0, *, each_serves: bool = False
    ) -> None:
        """Every shard served by exactly one live worker (of ``workers`` when given), as the
        current shard map says; with ``each_serves``, every one of ``workers`` serves some.

        Heartbeats alone are not enough: a worker's last one can predate a map change (a join
        right after start-up, a kill right after a join), and then it still lists shards the map
        has given away; the test would go on before the move it waits for has happened.
        """
        deadline = time.monotonic() + timeout

        def covered(live: dict[str, Heartbeat]) -> bool:
            if workers is not None and not workers <= set(live):
                return False
            if each_serves and workers is not None and any(not live[w].shards for w in workers):
                return False
            owners = [s for wid, b in live.items() if workers is None or wid in workers for s in b.shards]
            return sorted(owners) == list(range(shard_count))

        while True:
            await self.wait_until(covered, max(deadline - time.monotonic(), 0.0), what=f"all {shard_count} shards covered")
            if await self._heartbeats_match_map(workers):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"heartbeats never matched the shard map; live: { {w: b.shards for w, b in self.live().items()} }")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(max(deadline - time.monotonic(), 0.0), 0.5))

    async def _heartbeats_match_map(self, workers: set[str] | None) -> bool:
        try:
            shard_map = await read_shard_map(self._nc)
        except Exception:  # noqa: BLE001 - no map yet, or NATS coming back: not settled
            return False
        for wid, beat in self.live().items():
            if workers is None or wid in workers:
                if sorted(beat.shards) != [i for i, e in enumerate(shard_map.shards) if e.owner == wid]:
                    return False
        return True


async def read_shard_map(nc: NATS):  # type: ignore[no-untyped-def]
    kv = await nc.jetstream().key_value(subjects.SHARD_MAP_BUCKET)
    entry = await kv.get(subjects.SHARD_MAP_KEY)
    return shard_map_decoder.decode(entry.value)
