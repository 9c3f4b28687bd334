"""The processes a benchmark run starts: the Session Manager stack, and the baseline app.

Everything listens on 127.0.0.1 on free ports, logs to files in a scratch directory, and is
stopped by ``stop()`` in reverse start order (SIGTERM, then SIGKILL) whatever happened before.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from sessionmgr.common import natsauth, procs

SHARD_COUNT = 64  # must equal the partition count of the mapping in nats.conf
HEARTBEAT_INTERVAL_S = 0.5  # the services' default; the liveness window below follows it
HEARTBEAT_MISSES = 3
_SERVERS = ("nats-server", "redis-server")
# A single worker has nobody to hand its shards to and would wait the whole drain; 1 s keeps exits quick.
DRAIN_TIMEOUT_S = 1
_SLOW_EXIT_S = 3.0  # DRAIN_TIMEOUT plus start-up slack: slower exits are reported
BASELINE_APP = Path(__file__).resolve().parent / "baseline_app.py"


class StackError(RuntimeError):
    pass


@dataclass
class Target:
    """Something to load: HTTP ports, and which processes to sample for CPU."""

    name: str  # "system" or "baseline"
    host: str
    ports: list[int]
    roles: dict[str, list[int]] = field(default_factory=dict)  # role -> pids
    nats_url: str | None = None
    redis_port: int | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(self.host, port) for port in self.ports]


# ---- readiness ---------------------------------------------------------------------------------


def http_status(host: str, port: int, path: str, timeout_s: float = 1.0) -> int | None:
    """GET ``path``; None when nothing answers. http.client, not urllib: no proxy settings apply."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def wait_http_ready(host: str, port: int, *, timeout_s: float, alive: list[procs.ManagedProcess] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: int | None = None
    while time.monotonic() < deadline:
        _check_alive(alive or [])
        last = http_status(host, port, "/readyz")
        if last == 200:
            return
        time.sleep(0.1)
    raise StackError(f"http://{host}:{port}/readyz did not answer 200 within {timeout_s:.0f}s (last status: {last})")


class _Beat(msgspec.Struct):
    worker_id: str
    shards: list[int]


async def _wait_covered(nats_url: str, *, workers: set[str] | None, timeout_s: float) -> dict[str, list[int]]:
    """Follow sm.hb.* until every shard is served by exactly one live worker (all of ``workers``)."""
    import nats

    window = HEARTBEAT_INTERVAL_S * HEARTBEAT_MISSES
    latest: dict[str, tuple[list[int], float]] = {}
    decoder = msgspec.json.Decoder(_Beat)

    async def on_beat(msg) -> None:  # type: ignore[no-untyped-def]
        try:
            beat = decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        latest[beat.worker_id] = (beat.shards, time.monotonic())

    def covered() -> dict[str, list[int]] | None:
        now = time.monotonic()
        live = {wid: shards for wid, (shards, seen) in latest.items() if now - seen <= window}
        if workers is not None and not (workers <= set(live) and all(live[w] for w in workers)):
            return None
        owned = sorted(s for shards in live.values() for s in shards)
        return live if owned == list(range(SHARD_COUNT)) else None

    nc = await nats.connect(nats_url, name="sm-bench-watch", **natsauth.role_credentials("dev"), connect_timeout=5, max_reconnect_attempts=0)
    try:
        await nc.subscribe("sm.hb.*", cb=on_beat)
        deadline = time.monotonic() + timeout_s
        stable_since: float | None = None
        while time.monotonic() < deadline:
            live = covered()
            # Shards move while workers join: accept coverage only once it held for a heartbeat interval.
            stable_since = (stable_since or time.monotonic()) if live else None
            if live and stable_since is not None and time.monotonic() - stable_since >= HEARTBEAT_INTERVAL_S:
                return live
            await asyncio.sleep(0.05)
        seen = {wid: len(shards) for wid, (shards, _) in latest.items()}
        raise StackError(f"shards not all covered within {timeout_s:.0f}s; shards per worker seen: {seen}")
    finally:
        await nc.close()


def wait_shards_covered(nats_url: str, *, workers: set[str] | None, timeout_s: float) -> dict[str, list[int]]:
    return asyncio.run(_wait_covered(nats_url, workers=workers, timeout_s=timeout_s))


def _check_alive(processes: list[procs.ManagedProcess]) -> None:
    for proc in processes:
        if not proc.alive():
            code = proc.popen.returncode if proc.popen else "?"
            raise StackError(f"{proc.name} exited with status {code}{_log_tail(proc)}")


def _log_tail(proc: procs.ManagedProcess, lines: int = 15) -> str:
    if proc.log_path is None or not proc.log_path.exists():
        return ""
    tail = proc.log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {proc.log_path}:\n  " + "\n  ".join(tail) if tail else ""


# ---- the stacks ----------------------------------------------------------------------------------


