"""Failover benchmark: kill a worker under load, again and again, and measure what clients see.

    .venv/bin/python bench/failover.py            # 10 rounds, 4 workers
    .venv/bin/python bench/failover.py --rounds 20 --workers 4 --sessions 400

Each round: SIGKILL a random worker while clients run context.incr (each with an
Idempotency-Key, retried until acknowledged), then time, for every session the victim owned,
how long after the kill a GET through the gateway first answers. A replacement worker then
joins (a graceful handoff) before the next round. At the end every session's counter is
compared with the increments clients saw acknowledged.

With ``--whatsapp N`` (default 100) N sessions are also paired WORKING on the simulated engine
first; each round then times how long after the kill every WhatsApp connection the victim held is
connected again on its new owner (the moment the new device announces itself on the simulated
network), with no new pairing.

Prints recovery p50/p99/max, client-visible failures, acknowledged writes lost and shards
moved per kill (and whether only the victim's moved). Results also go to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import nats

from sessionmgr.common import natsauth, procs, subjects
from sessionmgr.common.hashing import shard_for
from sessionmgr.common.models import ShardMap, heartbeat_decoder, shard_map_decoder
from sessionmgr.gateway.auth import mint_token

JWT_SECRET = "bench-failover-secret-0123456789abcdef"
SHARDS = 64


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def write_results(name: str, records: list[dict]) -> Path:
    """One JSON line per record in bench/results/<name>-<timestamp>.jsonl, for comparing runs."""
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


class Cluster:
    def __init__(self, root: Path, workers: int, heartbeat_interval: float, heartbeat_misses: int) -> None:
        self.root = root
        self.nats_port, self.redis_port, self.http_port = procs.free_port(), procs.free_port(), procs.free_port()
        self.env = {
            "NATS_URL": f"nats://127.0.0.1:{self.nats_port}",
            "DB_HOST": "127.0.0.1",
            "DB_PORT": str(self.redis_port),
            "PORT": str(self.http_port),
            "HOST": "127.0.0.1",
            "JWT_SECRET": JWT_SECRET,
            "HEARTBEAT_INTERVAL": str(heartbeat_interval),
            "HEARTBEAT_MISSES": str(heartbeat_misses),
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
            "LOG_FORMAT": "json",
            # One user ("bench") drives all the load: per-user rate limits would measure themselves.
            "RATE_LIMIT_PER_MINUTE": "0",
        }
        self.servers = [
            procs.nats_server(self.nats_port, root / "nats", log_path=root / "nats.log"),
            procs.redis_server(self.redis_port, root / "redis", log_path=root / "redis.log"),
        ]
        self.supervisor = procs.service("supervisor", "supervisor", {**self.env, "SUPERVISOR_ID": "sup-1"}, log_path=root / "supervisor.log")
        self.gateway = procs.service("gateway", "gateway", self.env, log_path=root / "gateway.log")
        self.workers: dict[str, procs.ManagedProcess] = {}
        self._initial_workers = workers
        self._counter = 0

    def start(self) -> None:
        self.servers[0].start().wait_for_port(self.nats_port)
        self.servers[1].start().wait_for_port(self.redis_port)
        self.supervisor.start()
        for _ in range(self._initial_workers):
            self.add_worker()
        self.gateway.start().wait_for_port(self.http_port)

    def add_worker(self) -> str:
        self._counter += 1
        name = f"worker-{self._counter}"
        self.workers[name] = procs.service("worker", name, {**self.env, "WORKER_ID": name}, log_path=self.root / f"{name}.log").start()
        return name

    def stop(self) -> None:
        for proc in [self.gateway, self.supervisor, *self.workers.values(), *reversed(self.servers)]:
            proc.stop()


class Coverage:
    """Follows heartbeats: which live worker serves which shards."""

    def __init__(self, failure_timeout: float) -> None:
        self.seen: dict[str, tuple[list[int], float]] = {}
        self.changed = asyncio.Event()
        self._failure_timeout = failure_timeout

    async def on_beat(self, msg) -> None:  # type: ignore[no-untyped-def]
        beat = heartbeat_decoder.decode(msg.data)
        self.seen[beat.worker_id] = (beat.shards, time.monotonic())
        self.changed.set()

    async def wait_covered(self, workers: set[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            live = {w: s for w, (s, t) in self.seen.items() if now - t <= self._failure_timeout and w in workers}
            if set(live) == workers and sorted(s for shards in live.values() for s in shards) == list(range(SHARDS)):
                return
            if now > deadline:
                raise TimeoutError("shards not covered")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 0.5)
            except TimeoutError:
                pass


class Load:
    def __init__(self, client: httpx.AsyncClient, sessions: list[str], clients: int) -> None:
        self.client, self.sessions, self.clients = client, sessions, clients
        self.acked: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()  # client-visible: non-200 answers and transport errors
        self.stop = asyncio.Event()

    async def run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.clients)))

    async def _client(self) -> None:
        while not self.stop.is_set():
            sid = random.choice(self.sessions)
            key = uuid.uuid4().hex
            while True:  # a careful client: same key until acknowledged
                try:
                    r = await self.client.post(
                        f"/sessions/{sid}/request",
                        content=b'{"action":"context.incr","payload":{"key":"n"}}',
                        headers={"Idempotency-Key": key, "Content-Type": "application/json"},
                    )
                except httpx.HTTPError as exc:
                    self.failures[type(exc).__name__] += 1
                    continue
                if r.status_code == 200:
                    self.acked[sid] += 1
                    break
                self.failures[str(r.status_code)] += 1


class DeviceClaims:
    """A device that connects announces itself on ``sm.sim.phone.<number>``: when each did last."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    async def on_msg(self, msg) -> None:  # type: ignore[no-untyped-def]
        if b'"type":"claim"' in msg.data:
            self.last[msg.subject.rsplit(".", 1)[1]] = time.monotonic()

    async def time_reconnect(self, phones: list[str], killed_at: float, timeout: float = 20.0) -> tuple[float, int]:
        """(seconds until every phone's device connected again after ``killed_at``, how many never did)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.last.get(p, 0.0) > killed_at for p in phones):
                break
            await asyncio.sleep(0.01)
        back = [self.last[p] - killed_at for p in phones if self.last.get(p, 0.0) > killed_at]
        return (max(back) if back else 0.0), len(phones) - len(back)


async def pair_whatsapp(nc, nats_url: str, count: int) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """``count`` sessions paired WORKING on the simulated engine: session id -> phone number."""
    from whatsapp import pair_all, phone_number  # the WhatsApp benchmark's pairing, over NATS

    ids = [f"wa-{uuid.uuid4().hex[:16]}" for _ in range(count)]
    for sid in ids:
        await nc.request(f"sessions.{sid}.session.create", b'{"user_id": "bench-wa"}', timeout=5)
    pairing = await pair_all(nats_url, ids, 32, 10.0)
    if pairing.failures:
        print(f"pairing failures: {pairing.failures}")
    return {sid: phone_number(ids.index(sid)) for sid in pairing.working}


async def read_map(nc) -> ShardMap:  # type: ignore[no-untyped-def]
    kv = await nc.jetstream().key_value(subjects.SHARD_MAP_BUCKET)
    return shard_map_decoder.decode((await kv.get(subjects.SHARD_MAP_KEY)).value)


async def time_recovery(nc, sessions: list[str], killed_at: float) -> float:  # type: ignore[no-untyped-def]
    """Seconds from the kill until every session's owner answers again.

    Probed over NATS (``sessions.<sid>.session.get``, retried every 20 ms on no-responders or
    timeout), not through the bench's own HTTP client: on 2 shared cores that client's queueing
    would be measured instead of the failover. Clients through the gateway see this plus at most
    one retry backoff (<= 100 ms); their failures are counted separately.
    """

    async def one(sid: str) -> float:
        while True:
            try:
                msg = await nc.request(f"sessions.{sid}.session.get", b"", timeout=0.25)
                if not (msg.headers or {}).get("Nats-Service-Error-Code"):
                    return time.monotonic() - killed_at
            except Exception:  # noqa: BLE001 - no responders or timeout: not back yet
                pass
            await asyncio.sleep(0.02)

    return max(await asyncio.gather(*(one(s) for s in sessions)))


async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="sm-failover-"))
    print(f"logs in {root}")
    cluster = Cluster(root, args.workers, args.heartbeat_interval, args.heartbeat_misses)
    failure_timeout = args.heartbeat_interval * args.heartbeat_misses
    rows = []
    try:
        cluster.start()
        nc = await nats.connect(cluster.env["NATS_URL"], **natsauth.role_credentials("dev"))
        coverage = Coverage(failure_timeout)
        await nc.subscribe(f"{subjects.HEARTBEAT_PREFIX}.*", cb=coverage.on_beat)
        await coverage.wait_covered(set(cluster.workers))
        claims = DeviceClaims()
        await nc.subscribe("sm.sim.phone.*", cb=claims.on_msg, pending_msgs_limit=1_000_000)
        devices = await pair_whatsapp(nc, cluster.env["NATS_URL"], args.whatsapp) if args.whatsapp else {}
        if devices:
            print(f"{len(devices)} WhatsApp sessions WORKING on the simulated engine")
        token = mint_token(JWT_SECRET, "bench", ttl_s=3600)
        limits = httpx.Limits(max_connections=args.clients + len(range(args.sessions)) + 10)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cluster.http_port}", headers={"Authorization": f"Bearer {token}"}, timeout=30, limits=limits) as client:
            sessions = []
            for _ in range(args.sessions):
                r = await client.post("/sessions", json={})
                r.raise_for_status()
                sessions.append(r.json()["session_id"])
            load = Load(client, sessions, args.clients)
            load_task = asyncio.create_task(load.run())
            await asyncio.sleep(1.0)  # let the load reach steady state before the first kill
            for round_no in range(1, args.rounds + 1):
                before = await read_map(nc)
                victim = random.choice(sorted(cluster.workers))
                victim_shards = {i for i, e in enumerate(before.shards) if e.owner == victim}
                victim_sessions = [s for s in sessions if shard_for(s, SHARDS) in victim_shards]
                failures_before = sum(load.failures.values())
                killed_at = time.monotonic()
                cluster.workers.pop(victim).kill()
                recovery = await time_recovery(nc, victim_sessions, killed_at) if victim_sessions else 0.0
                victim_phones = [phone for sid, phone in devices.items() if shard_for(sid, SHARDS) in victim_shards]
                reconnect, not_back = await claims.time_reconnect(victim_phones, killed_at) if victim_phones else (0.0, 0)
                await coverage.wait_covered(set(cluster.workers))
                after = await read_map(nc)
                moved = {i for i, (a, b) in enumerate(zip(before.shards, after.shards, strict=True)) if a.owner != b.owner}
                row = {
                    "round": round_no,
                    "victim_sessions": len(victim_sessions),
                    "recovery_s": round(recovery, 3),
                    "shards_moved": len(moved),
                    "only_victims_shards": moved == victim_shards,
                    "client_failures": sum(load.failures.values()) - failures_before,
                    "whatsapp_connections": len(victim_phones),
                    "whatsapp_reconnect_s": round(reconnect, 3),
                    "whatsapp_not_reconnected": not_back,
                }
                rows.append(row)
                print(f"round {round_no:>2}: {len(victim_sessions):>4} sessions back in {recovery * 1000:7.0f} ms; "
                      f"{len(moved)} shards moved (only the victim's: {moved == victim_shards}); "
                      f"client-visible failures {row['client_failures']}; "
                      f"{len(victim_phones)} WhatsApp connections back in {reconnect * 1000:.0f} ms ({not_back} not)", flush=True)
                cluster.add_worker()  # a replacement joins: a graceful handoff under load
                await coverage.wait_covered(set(cluster.workers))
            load.stop.set()
            await load_task
            lost = 0
            for sid in sessions:
                r = await client.get(f"/sessions/{sid}")
                stored = r.json()["context"].get("n", 0)
                lost += max(0, load.acked[sid] - stored)
                if stored != load.acked[sid]:
                    print(f"MISMATCH {sid}: stored {stored}, acknowledged {load.acked[sid]}")
        await nc.close()
        recoveries = [r["recovery_s"] for r in rows]
        reconnects = [r["whatsapp_reconnect_s"] for r in rows if r["whatsapp_connections"]]
        summary = {
            "rounds": len(rows),
            "workers": args.workers,
            "heartbeat_interval_s": args.heartbeat_interval,
            "heartbeat_misses": args.heartbeat_misses,
            "recovery_p50_s": percentile(recoveries, 0.5),
            "recovery_p99_s": percentile(recoveries, 0.99),
            "recovery_max_s": max(recoveries),
            "recovery_mean_s": round(statistics.mean(recoveries), 3),
            "acknowledged_increments": sum(load.acked.values()),
            "acknowledged_lost": lost,
            "client_visible_failures": dict(load.failures),
            "shards_moved_per_kill": [r["shards_moved"] for r in rows],
            "only_victims_shards_moved": all(r["only_victims_shards"] for r in rows),
            "whatsapp_sessions": len(devices),
            "whatsapp_reconnect_p50_s": percentile(reconnects, 0.5) if reconnects else None,
            "whatsapp_reconnect_p99_s": percentile(reconnects, 0.99) if reconnects else None,
            "whatsapp_reconnect_max_s": max(reconnects) if reconnects else None,
            "whatsapp_not_reconnected": sum(r["whatsapp_not_reconnected"] for r in rows),
        }
        print()
        print(f"Failover over {len(rows)} kills ({args.workers} workers, heartbeat {args.heartbeat_interval}s x {args.heartbeat_misses}, {args.clients} clients):")
        print(f"  recovery  p50 {summary['recovery_p50_s'] * 1000:.0f} ms   p99 {summary['recovery_p99_s'] * 1000:.0f} ms   max {summary['recovery_max_s'] * 1000:.0f} ms")
        print(f"  acknowledged increments {summary['acknowledged_increments']}, lost {lost}")
        print(f"  client-visible failures {sum(load.failures.values())} {dict(load.failures) or ''}")
        print(f"  shards moved per kill {summary['shards_moved_per_kill']} (only the victim's: {summary['only_victims_shards_moved']})")
        if reconnects:
            print(f"  WhatsApp connections ({len(devices)} WORKING): reconnected on the new owner, no pairing: "
                  f"p50 {summary['whatsapp_reconnect_p50_s'] * 1000:.0f} ms   p99 {summary['whatsapp_reconnect_p99_s'] * 1000:.0f} ms   "
                  f"max {summary['whatsapp_reconnect_max_s'] * 1000:.0f} ms; not reconnected {summary['whatsapp_not_reconnected']}")
        write_results("failover", [{"kind": "failover_round", **row} for row in rows] + [{"kind": "failover_summary", **summary}])
        return 0 if lost == 0 else 1
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="worker kills (default 10)")
    parser.add_argument("--workers", type=int, default=4, help="workers kept running (default 4)")
    parser.add_argument("--sessions", type=int, default=400, help="sessions under load (default 400)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent incrementing clients (default 32)")
    parser.add_argument("--whatsapp", type=int, default=100, help="WhatsApp sessions paired WORKING before the kills (default 100; 0 = none)")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5, help="HEARTBEAT_INTERVAL (default 0.5)")
    parser.add_argument("--heartbeat-misses", type=int, default=3, help="HEARTBEAT_MISSES (default 3)")
    args = parser.parse_args()
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
