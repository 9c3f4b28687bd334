"""Benchmark the Session Manager over its REST API (and optionally over NATS and against a baseline).

By default it starts its own nats-server, redis-server, supervisor, workers and gateways on free
127.0.0.1 ports, waits until the gateway is ready and every shard is served, pre-creates a pool
of sessions, then runs each scenario for a fixed time with N keep-alive connections and prints
requests/s, latency percentiles, errors and the CPU seconds every process used. Every result
is also appended as a JSON line to bench/results/<timestamp>.jsonl.

    .venv/bin/python bench/run.py --quick
    .venv/bin/python bench/run.py --baseline --nats-direct
    .venv/bin/python bench/run.py --url http://127.0.0.1:3000 --jwt-secret "$JWT_SECRET"
    .venv/bin/python bench/run.py --scaling        # 1/2/4 workers x 1/2 gateways, 1k -> 100k sessions
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import statistics
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from sessionmgr.common import procs
from sessionmgr.gateway.auth import mint_token

# bench/ is the script's directory, so its modules import by their bare names.
from harness import HarnessError, run_children, wait_until_quiet
from httpload import HttpSpec, build_request, fetch_all, http_child
from natsload import CLIENTS as NATS_CLIENTS
from natsload import generator_label, incr_spec, nats_child
from report import LoadOutcome, ResultsFile, ScenarioResult, print_table, summarize_latencies, with_other
from scaling import run_scaling
from send_text import prepare_working, send_requests
from stacks import BaselineStack, StackError, SystemStack, Target, wait_http_ready, wait_shards_covered
from wrkload import WrkError, run_wrk_load, wrk_binary

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SESSIONS_PER_USER = 20  # the pool is spread over users so the per-user index and token cache see variety
# One connection: each target runs this many slices, alternating with the other target, so a
# drift of the machine's speed (tens of percent over a minute here) hits both alike.
UNLOADED_ROUNDS = 4
UNLOADED_SLICE_S = 2.0
INCR_BODY = b'{"action":"context.incr","payload":{"key":"n","by":1}}'
CREATE_BODY = b'{"metadata":{}}'
NATS_IN_FLIGHT = (64, 256)
# The direct path at 64 in flight alternates with the gateway path in this many pairs of slices.
DIRECT_ROUNDS = 3
DIRECT_SLICE_MIN_S = 2.0


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "scenarios: POST /sessions; GET /sessions/{id} and POST /sessions/{id}/request (context.incr)\n"
            "over the pre-created pool; a full run adds a mix of 80% GET / 20% incr. Every run ends with\n"
            "context.incr on 1 connection for 2 s (the unloaded latency).\n\n"
            "exit status: 0 done; 1 the run failed (a process did not start, the load generator failed,\n"
            "or a scenario completed no request at all); 2 bad arguments; 130 interrupted."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="a ~30 s check: 3 s per scenario, fewer scenarios, 500 sessions")
    parser.add_argument("--duration", type=float, help="seconds each scenario is measured (default 10, --quick 3)")
    parser.add_argument("--warmup", type=float, help="seconds of load before each measurement, not counted (default 1, --quick 0.5)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent keep-alive connections (default 64)")
    parser.add_argument("--sessions", type=int, help="sessions pre-created for GET and incr (default 2000, --quick 500)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes to start (default 1)")
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes to start, each on its own port (default 1)")
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="LOG_LEVEL of the started services (default INFO, as deployed)"
    )
    parser.add_argument("--url", help="load an already running gateway at this URL instead of starting a system")
    parser.add_argument("--jwt-secret", help="JWT_SECRET of the system given by --url (required with it); tokens are minted with it")
    parser.add_argument("--nats-url", help="NATS of the system given by --url: enables the shard-coverage wait and --nats-direct")
    parser.add_argument("--baseline", action="store_true", help="also run every scenario against bench/baseline_app.py and print system/baseline ratios")
    parser.add_argument("--nats-direct", action="store_true", help="also drive sessions.<sid>.context.incr over NATS with 64 and 256 requests in flight")
    parser.add_argument("--generator", default="auto", choices=("auto", "wrk", "python"), help="load generator: wrk if installed (auto), or the Python one")
    parser.add_argument(
        "--nats-generator", default="lean", choices=NATS_CLIENTS,
        help="client of --nats-direct's generator: lean (bench/natsproto.py, default) or nats-py (~4x its CPU per request)",
    )  # fmt: skip
    parser.add_argument("--gen-procs", type=int, default=1, help="processes of the Python load generator (default 1)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a request counts as a transport error (default 10)")
    parser.add_argument(
        "--send-text-sessions", type=int, default=100,
        help="sessions brought to WORKING for the message.send_text row (default 100, 0 = no row); skipped with a note if the action is unknown",
    )  # fmt: skip
    parser.add_argument(
        "--scaling", action="store_true",
        help="instead of the scenarios: the scaling table (context.incr with 1/2/4 workers x 1/2 gateways, then 1k/10k/100k sessions; --quick: up to 10k)",
    )  # fmt: skip
    parser.add_argument(
        "--only", action="append", choices=SCENARIO_KEYS, metavar="SCENARIO",
        help=f"run only this REST scenario (repeatable; one of {', '.join(SCENARIO_KEYS)}), e.g. to profile one path",
    )  # fmt: skip
    parser.add_argument("--keep-logs", action="store_true", help="keep the scratch directory with the services' logs and data, and print its path")
    args = parser.parse_args(argv)
    args.duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    args.sessions = args.sessions if args.sessions is not None else (500 if args.quick else 2000)
    _validate(parser, args)
    return args


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    checks = [
        (args.duration > 0, "--duration must be positive"),
        (args.warmup >= 0, "--warmup must not be negative"),
        (1 <= args.connections <= 10_000, "--connections must be between 1 and 10000"),
        (1 <= args.sessions <= 1_000_000, "--sessions must be between 1 and 1000000"),
        (1 <= args.workers <= 64, "--workers must be between 1 and 64"),
        (1 <= args.gateways <= 16, "--gateways must be between 1 and 16"),
        (1 <= args.gen_procs <= 64, "--gen-procs must be between 1 and 64"),
        (0 <= args.send_text_sessions <= 10_000, "--send-text-sessions must be between 0 and 10000"),
        (not (args.scaling and args.url), "--scaling starts its own systems; it cannot use --url"),
        (args.timeout > 0, "--timeout must be positive"),
        (not args.url or bool(args.jwt_secret), "--url needs --jwt-secret (the running system's JWT_SECRET)"),
        (not args.jwt_secret or len(args.jwt_secret) >= 32, "--jwt-secret must be at least 32 characters"),
        (not args.nats_direct or not args.url or bool(args.nats_url), "--nats-direct with --url needs --nats-url"),
        (args.generator != "wrk" or wrk_binary() is not None, "--generator wrk: wrk is not installed"),
    ]
    if args.url:
        url = urlparse(args.url)
        checks.append((url.scheme == "http" and bool(url.hostname), "--url must look like http://HOST:PORT"))
    for ok, message in checks:
        if not ok:
            parser.error(message)


# ---- sessions and requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolEntry:
    session_id: str
    token: str


def user_tokens(secret: str, sessions: int) -> list[str]:
    users = max(1, sessions // SESSIONS_PER_USER)
    return [mint_token(secret, f"bench-user-{i:05d}") for i in range(users)]


def create_pool(target: Target, tokens: list[str], count: int, timeout_s: float) -> list[PoolEntry]:
    """Create ``count`` sessions through the API, round-robin over the users."""
    host, port = target.addresses[0]
    owners = [tokens[i % len(tokens)] for i in range(count)]
    requests = [build_request("POST", "/sessions", f"{host}:{port}", token, CREATE_BODY) for token in owners]
    replies = asyncio.run(fetch_all(host, port, requests, concurrency=16, timeout_s=timeout_s))
    pool = []
    for token, (status, body) in zip(owners, replies, strict=True):
        if status == 201:
            pool.append(PoolEntry(json.loads(body)["session_id"], token))
    if len(pool) < count:
        statuses = sorted({status for status, _ in replies if status != 201})
        raise StackError(f"only {len(pool)} of {count} sessions could be created on {target.name} (other statuses: {statuses})")
    return pool


RequestBuilder = Callable[[list[PoolEntry], list[str], str], list[bytes]]


def _creates(pool: list[PoolEntry], tokens: list[str], host: str) -> list[bytes]:
    return [build_request("POST", "/sessions", host, token, CREATE_BODY) for token in tokens]


def _gets(pool: list[PoolEntry], tokens: list[str], host: str) -> list[bytes]:
    return [build_request("GET", f"/sessions/{e.session_id}", host, e.token) for e in pool]


def _incrs(pool: list[PoolEntry], tokens: list[str], host: str) -> list[bytes]:
    return [build_request("POST", f"/sessions/{e.session_id}/request", host, e.token, INCR_BODY) for e in pool]


def _mixed(pool: list[PoolEntry], tokens: list[str], host: str) -> list[bytes]:
    # Picking uniformly from 4 GETs and 1 incr per session gives the 80/20 mix.
    return _gets(pool, tokens, host) * 4 + _incrs(pool, tokens, host)


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    connections: int
    duration_s: float
    build: RequestBuilder
    rounds: int = 1  # slices per target, alternating between targets; the result merges them


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    n, d = args.connections, args.duration
    every = [
        Scenario("create", "POST /sessions", n, d, _creates),
        Scenario("get", "GET /sessions/{id}", n, d, _gets),
        Scenario("incr", "POST .../request context.incr", n, d, _incrs),
        Scenario("mixed", "mix 80% GET / 20% incr", n, d, _mixed),
        Scenario("incr-unloaded", "context.incr unloaded", 1, UNLOADED_SLICE_S, _incrs, rounds=UNLOADED_ROUNDS),
    ]
    if args.only:
        return [s for s in every if s.key in args.only]
    return [s for s in every if not (args.quick and s.key == "mixed")]


SCENARIO_KEYS = ("create", "get", "incr", "mixed", "incr-unloaded")


@dataclass
class Context:
    """What every step of one run needs: the options, the generator in use, the results file, the output."""

    args: argparse.Namespace
    generator: str  # "wrk" or "python"
    results: ResultsFile
    out: TextIO


# ---- running load ------------------------------------------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def merge_errors(results: list[dict[str, Any]]) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    samples: dict[str, str] = {}
    for result in results:
        for kind, count in result.get("error_kinds", {}).items():
            kinds[kind] = kinds.get(kind, 0) + count
        for kind, sample in result.get("error_samples", {}).items():
            samples.setdefault(kind, sample)
    return {"error_kinds": kinds, "error_samples": samples} if kinds else {}


def merge_outcomes(results: list[dict[str, Any]], duration_s: float) -> LoadOutcome:
    latencies = array("d")
    for result in results:
        latencies.frombytes(result["latencies"])
    p50, p99, p999 = summarize_latencies(latencies.tolist())
    return LoadOutcome(
        requests=sum(r["ok"] for r in results),
        status_errors=sum(r["status_errors"] for r in results),
        transport_errors=sum(r["transport_errors"] for r in results),
        duration_s=duration_s,
        p50_ms=p50,
        p99_ms=p99,
        p999_ms=p999,
        loadgen_cpu_s=round(sum(r["cpu_s"] for r in results), 2),
    )


def run_http(
    target: Target, requests: list[bytes], connections: int, duration_s: float, ctx: Context
) -> tuple[LoadOutcome, dict[str, float], dict[str, Any]]:
    if ctx.generator == "wrk":
        return run_wrk_load(
            target.addresses, requests, connections=connections, warmup_s=ctx.args.warmup, duration_s=duration_s, timeout_s=ctx.args.timeout, roles=target.roles
        )
    lanes = _split(connections, min(ctx.args.gen_procs, connections))
    specs = [
        HttpSpec(targets=target.addresses, requests=requests, connections=lane, timeout_s=ctx.args.timeout, seed=index + 1)
        for index, lane in enumerate(lanes)
    ]
    results, cpu = run_children(http_child, specs, warmup_s=ctx.args.warmup, duration_s=duration_s, roles=target.roles)
    return merge_outcomes(results, duration_s), cpu, merge_errors(results)


def run_scenario(target: Target, scenario: Scenario, pool: list[PoolEntry], tokens: list[str], ctx: Context, kind: str | None = None) -> ScenarioResult:
    host_header = f"{target.host}:{target.ports[0]}"
    ctx.out.write(f"  {target.name}: {scenario.label} ({scenario.connections} conns, {scenario.duration_s:g} s) ...")
    ctx.out.flush()
    outcome, cpu, extra = run_http(target, scenario.build(pool, tokens, host_header), scenario.connections, scenario.duration_s, ctx)
    ctx.out.write(f" {outcome.rps:,.0f} req/s\n")
    result = ScenarioResult(
        target=target.name,
        scenario=scenario.key,
        label=scenario.label,
        connections=scenario.connections,
        generator=ctx.generator,
        outcome=outcome,
        cpu_s=with_other(cpu, outcome.loadgen_cpu_s),
        processes={role: len(pids) for role, pids in target.roles.items()},
        extra=extra,
    )
    ctx.results.write_scenario(result, kind=kind or ("slice" if scenario.rounds > 1 else "scenario"))
    _warn_if_generator_bound(result, ctx)
    return result


def _warn_if_generator_bound(result: ScenarioResult, ctx: Context) -> None:
    """A generator near a full core per process limits the numbers it reports."""
    procs_used = 1 if ctx.generator == "wrk" else min(ctx.args.gen_procs, result.connections)
    busy = result.outcome.loadgen_cpu_s / result.outcome.duration_s / procs_used
    if busy > 0.85:
        ctx.out.write(f"  warning: the load generator was {busy:.0%} busy during '{result.label}'; it may have limited the rate\n")


def _nats_direct_slice(target: Target, session_ids: list[str], in_flight: int, duration_s: float, ctx: Context) -> ScenarioResult:
    ctx.out.write(f"  nats-direct: context.incr ({in_flight} in flight, {duration_s:g} s) ...")
    ctx.out.flush()
    spec = incr_spec(target.nats_url, session_ids, in_flight, timeout_s=ctx.args.timeout, client=ctx.args.nats_generator)  # type: ignore[arg-type]
    raw, cpu = run_children(nats_child, [spec], warmup_s=ctx.args.warmup, duration_s=duration_s, roles=target.roles)
    outcome = merge_outcomes(raw, duration_s)
    ctx.out.write(f" {outcome.rps:,.0f} req/s\n")
    return ScenarioResult(
        target="nats-direct",
        scenario=f"nats-incr-{in_flight}",
        label="sessions.<sid>.context.incr",
        connections=in_flight,
        generator=generator_label(spec.client),
        outcome=outcome,
        cpu_s=with_other(cpu, outcome.loadgen_cpu_s),
        processes={role: len(pids) for role, pids in target.roles.items()},
        extra=merge_errors(raw),
    )


def run_nats_direct(target: Target, pool: list[PoolEntry], tokens: list[str], ctx: Context) -> tuple[list[ScenarioResult], list[float]]:
    """The direct path at 64 and 256 in flight; at 64 in alternating slices with the gateway path
    (context.incr, 64 connections), so their ratio compares runs seconds apart. Returns the
    results and the per-pair ratios (direct / gateway)."""
    assert target.nats_url is not None
    results = []
    session_ids = [e.session_id for e in pool]
    slice_s = max(DIRECT_SLICE_MIN_S, ctx.args.duration / DIRECT_ROUNDS)
    paired_gateway = Scenario("incr", "POST .../request context.incr (paired)", NATS_IN_FLIGHT[0], slice_s, _incrs)
    ratios: list[float] = []
    direct_slices: list[ScenarioResult] = []
    system_pids = [pid for pids in target.roles.values() for pid in pids]
    wait_until_quiet(system_pids)  # nothing a previous scenario left behind runs in the first slice
    for _ in range(DIRECT_ROUNDS):
        gateway = run_scenario(target, paired_gateway, pool, tokens, ctx, kind="slice")
        direct = _nats_direct_slice(target, session_ids, NATS_IN_FLIGHT[0], slice_s, ctx)
        ctx.results.write_scenario(direct, kind="slice")
        direct_slices.append(direct)
        if gateway.outcome.rps > 0:
            ratios.append(direct.outcome.rps / gateway.outcome.rps)
    merged = merge_rounds(direct_slices)
    ctx.results.write_scenario(merged)
    results.append(merged)
    for in_flight in NATS_IN_FLIGHT[1:]:
        result = _nats_direct_slice(target, session_ids, in_flight, ctx.args.duration, ctx)
        ctx.results.write_scenario(result)
        results.append(result)
    return results, ratios


def run_send_text(target: Target, pool: list[PoolEntry], ctx: Context) -> list[ScenarioResult]:
    """The message.send_text row: needs WORKING connections, so it is prepared first (or skipped)."""
    count = min(ctx.args.send_text_sessions, len(pool))
    if count == 0:
        return []
    ctx.out.write(f"  {target.name}: connecting {count} sessions (connection.start, simulate.scan) for message.send_text ...")
    ctx.out.flush()
    prepared = prepare_working(target.addresses[0], pool, count, timeout_s=max(30.0, ctx.args.timeout))
    ctx.out.write(f" {len(prepared.sessions)} WORKING\n")
    if prepared.note:
        ctx.out.write(f"  note: message.send_text: {prepared.note}\n")
        ctx.results.write("note", {"target": target.name, "scenario": "send_text", "note": prepared.note})
    if not prepared.sessions:
        return []
    label = "POST .../request message.send_text"
    ctx.out.write(f"  {target.name}: {label} ({ctx.args.connections} conns, {ctx.args.duration:g} s) ...")
    ctx.out.flush()
    requests = send_requests(prepared.sessions, f"{target.host}:{target.ports[0]}")
    outcome, cpu, extra = run_http(target, requests, ctx.args.connections, ctx.args.duration, ctx)
    ctx.out.write(f" {outcome.rps:,.0f} req/s\n")
    result = ScenarioResult(
        target=target.name,
        scenario="send_text",
        label=label,
        connections=ctx.args.connections,
        generator=ctx.generator,
        outcome=outcome,
        cpu_s=with_other(cpu, outcome.loadgen_cpu_s),
        processes={role: len(pids) for role, pids in target.roles.items()},
        extra={**extra, "working_sessions": len(prepared.sessions)},
    )
    ctx.results.write_scenario(result)
    print_table(f"{target.name}: message.send_text over {len(prepared.sessions)} WORKING sessions", [result], ctx.out)
    return [result]


# ---- reports ----------------------------------------------------------------------------------------


def print_direct_ratio(ratios: list[float], ctx: Context) -> None:
    if not ratios:
        return
    ratio = statistics.median(ratios)
    ctx.out.write(
        f"direct NATS context.incr at 64 in flight / through the gateway at 64 connections, in alternating slices: "
        f"{', '.join(f'{r:.2f}x' for r in ratios)}; median {ratio:.2f}x\n"
    )
    ctx.results.write("ratio", {"scenario": "nats-direct/incr", "connections": 64, "rps_ratio": round(ratio, 3), "by_slice": [round(r, 3) for r in ratios]})


def print_ratios(system: list[ScenarioResult], baseline: list[ScenarioResult], ctx: Context) -> None:
    by_key = {r.scenario: r for r in baseline}
    ctx.out.write("\nsystem / baseline\nscenario                        conns  req/s ratio  p50 ratio\n")
    for mine in system:
        theirs = by_key.get(mine.scenario)
        if theirs is None:
            continue
        rps = mine.outcome.rps / theirs.outcome.rps if theirs.outcome.rps else float("nan")
        p50 = mine.outcome.p50_ms / theirs.outcome.p50_ms if theirs.outcome.p50_ms else float("nan")
        ctx.out.write(f"{mine.label:<30}  {mine.connections:>5}  {rps:>10.2f}x  {p50:>8.2f}x\n")
        ctx.results.write("ratio", {"scenario": mine.scenario, "connections": mine.connections, "rps_ratio": round(rps, 3), "p50_ratio": round(p50, 3)})
    unloaded = [(m, by_key[m.scenario]) for m in system if m.connections == 1 and m.scenario in by_key]
    for mine, theirs in unloaded:
        ctx.out.write(
            f"unloaded p50 ({mine.label}, 1 connection): system {mine.outcome.p50_ms:.2f} ms, "
            f"baseline {theirs.outcome.p50_ms:.2f} ms, ratio {mine.outcome.p50_ms / max(theirs.outcome.p50_ms, 1e-9):.2f}x\n"
        )
        pairs = list(zip(mine.extra.get("round_p50_ms", []), theirs.extra.get("round_p50_ms", []), strict=False))
        if len(pairs) > 1:
            per_round = [a / b for a, b in pairs if b > 0]
            ctx.out.write(
                f"  by slice (system and baseline alternating): {', '.join(f'{r:.2f}x' for r in per_round)}; "
                f"median {statistics.median(per_round):.2f}x\n"
            )
    ctx.out.flush()


def redis_footprint(target: Target, ctx: Context) -> None:
    """Keys and memory left in the target's Redis: what the write path stores per request."""
    if target.redis_port is None:
        return
    from redis import Redis

    client = Redis(host="127.0.0.1", port=target.redis_port, socket_timeout=5)
    try:
        keys = int(client.dbsize())
        used = int(client.info("memory")["used_memory"])
    finally:
        client.close()
    ctx.out.write(f"{target.name} redis after the run: {keys:,} keys, {used / 2**20:.1f} MiB used\n")
    ctx.results.write("redis", {"target": target.name, "keys": keys, "used_memory": used})