class ProcessGroup:
    """Processes started in order, stopped in reverse; stop() is safe to call at any point."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[procs.ManagedProcess] = []

    def launch(self, proc: procs.ManagedProcess) -> procs.ManagedProcess:
        proc.start()
        self.started.append(proc)
        return proc

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def stop(self, timeout_s: float = 10.0) -> list[str]:
        """SIGTERM the services all at once (their drains overlap), then the servers they need.

        Returns a note for every process that was slow to exit or had to be killed.
        """
        services = [p for p in self.started if p.name not in _SERVERS]
        servers = [p for p in self.started if p.name in _SERVERS]
        notes: list[str] = []
        for group in (services, servers):
            began = time.monotonic()
            for proc in group:
                proc.signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
                proc.signal(signal.SIGTERM)
            for proc in reversed(group):
                was_alive = proc.alive()
                exited = proc.wait(max(0.0, timeout_s - (time.monotonic() - began))) is not None
                proc.stop(timeout=1.0)  # SIGKILL if still running; closes the log file either way
                took = time.monotonic() - began
                if was_alive and (not exited or took > _SLOW_EXIT_S):
                    notes.append(f"{proc.name} {'was killed after' if not exited else 'took'} {took:.1f} s to exit after SIGTERM")
        self.started.clear()
        return notes


class SystemStack(ProcessGroup):
    """nats-server, redis-server, a supervisor, W workers and G gateways."""

    def __init__(self, workdir: Path, *, workers: int, gateways: int, log_level: str, jwt_secret: str) -> None:
        super().__init__(workdir)
        self.worker_count = workers
        self.gateway_count = gateways
        self.log_level = log_level
        self.jwt_secret = jwt_secret

    def start(self, timeout_s: float = 60.0) -> Target:
        nats_port, redis_port = procs.free_port(), procs.free_port()
        nats = self.launch(procs.nats_server(nats_port, self.workdir / "nats", log_path=self.log("nats")))
        redis = self.launch(procs.redis_server(redis_port, self.workdir / "redis", log_path=self.log("redis")))
        nats.wait_for_port(nats_port)
        redis.wait_for_port(redis_port)
        nats_url = f"nats://127.0.0.1:{nats_port}"
        env = {
            "NATS_URL": nats_url,
            "DB_HOST": "127.0.0.1",
            "DB_PORT": str(redis_port),
            "JWT_SECRET": self.jwt_secret,
            "LOG_LEVEL": self.log_level,
            "SHARD_COUNT": str(SHARD_COUNT),
            "HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL_S),
            "HEARTBEAT_MISSES": str(HEARTBEAT_MISSES),
            "HOST": "127.0.0.1",
            "DRAIN_TIMEOUT": str(DRAIN_TIMEOUT_S),
        }
        supervisor = self.launch(procs.service("supervisor", "supervisor", {**env, "SUPERVISOR_ID": "bench-supervisor"}, log_path=self.log("supervisor")))
        worker_ids = [f"bench-w{i}" for i in range(1, self.worker_count + 1)]
        workers = [self.launch(procs.service("worker", wid, {**env, "WORKER_ID": wid}, log_path=self.log(wid))) for wid in worker_ids]
        gateway_ports = [procs.free_port() for _ in range(self.gateway_count)]
        gateways = [
            self.launch(procs.service("gateway", f"gateway-{i}", {**env, "PORT": str(port)}, log_path=self.log(f"gateway-{i}")))
            for i, port in enumerate(gateway_ports, start=1)
        ]
        services = [supervisor, *workers, *gateways]
        deadline = time.monotonic() + timeout_s
        for port in gateway_ports:
            wait_http_ready("127.0.0.1", port, timeout_s=max(1.0, deadline - time.monotonic()), alive=services)
        wait_shards_covered(nats_url, workers=set(worker_ids), timeout_s=max(1.0, deadline - time.monotonic()))
        _check_alive(services)
        roles = {
            "gateway": [g.pid for g in gateways],
            "worker": [w.pid for w in workers],
            "nats": [nats.pid],
            "redis": [redis.pid],
            "supervisor": [supervisor.pid],
        }
        return Target("system", "127.0.0.1", gateway_ports, roles, nats_url=nats_url, redis_port=redis_port)


class BaselineStack(ProcessGroup):
    """Its own redis-server and the single-process baseline app."""

    def __init__(self, workdir: Path, *, jwt_secret: str) -> None:
        super().__init__(workdir / "baseline")
        self.jwt_secret = jwt_secret

    def start(self, timeout_s: float = 30.0) -> Target:
        redis_port, http_port = procs.free_port(), procs.free_port()
        redis = self.launch(procs.redis_server(redis_port, self.workdir / "redis", log_path=self.log("redis")))
        redis.wait_for_port(redis_port)
        app = self.launch(
            procs.ManagedProcess(
                "baseline",
                [sys.executable, str(BASELINE_APP), "--port", str(http_port), "--redis-port", str(redis_port)],
                env={**os.environ, "JWT_SECRET": self.jwt_secret},
                log_path=self.log("baseline"),
            )
        )
        wait_http_ready("127.0.0.1", http_port, timeout_s=timeout_s, alive=[app])
        return Target("baseline", "127.0.0.1", [http_port], {"gateway": [app.pid], "redis": [redis.pid]}, redis_port=redis_port)
