"""Run a load function in processes of its own, start them together and sample CPU over the window.

Every child reports "ready" once its interpreter is up, then all get the same wall-clock start, so
warm-up and the measured window line up across generator processes and the /proc CPU samples the
parent takes of the system's processes.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from report import cpu_delta, cpu_seconds, cpu_snapshot

# (spec, window) -> that child's partial result; must be a module-level function (it is pickled).
ChildFn = Callable[[Any, "Window"], dict[str, Any]]
_START_SLACK_S = 0.05  # time for the start message to reach every child before the clock starts


class HarnessError(RuntimeError):
    pass


@dataclass(frozen=True)
class Window:
    """Absolute wall-clock times (time.time()) of one load run."""

    start: float  # load begins; results before measure_start are warm-up
    measure_start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.measure_start


def _child_main(fn: ChildFn, spec: Any, conn: Connection) -> None:
    try:
        conn.send("ready")
        window: Window = conn.recv()
        try:
            result = fn(spec, window)
        except Exception as exc:  # noqa: BLE001 - report any failure to the parent instead of hanging it
            result = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send(result)
    except (BrokenPipeError, EOFError, KeyboardInterrupt):
        pass  # the parent gave up (interrupted or failed): nobody is left to report to
    finally:
        conn.close()


def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        time.sleep(delay)


def run_children(
    fn: ChildFn,
    specs: list[Any],
    *,
    warmup_s: float,
    duration_s: float,
    roles: dict[str, list[int]],
    ready_timeout_s: float = 30.0,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run ``fn`` once per spec, each in its own process; returns their results and the roles' CPU seconds."""
    # spawn, not fork: the parent holds event loops and client connections a fork would copy.
    ctx = multiprocessing.get_context("spawn")
    children: list[tuple[Any, Connection]] = []  # (SpawnProcess, its end of the pipe)
    finished = False
    try:
        for spec in specs:
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_child_main, args=(fn, spec, child_end), daemon=True)
            proc.start()
            child_end.close()
            children.append((proc, parent_end))
        for proc, conn in children:
            if not conn.poll(ready_timeout_s) or conn.recv() != "ready":
                raise HarnessError(f"load generator process {proc.pid} did not start")
        start = time.time() + _START_SLACK_S
        window = Window(start=start, measure_start=start + warmup_s, end=start + warmup_s + duration_s)
        for _, conn in children:
            conn.send(window)
        _sleep_until(window.measure_start)
        before = cpu_snapshot(roles)
        _sleep_until(window.end)
        cpu = cpu_delta(before, cpu_snapshot(roles))
        results = []
        for proc, conn in children:
            if not conn.poll(30.0):
                raise HarnessError(f"load generator process {proc.pid} did not report")
            result = conn.recv()
            if "error" in result:
                raise HarnessError(f"load generator failed: {result['error']}")
            results.append(result)
        finished = True
        return results, cpu
    finally:
        for proc, conn in children:
            conn.close()
            if not finished:
                proc.terminate()  # interrupted or failed: do not let the load run on
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def wait_until_quiet(pids: list[int], *, quiet_s: float = 1.0, timeout_s: float = 10.0, busy_share: float = 0.1) -> float:
    """Wait until ``pids`` together used less than ``busy_share`` of a core for ``quiet_s`` (work a
    previous load left behind, such as delayed acks, is done); the seconds waited. Gives up after
    ``timeout_s``: a process that never goes quiet should not stall the run."""
    started = time.monotonic()
    quiet_since = started
    last = sum(cpu_seconds(pid) or 0.0 for pid in pids)
    step = min(0.25, quiet_s / 2)
    while time.monotonic() - started < timeout_s:
        time.sleep(step)
        now = sum(cpu_seconds(pid) or 0.0 for pid in pids)
        if now - last > busy_share * step:
            quiet_since = time.monotonic()
        last = now
        if time.monotonic() - quiet_since >= quiet_s:
            break
    return time.monotonic() - started
