"""WhatsApp sessions benchmark: memory per idle WORKING session, and message.send_text throughput.

    .venv/bin/python bench/whatsapp.py                 # 10,000 sessions, 10 s of sends per path
    .venv/bin/python bench/whatsapp.py --quick         # 1,000 sessions, 5 s
    .venv/bin/python bench/whatsapp.py --sessions 20000 --no-http

Starts its own stack (stacks.SystemStack: nats-server, redis-server, a supervisor, ONE worker and
a gateway), then, straight over NATS as an operator would (``sessions.<sid>.<action>``, the dev
user, ``--in-flight`` sessions at a time): creates N sessions, starts each connection, waits for
SCAN_QR_CODE (``session.status`` events on ``sm.events.*.session.status``), scans it with a
unique simulated phone and waits for WORKING. The worker's RSS is read before, after the creates
and after pairing (once it has settled), so the table shows MB in total and KB per session, and
whether N sessions fit in the 150 MB target.

Then message.send_text between the WORKING sessions (session i writes to session i+1's number, so
every send is also an inbound message, a delivered and a read ack on the same worker): over NATS
directly and through the gateway, with the shared load harness. Results go to the table and to
bench/results/<timestamp>.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psutil
from harness import run_children, wait_until_quiet
from httpload import HttpSpec, build_request, http_child
from natsload import NatsSpec, create_sessions, generator_label, nats_child
from report import ResultsFile, ScenarioResult, print_table, with_other
from run import merge_errors, merge_outcomes, user_tokens
from stacks import StackError, SystemStack, Target

from sessionmgr.common.ids import new_session_id

JWT_SECRET = "bench-whatsapp-secret-0123456789abcdef"
TARGET_MB = 150.0
TARGET_SESSIONS = 10_000
SESSIONS_PER_USER = 20  # as bench/run.py: tokens are minted for bench-user-<n>
_ERROR_HEADER = "Nats-Service-Error-Code"
_CODE_HEADER = "Sm-Error"


class _StatusEvent(msgspec.Struct):
    session_id: str
    data: dict[str, Any]


_event_decoder = msgspec.json.Decoder(_StatusEvent)


def phone_number(index: int) -> str:
    return f"4917{index:09d}"


# ---- pairing over NATS ----------------------------------------------------------------------


@dataclass
class Pairing:
    working: list[str]  # session ids, in the order of their phone numbers (index i has phone_number(i))
    failures: dict[str, int]
    seconds: float


class StatusWaiter:
    """Follows ``sm.events.*.session.status``; awaits a session's next status of a kind."""

    def __init__(self) -> None:
        self.latest: dict[str, str] = {}
        self._waiting: dict[str, tuple[str, asyncio.Future[None]]] = {}

    async def on_event(self, msg: Any) -> None:
        event = _event_decoder.decode(msg.data)
        status = str(event.data.get("status"))
        self.latest[event.session_id] = status
        waiting = self._waiting.get(event.session_id)
        if waiting is not None and waiting[0] == status and not waiting[1].done():
            waiting[1].set_result(None)

    def expect(self, session_id: str, status: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[session_id] = (status, future)
        return future

    async def wait(self, session_id: str, future: asyncio.Future[None], timeout_s: float) -> None:
        try:
            await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop(session_id, None)


async def pair_all(nats_url: str, session_ids: list[str], in_flight: int, timeout_s: float) -> Pairing:
    import nats

    from sessionmgr.common.natsauth import role_credentials

    nc = await nats.connect(nats_url, name="sm-bench-whatsapp", **role_credentials("dev"), max_reconnect_attempts=0, connect_timeout=5)
    waiter = StatusWaiter()
    await nc.subscribe("sm.events.*.session.status", cb=waiter.on_event, pending_msgs_limit=1_000_000)
    await nc.flush()
    working: dict[int, str] = {}
    failures: dict[str, int] = {}
    todo = iter(enumerate(session_ids))

    async def act(sid: str, action: str, payload: dict[str, Any] | None = None) -> None:
        msg = await nc.request(f"sessions.{sid}.{action}", json.dumps(payload or {}).encode(), timeout=timeout_s)
        if msg.headers and _ERROR_HEADER in msg.headers:
            raise RuntimeError(f"{action}: {msg.headers.get(_CODE_HEADER)} ({msg.headers[_ERROR_HEADER]})")

    async def lane() -> None:
        for index, sid in todo:
            try:
                scanning = waiter.expect(sid, "SCAN_QR_CODE")
                await act(sid, "connection.start")
                await waiter.wait(sid, scanning, timeout_s)
                connected = waiter.expect(sid, "WORKING")
                await act(sid, "simulate.scan", {"phone": phone_number(index)})
                await waiter.wait(sid, connected, timeout_s)
                working[index] = sid
            except Exception as exc:  # noqa: BLE001 - counted and reported, the rest go on
                kind = str(exc).split(":")[0] if isinstance(exc, RuntimeError) else type(exc).__name__
                failures[kind] = failures.get(kind, 0) + 1

    began = time.monotonic()
    try:
        await asyncio.gather(*(lane() for _ in range(in_flight)))
    finally:
        await nc.close()
    return Pairing([working[i] for i in sorted(working)], failures, time.monotonic() - began)


# ---- message.send_text over NATS, in its own process (harness.run_children) ------------------


def send_payload(index: int, count: int) -> bytes:
    """Session ``index`` writes to the next session's number: a delivery to a WORKING device."""
    return json.dumps({"chat_id": f"{phone_number((index + 1) % count)}@c.us", "text": f"bench message from {index}"}).encode()


# ---- memory ----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def settled_rss_mb(pid: int, *, quiet_s: float = 2.0, timeout_s: float = 30.0) -> float:
    """The worker's RSS once it has stopped working (CPU idle for ``quiet_s``): acks and writes done."""
    wait_until_quiet([pid], quiet_s=quiet_s, timeout_s=timeout_s)
    return rss_mb(pid)


@dataclass
class Memory:
    sessions: int
    worker_start_mb: float
    worker_created_mb: float
    worker_working_mb: float
    nats_working_mb: float
    redis_working_mb: float
    pairing_s: float

    @property
    def per_session_kb(self) -> float:
        return (self.worker_working_mb - self.worker_start_mb) * 1024 / max(1, self.sessions)

    @property
    def per_connection_kb(self) -> float:
        """What pairing added on top of the stored (STOPPED) session."""
        return (self.worker_working_mb - self.worker_created_mb) * 1024 / max(1, self.sessions)

    @property
    def projected_10k_mb(self) -> float:
        return self.worker_start_mb + self.per_session_kb * TARGET_SESSIONS / 1024

    @property
    def sessions_in_target(self) -> int:
        return int(max(0.0, TARGET_MB - self.worker_start_mb) * 1024 / max(0.001, self.per_session_kb))


def print_memory(memory: Memory, out: Any) -> None:
    fits = memory.projected_10k_mb <= TARGET_MB
    rows = [
        ("sessions WORKING", f"{memory.sessions:,}"),
        ("pairing time", f"{memory.pairing_s:.1f} s ({memory.sessions / max(0.001, memory.pairing_s):,.0f} sessions/s)"),
        ("worker RSS at start", f"{memory.worker_start_mb:.1f} MB"),
        ("worker RSS, sessions created (STOPPED)", f"{memory.worker_created_mb:.1f} MB"),
        ("worker RSS, all WORKING (idle)", f"{memory.worker_working_mb:.1f} MB"),
        ("per session (created + connected)", f"{memory.per_session_kb:.1f} KB"),
        ("  of which the connection", f"{memory.per_connection_kb:.1f} KB"),
        (f"worker RSS for {TARGET_SESSIONS:,} (projected)", f"{memory.projected_10k_mb:.1f} MB -> {'fits' if fits else 'does NOT fit'} in {TARGET_MB:.0f} MB"),
        (f"sessions per worker in {TARGET_MB:.0f} MB", f"{memory.sessions_in_target:,}"),
        ("nats-server RSS / redis-server RSS", f"{memory.nats_working_mb:.1f} MB / {memory.redis_working_mb:.1f} MB"),
    ]
    width = max(len(name) for name, _ in rows)
    out.write("\nmemory: idle WORKING simulated sessions in one worker\n")
    for name, value in rows:
        out.write(f"  {name.ljust(width)}  {value}\n")
    out.flush()


# ---- the run ---------------------------------------------------------------------------------


def _row(target: Target, label: str, scenario: str, lanes: int, generator: str, raw: list[dict[str, Any]], cpu: dict[str, float], duration: float, working: int) -> ScenarioResult:
    outcome = merge_outcomes(raw, duration)
    return ScenarioResult(
        target="system",
        scenario=scenario,
        label=label,
        connections=lanes,
        generator=generator,
        outcome=outcome,
        cpu_s=with_other(cpu, outcome.loadgen_cpu_s),
        processes={role: len(pids) for role, pids in target.roles.items()},
        extra={**merge_errors(raw), "working_sessions": working},
    )


def run(args: argparse.Namespace, out: Any) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sm-bench-whatsapp-"))
    results = ResultsFile({key: getattr(args, key) for key in ("quick", "sessions", "in_flight", "duration", "warmup", "connections", "log_level", "http")})
    stack = SystemStack(workdir, workers=1, gateways=1, log_level=args.log_level, jwt_secret=JWT_SECRET)
    try:
        out.write(f"starting nats-server, redis-server, a supervisor, 1 worker and a gateway (logs in {workdir}) ...\n")
        out.flush()
        target = stack.start()
        assert target.nats_url is not None
        [worker_pid] = target.roles["worker"]
        start_mb = settled_rss_mb(worker_pid)

        tokens = user_tokens(JWT_SECRET, args.sessions)
        users = [f"bench-user-{i:05d}" for i in range(len(tokens))]
        owners = [(new_session_id(), users[i % len(users)]) for i in range(args.sessions)]
        out.write(f"creating {args.sessions:,} sessions over NATS ...")
        out.flush()
        created = create_sessions(target.nats_url, owners, in_flight=args.in_flight, timeout_s=args.timeout)
        out.write(f" {created:,}\n")
        if created < args.sessions:
            raise StackError(f"only {created} of {args.sessions} sessions could be created")
        created_mb = settled_rss_mb(worker_pid)

        out.write(f"pairing them (connection.start, SCAN_QR_CODE, simulate.scan, WORKING; {args.in_flight} at a time) ...")
        out.flush()
        pairing = asyncio.run(pair_all(target.nats_url, [sid for sid, _ in owners], args.in_flight, args.timeout))
        out.write(f" {len(pairing.working):,} WORKING in {pairing.seconds:.1f} s" + (f"; failures {pairing.failures}" if pairing.failures else "") + "\n")
        if not pairing.working:
            raise StackError("no session reached WORKING")
        memory = Memory(
            sessions=len(pairing.working),
            worker_start_mb=start_mb,
            worker_created_mb=created_mb,
            worker_working_mb=settled_rss_mb(worker_pid),
            nats_working_mb=rss_mb(target.roles["nats"][0]),
            redis_working_mb=rss_mb(target.roles["redis"][0]),
            pairing_s=pairing.seconds,
        )
        print_memory(memory, out)
        results.write(
            "whatsapp_memory",
            {
                "sessions": memory.sessions,
                "pairing_failures": pairing.failures,
                "pairing_s": round(memory.pairing_s, 2),
                "worker_start_mb": round(memory.worker_start_mb, 1),
                "worker_created_mb": round(memory.worker_created_mb, 1),
                "worker_working_mb": round(memory.worker_working_mb, 1),
                "per_session_kb": round(memory.per_session_kb, 2),
                "per_connection_kb": round(memory.per_connection_kb, 2),
                "projected_10k_mb": round(memory.projected_10k_mb, 1),
                "fits_150mb": memory.projected_10k_mb <= TARGET_MB,
                "sessions_in_150mb": memory.sessions_in_target,
                "nats_mb": round(memory.nats_working_mb, 1),
                "redis_mb": round(memory.redis_working_mb, 1),
            },
        )

        # Senders keep their pairing order, so sender i writes to the session holding phone i+1.
        working = pairing.working
        index_of = {sid: i for i, (sid, _) in enumerate(owners)}
        count = len(owners)
        rows: list[ScenarioResult] = []
        out.write(f"\nmessage.send_text over NATS ({args.in_flight} in flight, {args.duration:g} s) ...")
        out.flush()
        requests = [(f"sessions.{sid}.message.send_text", send_payload(index_of[sid], count)) for sid in working]
        spec = NatsSpec(url=target.nats_url, requests=requests, in_flight=args.in_flight, timeout_s=args.timeout, seed=1)
        raw, cpu = run_children(nats_child, [spec], warmup_s=args.warmup, duration_s=args.duration, roles=target.roles)
        rows.append(_row(target, "sessions.<sid>.message.send_text", "wa-send-nats", args.in_flight, generator_label(spec.client), raw, cpu, args.duration, len(working)))
        out.write(f" {rows[-1].outcome.rps:,.0f} req/s\n")
        if args.http:
            token_by_user = dict(zip(users, tokens, strict=True))
            token_of = {sid: token_by_user[user] for sid, user in owners}
            host = f"{target.host}:{target.ports[0]}"
            http_requests = [
                build_request(
                    "POST", f"/sessions/{sid}/request", host, token_of[sid],
                    b'{"action":"message.send_text","payload":' + send_payload(index_of[sid], count) + b"}",
                )
                for sid in working
            ]  # fmt: skip
            out.write(f"POST .../request message.send_text through the gateway ({args.connections} conns, {args.duration:g} s) ...")
            out.flush()
            http_spec = HttpSpec(targets=target.addresses, requests=http_requests, connections=args.connections, timeout_s=args.timeout, seed=2)
            raw, cpu = run_children(http_child, [http_spec], warmup_s=args.warmup, duration_s=args.duration, roles=target.roles)
            rows.append(_row(target, "POST .../request message.send_text", "wa-send-http", args.connections, "python", raw, cpu, args.duration, len(working)))
            out.write(f" {rows[-1].outcome.rps:,.0f} req/s\n")
        for row in rows:
            results.write_scenario(row)
        print_table(f"message.send_text between {len(working):,} WORKING sessions on 1 worker", rows, out)
        # Histories (in Redis) are bounded; what the worker keeps per session should not grow with traffic.
        after_mb = settled_rss_mb(worker_pid)
        sent = sum(r.outcome.requests for r in rows)
        out.write(f"worker RSS after {sent:,} sends: {after_mb:.1f} MB ({after_mb - memory.worker_working_mb:+.1f} MB since idle)\n")
        results.write("whatsapp_memory_after_sends", {"sends": sent, "worker_mb": round(after_mb, 1), "growth_mb": round(after_mb - memory.worker_working_mb, 1)})
        out.write(f"\nresults appended to {results.path}\n")
        failed = any(r.outcome.requests == 0 for r in rows)
        return 1 if failed else 0
    finally:
        for note in stack.stop():
            out.write(f"note: {note}\n")
        if args.keep_logs:
            out.write(f"logs kept in {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/whatsapp.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 sessions and 5 s per send path")
    parser.add_argument("--sessions", type=int, help=f"sessions created and paired in the one worker (default {TARGET_SESSIONS:,}, --quick 1,000)")
    parser.add_argument("--in-flight", type=int, default=64, help="concurrent NATS requests while pairing and sending (default 64)")
    parser.add_argument("--connections", type=int, default=64, help="gateway connections for the HTTP send row (default 64)")
    parser.add_argument("--duration", type=float, help="seconds each send path is measured (default 10, --quick 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement (default 1)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a request or a status wait fails (default 30)")
    parser.add_argument("--no-http", dest="http", action="store_false", help="skip the send row through the gateway")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="LOG_LEVEL of the services (default INFO, as deployed)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the scratch directory with the services' logs")
    args = parser.parse_args(argv)
    args.sessions = args.sessions if args.sessions is not None else (1_000 if args.quick else TARGET_SESSIONS)
    args.duration = args.duration if args.duration is not None else (5.0 if args.quick else 10.0)
    if args.sessions < 2 or args.in_flight < 1 or args.connections < 1:
        parser.error("--sessions must be at least 2, --in-flight and --connections at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv), sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
