"""Drive ``sessions.<sid>.<action>`` requests straight over NATS, bypassing the gateway.

This is the path the NATS CLI uses (nats.conf maps it onto the shard subject): the difference
to the REST numbers is what the HTTP gateway hop costs. Requests carry no user header (trusted
operator) and no Idempotency-Key, as ``nats req`` would send them.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from array import array
from dataclasses import dataclass
from typing import Any

from harness import Window

# Workers answer errors with these headers instead of a status (see sessionmgr.common.errors).
_ERROR_HEADER = "Nats-Service-Error-Code"  # the HTTP-like status
_CODE_HEADER = "Sm-Error"  # the machine-readable code
_DETAIL_HEADER = "Nats-Service-Error"
INCR_PAYLOAD = b'{"key":"n","by":1}'


@dataclass(frozen=True)
class NatsSpec:
    url: str
    requests: list[tuple[str, bytes]]  # (subject, payload); each request picks one at random
    in_flight: int
    timeout_s: float
    seed: int
    user: str = "cli"  # nats.conf's user for the NATS CLI path


def incr_requests(session_ids: list[str]) -> list[tuple[str, bytes]]:
    return [(f"sessions.{sid}.context.incr", INCR_PAYLOAD) for sid in session_ids]


def nats_child(spec: NatsSpec, window: Window) -> dict[str, Any]:
    """Entry point of the NATS generator process (see harness.run_children)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_run(spec, window))


async def _run(spec: NatsSpec, window: Window) -> dict[str, Any]:
    import nats
    import nats.errors

    from sessionmgr.common.natsauth import role_credentials

    # The path a NATS CLI user takes: nats.conf's cli user, sessions.<sid>.<op> subjects.
    nc = await nats.connect(spec.url, name="sm-bench-nats-direct", **role_credentials(spec.user), max_reconnect_attempts=0, connect_timeout=5)
    offset = time.perf_counter() - time.time()
    measure_start, end = window.measure_start + offset, window.end + offset
    choice = random.Random(spec.seed).choice
    latencies = array("d")
    counts = {"ok": 0, "status_errors": 0, "transport_errors": 0}
    error_kinds: dict[str, int] = {}
    error_samples: dict[str, str] = {}  # the first detail message seen per kind

    def error(kind: str, counter: str, detail: str = "") -> None:
        counts[counter] += 1
        error_kinds[kind] = error_kinds.get(kind, 0) + 1
        error_samples.setdefault(kind, detail)

    usage: dict[str, float] = {}

    def snapshot(name: str) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        usage[name] = ru.ru_utime + ru.ru_stime

    async def lane() -> None:
        perf = time.perf_counter
        while perf() < end:
            subject, payload = choice(spec.requests)
            t0 = perf()
            try:
                msg = await nc.request(subject, payload, timeout=spec.timeout_s)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                if measure_start <= t0 and perf() <= end:
                    error(type(exc).__name__, "transport_errors")
                continue
            t1 = perf()
            if measure_start <= t0 and t1 <= end:
                latencies.append(t1 - t0)
                if msg.headers is not None and _ERROR_HEADER in msg.headers:
                    kind = f"{msg.headers.get(_CODE_HEADER, '?')} ({msg.headers[_ERROR_HEADER]})"
                    error(kind, "status_errors", msg.headers.get(_DETAIL_HEADER, ""))
                else:
                    counts["ok"] += 1

    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(max(0.0, window.start - time.time()))
        loop.call_later(max(0.0, window.measure_start - time.time()), snapshot, "start")
        lanes = [loop.create_task(lane()) for _ in range(spec.in_flight)]
        await asyncio.sleep(max(0.0, window.end - time.time()))
        snapshot("end")
        for task in lanes:
            task.cancel()  # replies still outstanding at the end are not counted
        await asyncio.gather(*lanes, return_exceptions=True)
    finally:
        await nc.close()
    cpu_s = usage["end"] - usage.get("start", usage["end"])
    return {**counts, "error_kinds": error_kinds, "error_samples": error_samples, "latencies": latencies.tobytes(), "cpu_s": cpu_s}


async def _create_sessions(url: str, owners: list[tuple[str, str]], in_flight: int, timeout_s: float) -> int:
    import nats

    from sessionmgr.common.natsauth import role_credentials

    nc = await nats.connect(url, name="sm-bench-create", **role_credentials("cli"), max_reconnect_attempts=0, connect_timeout=5)
    created = 0
    todo = iter(owners)

    async def lane() -> None:
        nonlocal created
        for session_id, user_id in todo:
            headers = {"Sm-User": user_id, "Idempotency-Key": f"bench-create-{session_id}"}
            msg = await nc.request(f"sessions.{session_id}.session.create", b'{"metadata":{}}', timeout=timeout_s, headers=headers)
            if msg.headers is None or _ERROR_HEADER not in msg.headers:
                created += 1

    try:
        await asyncio.gather(*(lane() for _ in range(in_flight)))
    finally:
        await nc.close()
    return created


def create_sessions(url: str, owners: list[tuple[str, str]], *, in_flight: int = 256, timeout_s: float = 10.0) -> int:
    """Create sessions (session_id, user_id) straight over NATS, as an operator would; how many were created.

    Much faster than through the gateway, for the large pools of the scaling table.
    """
    try:
        import uvloop

        return uvloop.run(_create_sessions(url, owners, in_flight, timeout_s))
    except ImportError:
        return asyncio.run(_create_sessions(url, owners, in_flight, timeout_s))