# ---- the run -------------------------------------------------------------------------------------


def choose_generator(args: argparse.Namespace) -> str:
    if args.generator == "python" or (args.generator == "auto" and wrk_binary() is None):
        return "python"
    return "wrk"


def describe_generator(generator: str, gen_procs: int) -> str:
    if generator == "wrk":
        return f"wrk ({wrk_binary()}), Lua script with pre-built requests"
    return f"python (raw asyncio HTTP/1.1 keep-alive client on uvloop, {gen_procs} process(es))"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=procs.REPO_ROOT, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_settings(args: argparse.Namespace, generator: str) -> dict[str, Any]:
    keys = (
        "quick", "duration", "warmup", "connections", "sessions", "workers", "gateways", "log_level",
        "url", "nats_url", "baseline", "nats_direct", "nats_generator", "gen_procs", "timeout", "send_text_sessions", "scaling",
    )  # fmt: skip
    return {
        **{key: getattr(args, key) for key in keys},
        "generator": generator,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": _git_commit(),
    }


def external_target(args: argparse.Namespace) -> Target:
    url = urlparse(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    wait_http_ready(host, port, timeout_s=15)
    if args.nats_url:
        wait_shards_covered(args.nats_url, workers=None, timeout_s=15)
    return Target("system", host, [port], {}, nats_url=args.nats_url)


def merge_rounds(rounds: list[ScenarioResult]) -> ScenarioResult:
    """One result from a scenario's slices: counts and CPU summed, percentiles the median slice's."""
    if len(rounds) == 1:
        return rounds[0]
    outcomes = [r.outcome for r in rounds]
    cpu: dict[str, float] = {}
    for r in rounds:
        for role, seconds in r.cpu_s.items():
            cpu[role] = round(cpu.get(role, 0.0) + seconds, 2)
    merged = LoadOutcome(
        requests=sum(o.requests for o in outcomes),
        status_errors=sum(o.status_errors for o in outcomes),
        transport_errors=sum(o.transport_errors for o in outcomes),
        duration_s=sum(o.duration_s for o in outcomes),
        p50_ms=statistics.median(o.p50_ms for o in outcomes),
        p99_ms=statistics.median(o.p99_ms for o in outcomes),
        p999_ms=statistics.median(o.p999_ms for o in outcomes),
        loadgen_cpu_s=round(sum(o.loadgen_cpu_s for o in outcomes), 2),
    )
    first = rounds[0]
    extra = {**first.extra, "round_p50_ms": [round(o.p50_ms, 3) for o in outcomes]}
    return ScenarioResult(first.target, first.scenario, first.label, first.connections, first.generator, merged, cpu, first.processes, extra)


def bench_targets(targets: list[Target], secret: str, ctx: Context) -> tuple[dict[str, list[ScenarioResult]], dict[str, list[PoolEntry]]]:
    """Each scenario runs on every target back to back (system, then baseline), so a ratio
    compares runs seconds apart: this machine's speed drifts by tens of percent over minutes."""
    tokens = user_tokens(secret, ctx.args.sessions)
    pools: dict[str, list[PoolEntry]] = {}
    for target in targets:
        pools[target.name] = create_pool(target, tokens, ctx.args.sessions, ctx.args.timeout)
        ctx.out.write(f"{target.name}: {len(pools[target.name])} sessions pre-created for {len(tokens)} users\n")
    results: dict[str, list[ScenarioResult]] = {target.name: [] for target in targets}
    for scenario in scenarios(ctx.args):
        slices: dict[str, list[ScenarioResult]] = {target.name: [] for target in targets}
        for _ in range(scenario.rounds):
            for target in targets:
                slices[target.name].append(run_scenario(target, scenario, pools[target.name], tokens, ctx))
        for target in targets:
            results[target.name].append(merge_rounds(slices[target.name]))
            if scenario.rounds > 1:
                ctx.results.write_scenario(results[target.name][-1])
    for target in targets:
        print_table(f"{target.name}, load from {ctx.generator}", results[target.name], ctx.out)
        redis_footprint(target, ctx)
    return results, pools


def run(args: argparse.Namespace, out: TextIO) -> int:
    generator = choose_generator(args)
    ctx = Context(args, generator, ResultsFile(run_settings(args, generator)), out)
    out.write(f"load generator: {describe_generator(generator, args.gen_procs)}\n")
    out.write(
        f"settings: {args.connections} connections, {args.duration:g} s per scenario (+{args.warmup:g} s warm-up), "
        f"{args.sessions} sessions, {args.workers} worker(s), {args.gateways} gateway(s), LOG_LEVEL={args.log_level}, {os.cpu_count()} CPUs\n"
    )
    started = time.monotonic()
    secret = args.jwt_secret or f"bench-{secrets.token_hex(24)}"
    if args.scaling:
        rows = run_scaling(args, secret, ctx.results, out)
        out.write(f"total {time.monotonic() - started:.0f} s\nresults appended to {ctx.results.path}\n")
        return EXIT_OK if all(row.rps > 0 for row in rows) else EXIT_FAILED
    workdir = Path(tempfile.mkdtemp(prefix="sm-bench-"))
    system = SystemStack(workdir, workers=args.workers, gateways=args.gateways, log_level=args.log_level, jwt_secret=secret)
    baseline = BaselineStack(workdir, jwt_secret=secret)
    all_results: list[ScenarioResult] = []
    try:
        target = external_target(args) if args.url else system.start()
        out.write(f"system ready: gateway(s) on port(s) {', '.join(map(str, target.ports))}, all shards covered\n")
        targets = [target]
        if args.baseline:
            targets.append(baseline.start())
            out.write(f"baseline ready on port {targets[1].ports[0]}\n")
        results, pools = bench_targets(targets, secret, ctx)
        all_results += [r for rs in results.values() for r in rs]
        if args.baseline:
            print_ratios(results[target.name], results[targets[1].name], ctx)
        # Before send_text: its messages' delivery acks are written for a while after its load stops,
        # work that would land in the worker-bound direct slices more than in the gateway's.
        if args.nats_direct:
            nats_results, direct_ratios = run_nats_direct(target, pools[target.name], user_tokens(secret, args.sessions), ctx)
            all_results += nats_results
            print_table(f"NATS direct (load from {generator_label(args.nats_generator)} in its own process; connections = requests in flight)", nats_results, out)
            print_direct_ratio(direct_ratios, ctx)
        all_results += run_send_text(target, pools[target.name], ctx)
    finally:
        stopping = time.monotonic()
        for note in [*baseline.stop(), *system.stop()]:
            out.write(f"note: {note}\n")
        out.write(f"stopped every started process in {time.monotonic() - stopping:.1f} s; total {time.monotonic() - started:.0f} s\n")
        if args.keep_logs:
            out.write(f"logs and data kept in {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    out.write(f"results appended to {ctx.results.path}\n")
    if any(r.outcome.requests == 0 for r in all_results):
        out.write("error: a scenario completed no request successfully\n")
        return EXIT_FAILED
    return EXIT_OK


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into an exception so the finally blocks stop every process we started.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args, sys.stdout)
    except KeyboardInterrupt:
        sys.stdout.write("\ninterrupted; every started process was stopped\n")
        return EXIT_INTERRUPTED
    except (StackError, HarnessError, WrkError, procs.ProcessError, OSError) as exc:
        sys.stdout.write(f"\nbench failed: {exc}\n")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
