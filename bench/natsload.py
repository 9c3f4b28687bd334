"""Drive ``sessions.<sid>.<action>`` requests straight over NATS, bypassing the gateway.

This is the path the NATS CLI uses (nats.conf maps it onto the shard subject): the difference
to the REST numbers is what the HTTP gateway hop costs. Requests carry no user header (trusted
operator) and no Idempotency-Key, as ``nats req`` would send them. The load comes from
natsproto's lean client by default (nats-py costs as much CPU per request as nats-server itself);
nats-py stays selectable with ``NatsSpec.client``.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from array import array
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import natsproto
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
    client: str = "lean"  # one of CLIENTS: natsproto's lean client, or nats-py (about 4x its CPU per request)


CLIENTS = ("lean", "nats-py")


def generator_label(client: str) -> str:
    """The generator's name in tables and results files."""
    return "nats-lean" if client == "lean" else client


def incr_requests(session_ids: list[str]) -> list[tuple[str, bytes]]:
    return [(f"sessions.{sid}.context.incr", INCR_PAYLOAD) for sid in session_ids]


def incr_spec(url: str, session_ids: list[str], in_flight: int, *, timeout_s: float, client: str) -> NatsSpec:
    """``context.incr`` on sessions picked at random from ``session_ids``, ``in_flight`` at a time."""
    return NatsSpec(url=url, requests=incr_requests(session_ids), in_flight=in_flight, timeout_s=timeout_s, seed=in_flight, client=client)


def nats_child(spec: NatsSpec, window: Window) -> dict[str, Any]:
    """Entry point of the NATS generator process (see harness.run_children)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(run_load(spec, window))


class _Tally:
    """What the lanes record: counts, error kinds, latencies of the measured window, and CPU."""

    def __init__(self, window: Window) -> None:
        # The shared wall-clock window on this process's perf_counter clock.
        offset = time.perf_counter() - time.time()
        self.measure_start, self.end = window.measure_start + offset, window.end + offset
        self.latencies = array("d")
        self.counts = {"ok": 0, "status_errors": 0, "transport_errors": 0}
        self.error_kinds: dict[str, int] = {}
        self.error_samples: dict[str, str] = {}  # the first detail message seen per kind
        self.usage: dict[str, float] = {}

    def error(self, kind: str, counter: str, detail: str = "") -> None:
        self.counts[counter] += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        self.error_samples.setdefault(kind, detail)

    def status_error(self, headers: dict[str, str]) -> None:
        self.error(f"{headers.get(_CODE_HEADER, '?')} ({headers[_ERROR_HEADER]})", "status_errors", headers.get(_DETAIL_HEADER, ""))

    def snapshot(self, name: str) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.usage[name] = ru.ru_utime + ru.ru_stime

    def result(self) -> dict[str, Any]:
        cpu_s = self.usage["end"] - self.usage.get("start", self.usage["end"])
        return {**self.counts, "error_kinds": self.error_kinds, "error_samples": self.error_samples, "latencies": self.latencies.tobytes(), "cpu_s": cpu_s}


async def run_load(spec: NatsSpec, window: Window) -> dict[str, Any]:
    """Keep ``spec.in_flight`` requests going over ``window`` with ``spec.client``; the counts of the measured part."""
    if spec.client not in CLIENTS:
        raise ValueError(f"unknown NATS client {spec.client!r}, expected one of {CLIENTS}")
    tally = _Tally(window)
    if spec.client == "lean":
        await _run_lean(spec, window, tally)
    else:
        await _run_nats_py(spec, window, tally)
    return tally.result()


async def _drive(lane: Callable[[], Coroutine[Any, Any, None]], in_flight: int, window: Window, tally: _Tally) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, window.start - time.time()))
    loop.call_later(max(0.0, window.measure_start - time.time()), tally.snapshot, "start")
    lanes = [loop.create_task(lane()) for _ in range(in_flight)]
    await asyncio.sleep(max(0.0, window.end - time.time()))
    tally.snapshot("end")
    for task in lanes:
        task.cancel()  # replies still outstanding at the end are not counted
    await asyncio.gather(*lanes, return_exceptions=True)


async def _run_lean(spec: NatsSpec, window: Window, tally: _Tally) -> None:
    from sessionmgr.common.natsauth import inbox_prefix, role_credentials

    credentials = role_credentials(spec.user)
    client = await natsproto.connect(
        spec.url, user=credentials["user"], password=credentials["password"], inbox_prefix=inbox_prefix(spec.user), timeout_s=spec.timeout_s
    )
    frames = [client.frame(subject, payload) for subject, payload in spec.requests]
    choice = random.Random(spec.seed).choice
    measure_start, end, latencies = tally.measure_start, tally.end, tally.latencies

    async def lane() -> None:
        perf = time.perf_counter
        request = client.request
        while perf() < end:
            frame = choice(frames)
            t0 = perf()
            try:
                headers = await request(frame)
            except (TimeoutError, natsproto.NoRespondersError) as exc:
                if measure_start <= t0 and perf() <= end:
                    tally.error(type(exc).__name__, "transport_errors", client.server_error)
                continue
            except ConnectionError as exc:
                if measure_start <= t0 and perf() <= end:
                    tally.error("connection lost", "transport_errors", str(exc))
                return  # no reconnecting, as the nats-py generator
            t1 = perf()
            if measure_start <= t0 and t1 <= end:
                latencies.append(t1 - t0)
                if headers is None:
                    tally.counts["ok"] += 1
                else:
                    tally.status_error(headers)

    try:
        await _drive(lane, spec.in_flight, window, tally)
    finally:
        client.close()


async def _run_nats_py(spec: NatsSpec, window: Window, tally: _Tally) -> None:
    import nats
    import nats.errors

    from sessionmgr.common.natsauth import role_credentials

    # The path a NATS CLI user takes: nats.conf's cli user, sessions.<sid>.<op> subjects.
    nc = await nats.connect(spec.url, name="sm-bench-nats-direct", **role_credentials(spec.user), max_reconnect_attempts=0, connect_timeout=5)
    choice = random.Random(spec.seed).choice
    measure_start, end, latencies = tally.measure_start, tally.end, tally.latencies

    async def lane() -> None:
        perf = time.perf_counter
        while perf() < end:
            subject, payload = choice(spec.requests)
            t0 = perf()
            try:
                msg = await nc.request(subject, payload, timeout=spec.timeout_s)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                if measure_start <= t0 and perf() <= end:
                    tally.error(type(exc).__name__, "transport_errors")
                continue
            t1 = perf()
            if measure_start <= t0 and t1 <= end:
                latencies.append(t1 - t0)
                if msg.headers is not None and _ERROR_HEADER in msg.headers:
                    tally.status_error(msg.headers)
                else:
                    tally.counts["ok"] += 1

    try:
        await _drive(lane, spec.in_flight, window, tally)
    finally:
        await nc.close()


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
