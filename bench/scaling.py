"""The scaling table: ``context.incr`` over processes (workers x gateways) and over pool sizes.

Each row starts a fresh system, so rows do not share warm caches or Redis contents. Pools of up
to 2,000 sessions are created through the API; larger ones straight over NATS (``session.create``
as an operator would send it), which is several times faster and what makes 100k sessions fit
in a run. The table's ``ms CPU/req`` columns are CPU milliseconds per completed request of each
role: the number to watch as sessions grow (throughput moves with whatever else the 2 cores run;
the cost per request should not move with the pool size).

On a 2-core machine more processes cannot add cores: the process rows show contention, not
scale-out.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from harness import run_children
from httpload import HttpSpec, build_request, fetch_all, http_child
from natsload import create_sessions, incr_spec, nats_child
from report import ResultsFile

from sessionmgr.common.ids import new_session_id
from stacks import StackError, SystemStack

INCR_BODY = b'{"action":"context.incr","payload":{"key":"n","by":1}}'
API_POOL_MAX = 2000
SESSIONS_PER_USER = 20


@dataclass(frozen=True)
class Shape:
    workers: int
    gateways: int
    sessions: int


def shapes(quick: bool) -> list[Shape]:
    processes = [Shape(w, g, 2000) for g in (1, 2) for w in (1, 2, 4)]
    sizes = [Shape(1, 1, n) for n in ((1_000, 10_000) if quick else (1_000, 10_000, 100_000))]
    return processes + sizes


@dataclass
class ScalingRow:
    shape: Shape
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_request: dict[str, float]
    pool_seconds: float
    direct_rps: float | None = None  # sessions.<sid>.context.incr over NATS, 64 in flight


def _pool(target: Any, secret: str, count: int, timeout_s: float) -> list[Any]:
    from run import PoolEntry, create_pool, user_tokens

    tokens = user_tokens(secret, count)
    if count <= API_POOL_MAX:
        return create_pool(target, tokens, count, timeout_s)
    users = [f"bench-user-{i:05d}" for i in range(len(tokens))]
    owners = [(new_session_id(), users[i % len(users)]) for i in range(count)]
    created = create_sessions(target.nats_url, owners, timeout_s=timeout_s)
    if created < count:
        raise StackError(f"only {created} of {count} sessions could be created over NATS")
    return [PoolEntry(sid, tokens[i % len(tokens)]) for i, (sid, _) in enumerate(owners)]


def _prime_users(target: Any, pool: list[Any], host: str, timeout_s: float) -> None:
    """One GET per user through every gateway before the measurement.

    A user's first request costs its gateway a JWT verification and a rate-limit batch from Redis;
    a running system has paid them long before. Pools made over NATS never went through a gateway,
    and with 5,000 users a 10 s window would otherwise measure mostly first requests.
    """
    first_per_user = list({e.token: e for e in pool}.values())
    requests = [build_request("GET", f"/sessions/{e.session_id}", host, e.token) for e in first_per_user]
    for address in target.addresses:
        replies = asyncio.run(fetch_all(*address, requests, concurrency=16, timeout_s=timeout_s))
        failed = [(status, body[:200]) for status, body in replies if status != 200]
        if failed:
            raise StackError(f"{len(failed)} of {len(requests)} priming requests failed, the first: {failed[0]}")


def measure(shape: Shape, args: argparse.Namespace, secret: str, workdir: Path) -> ScalingRow:
    import time

    from run import merge_outcomes

    stack = SystemStack(workdir, workers=shape.workers, gateways=shape.gateways, log_level=args.log_level, jwt_secret=secret)
    try:
        target = stack.start()
        began = time.monotonic()
        pool = _pool(target, secret, shape.sessions, args.timeout)
        pool_seconds = time.monotonic() - began
        host = f"{target.host}:{target.ports[0]}"
        _prime_users(target, pool, host, args.timeout)
        requests = [build_request("POST", f"/sessions/{e.session_id}/request", host, e.token, INCR_BODY) for e in pool]
        spec = HttpSpec(targets=target.addresses, requests=requests, connections=args.connections, timeout_s=args.timeout, seed=1)
        results, cpu = run_children(http_child, [spec], warmup_s=max(args.warmup, 1.0), duration_s=args.duration, roles=target.roles)
        outcome = merge_outcomes(results, args.duration)
        done = max(1, outcome.requests)
        per_request = {role: round(1000 * cpu.get(role, 0.0) / done, 3) for role in ("gateway", "worker", "nats", "redis")}
        per_request["system"] = round(sum(per_request.values()), 3)
        direct_rps = None
        if shape.gateways == 1 and shape.sessions <= API_POOL_MAX:
            # A NATS-only deployment has no gateway: on the same cores it would run more workers.
            nats_spec = incr_spec(target.nats_url, [e.session_id for e in pool], 64, timeout_s=args.timeout, client=args.nats_generator)
            raw, _ = run_children(nats_child, [nats_spec], warmup_s=max(args.warmup, 1.0), duration_s=args.duration, roles=target.roles)
            direct_rps = merge_outcomes(raw, args.duration).rps
        return ScalingRow(shape, outcome.rps, outcome.p50_ms, outcome.p99_ms, outcome.errors, per_request, round(pool_seconds, 1), direct_rps)
    finally:
        stack.stop()


def print_scaling(rows: list[ScalingRow], out: TextIO) -> None:
    header = ["workers", "gateways", "sessions", "req/s", "p50 ms", "p99 ms", "errors", "gateway", "worker", "nats", "redis", "system", "NATS req/s"]
    cells = [
        [
            str(r.shape.workers), str(r.shape.gateways), f"{r.shape.sessions:,}", f"{r.rps:,.0f}", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", str(r.errors),
            *(f"{r.cpu_ms_per_request[k]:.3f}" for k in ("gateway", "worker", "nats", "redis", "system")),
            "-" if r.direct_rps is None else f"{r.direct_rps:,.0f}",
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    out.write(
        "\nscaling: context.incr, a fresh system per row (gateway..system: ms of CPU per request, by role; "
        "NATS req/s: the same action straight over NATS, 64 in flight, same system)\n"
    )
    out.write("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + "\n")
    out.flush()


def run_scaling(args: argparse.Namespace, secret: str, results: ResultsFile, out: TextIO) -> list[ScalingRow]:
    rows = []
    for shape in shapes(args.quick):
        workdir = Path(tempfile.mkdtemp(prefix="sm-bench-scaling-"))
        out.write(f"  scaling: {shape.workers} worker(s), {shape.gateways} gateway(s), {shape.sessions:,} sessions ...")
        out.flush()
        try:
            row = measure(shape, args, secret, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        out.write(f" {row.rps:,.0f} req/s, {row.cpu_ms_per_request['system']:.2f} ms CPU/req (pool made in {row.pool_seconds:g} s)\n")
        results.write(
            "scaling",
            {
                "workers": shape.workers, "gateways": shape.gateways, "sessions": shape.sessions, "rps": round(row.rps, 1),
                "p50_ms": round(row.p50_ms, 3), "p99_ms": round(row.p99_ms, 3), "errors": row.errors, "cpu_ms_per_request": row.cpu_ms_per_request,
                "connections": args.connections, "duration_s": args.duration, "direct_nats_rps": None if row.direct_rps is None else round(row.direct_rps, 1),
            },
        )  # fmt: skip
        rows.append(row)
    print_scaling(rows, out)
    return rows
