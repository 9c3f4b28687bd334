"""Outage benchmark: stop Redis under load for a while, start it again, and count what happened.

    .venv/bin/python bench/outage.py                  # Redis away for 10 s under 32 clients
    .venv/bin/python bench/outage.py --outage 5 --clients 16

Clients run context.incr with Idempotency-Keys. While Redis is away the workers queue changes in
JetStream and answer 202; afterwards the queue is replayed. Prints requests acknowledged before,
during and after, requests queued, applied after recovery, lost (must be 0), time to drain the
queue, and error rates during and after. Results also go to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import nats

sys.path.insert(0, str(Path(__file__).parent))
from failover import JWT_SECRET, Cluster, Coverage, write_results  # noqa: E402

from sessionmgr.common import natsauth, procs, subjects  # noqa: E402
from sessionmgr.common.models import request_status_decoder  # noqa: E402
from sessionmgr.common.streams import request_status_bucket  # noqa: E402
from sessionmgr.gateway.auth import mint_token  # noqa: E402


class Load:
    def __init__(self, client: httpx.AsyncClient, sessions: list[str], clients: int) -> None:
        self.client, self.sessions, self.clients = client, sessions, clients
        self.phase = "before"
        self.answers: Counter[tuple[str, str]] = Counter()  # (phase, status)
        self.acked: Counter[str] = Counter()  # 200s per session
        self.queued: dict[str, str] = {}  # request_id -> session
        self.stop = asyncio.Event()

    async def run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.clients)))

    async def _client(self) -> None:
        while not self.stop.is_set():
            sid = random.choice(self.sessions)
            key = uuid.uuid4().hex
            while True:  # same key until the change is acknowledged (200) or durably queued (202)
                phase = self.phase
                try:
                    r = await self.client.post(
                        f"/sessions/{sid}/request",
                        content=b'{"action":"context.incr","payload":{"key":"n"}}',
                        headers={"Idempotency-Key": key, "Content-Type": "application/json"},
                    )
                except httpx.HTTPError as exc:
                    self.answers[(phase, type(exc).__name__)] += 1
                    continue
                self.answers[(phase, str(r.status_code))] += 1
                if r.status_code == 200:
                    self.acked[sid] += 1
                    break
                if r.status_code == 202:
                    self.queued[r.json()["request_id"]] = sid
                    break
                await asyncio.sleep(0.05)


async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="sm-outage-"))
    cluster = Cluster(root, args.workers, 0.5, 3)
    try:
        cluster.start()
        nc = await nats.connect(cluster.env["NATS_URL"], **natsauth.role_credentials("dev"))
        coverage = Coverage(1.5)
        await nc.subscribe(f"{subjects.HEARTBEAT_PREFIX}.*", cb=coverage.on_beat)
        await coverage.wait_covered(set(cluster.workers))
        token = mint_token(JWT_SECRET, "bench", ttl_s=3600)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cluster.http_port}", headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            sessions = [(await client.post("/sessions", json={})).json()["session_id"] for _ in range(args.sessions)]
            load = Load(client, sessions, args.clients)
            task = asyncio.create_task(load.run())
            await asyncio.sleep(args.before)
            load.phase = "during"
            cluster.servers[1].kill()
            await asyncio.sleep(args.outage)
            cluster.servers[1] = procs.redis_server(cluster.redis_port, root / "redis", log_path=root / "redis.log")
            cluster.servers[1].start().wait_for_port(cluster.redis_port)
            restarted = time.time()
            load.phase = "after"
            await asyncio.sleep(args.after)
            load.stop.set()
            await task

            # Wait until every queued request has an outcome; time the drain.
            kv = await request_status_bucket(nc.jetstream())
            pending = set(load.queued)
            applied: Counter[str] = Counter()
            rejected = 0
            last_applied = restarted
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline:
                for rid in list(pending):
                    entry = await kv.get(rid)
                    status = request_status_decoder.decode(entry.value)
                    if status.status == "applied":
                        applied[load.queued[rid]] += 1
                        pending.discard(rid)
                        if status.applied_at is not None:
                            last_applied = max(last_applied, status.applied_at.timestamp())
                    elif status.status == "rejected":
                        rejected += 1
                        pending.discard(rid)
                if pending:
                    await asyncio.sleep(0.1)
            drained_s = last_applied - restarted  # Redis back -> last queued change applied
            lost = 0
            for sid in sessions:
                stored = (await client.get(f"/sessions/{sid}")).json()["context"].get("n", 0)
                expected = load.acked[sid] + applied[sid]
                lost += max(0, expected - stored)
                if stored != expected:
                    print(f"MISMATCH {sid}: stored {stored}, acknowledged or applied {expected}")
        await nc.close()

        def count(phase: str, status: str | None = None) -> int:
            return sum(n for (p, s), n in load.answers.items() if p == phase and (status is None or s == status))

        summary = {
            "outage_s": args.outage,
            "clients": args.clients,
            "acknowledged_200": {p: count(p, "200") for p in ("before", "during", "after")},
            "queued_202": len(load.queued),
            "applied_after_recovery": sum(applied.values()),
            "rejected": rejected,
            "still_pending": len(pending),
            "lost": lost,
            "queue_drained_s": round(drained_s, 2),
            "error_answers": {p: {s: n for (ph, s), n in load.answers.items() if ph == p and s not in ("200", "202")} for p in ("before", "during", "after")},
            "error_rate": {p: round(1 - (count(p, "200") + count(p, "202")) / max(1, count(p)), 4) for p in ("before", "during", "after")},
        }
        print(f"Redis outage of {args.outage}s under {args.clients} clients ({args.workers} workers):")
        print(f"  acknowledged (200): before {summary['acknowledged_200']['before']}, during {summary['acknowledged_200']['during']}, after {summary['acknowledged_200']['after']}")
        print(f"  queued (202): {summary['queued_202']}; applied after recovery: {summary['applied_after_recovery']}; rejected: {rejected}; still pending: {len(pending)}")
        print(f"  lost: {lost}")
        print(f"  queue drained {summary['queue_drained_s']} s after Redis came back")
        print(f"  error rate: before {summary['error_rate']['before']:.2%}, during {summary['error_rate']['during']:.2%}, after {summary['error_rate']['after']:.2%} {summary['error_answers']}")
        write_results("outage", [{"kind": "redis_outage", **summary}])
        return 0 if lost == 0 and not pending else 1
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage", type=float, default=10.0, help="seconds Redis stays down (default 10)")
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before the outage")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of load after Redis is back")
    parser.add_argument("--workers", type=int, default=2, help="workers (default 2)")
    parser.add_argument("--sessions", type=int, default=100, help="sessions under load (default 100)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
