"""Results: percentiles, per-process CPU time from /proc, the printed table and the JSONL file."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The column order of the CPU part of the table; roles a target does not have print as "-".
# "other" is every other process on the machine: concurrent jobs make the numbers noisy when it is high.
CPU_ROLES = ("gateway", "worker", "nats", "redis", "supervisor", "loadgen", "other")
MACHINE = "machine"  # busy CPU seconds of the whole machine, from /proc/stat


@dataclass
class LoadOutcome:
    """What a load generator measured in the window (warm-up excluded)."""

    requests: int  # completed with a 2xx status
    status_errors: int  # completed with any other status
    transport_errors: int  # connect/read/write failures and timeouts
    duration_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    loadgen_cpu_s: float

    @property
    def errors(self) -> int:
        return self.status_errors + self.transport_errors

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


@dataclass
class ScenarioResult:
    target: str  # "system" or "baseline"
    scenario: str
    label: str
    connections: int
    generator: str
    outcome: LoadOutcome
    cpu_s: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds in the window
    processes: dict[str, int] = field(default_factory=dict)  # role -> how many processes were summed
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list; 0.0 for an empty one."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(pct / 100.0 * len(sorted_values))))
    return sorted_values[rank - 1]


def summarize_latencies(latencies_s: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies_s)
    return tuple(percentile(ordered, p) * 1000.0 for p in (50.0, 99.0, 99.9))  # type: ignore[return-value]


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one live process; None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its closing ')' are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_busy_seconds() -> float:
    """All CPUs' non-idle time: user, nice, system, irq, softirq and steal (guest is inside user)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def cpu_snapshot(roles: dict[str, list[int]]) -> dict[str, float]:
    """Per role the sum over its processes; roles with several processes also get "role:pid" keys."""
    snapshot: dict[str, float] = {}
    for role, pids in roles.items():
        each = {pid: cpu_seconds(pid) or 0.0 for pid in pids}
        snapshot[role] = sum(each.values())
        if len(pids) > 1:
            snapshot.update({f"{role}:{pid}": value for pid, value in each.items()})
    snapshot[MACHINE] = machine_busy_seconds()
    return snapshot


def with_other(cpu: dict[str, float], loadgen_s: float) -> dict[str, float]:
    """Add "other": machine busy time not spent in the sampled roles or the load generator."""
    accounted = sum(v for k, v in cpu.items() if k != MACHINE and ":" not in k) + loadgen_s
    return {**cpu, "other": round(max(0.0, cpu.get(MACHINE, 0.0) - accounted), 2)}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: round(after[role] - before.get(role, 0.0), 2) for role in after}


# ---- printing ------------------------------------------------------------------------------

_HEADER = ("target", "scenario", "conns", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors")


def _row(result: ScenarioResult) -> list[str]:
    o = result.outcome
    cells = [
        result.target,
        result.label,
        str(result.connections),
        f"{o.rps:,.0f}",
        f"{o.p50_ms:.2f}",
        f"{o.p99_ms:.2f}",
        f"{o.p999_ms:.2f}",
        str(o.errors),
    ]
    cpu = {**result.cpu_s, "loadgen": round(o.loadgen_cpu_s, 2)}
    cells += [f"{cpu[role]:.2f}" if role in cpu else "-" for role in CPU_ROLES]
    return cells


def print_table(title: str, results: list[ScenarioResult], out: TextIO) -> None:
    header = [*_HEADER, *(f"cpu {role}" for role in CPU_ROLES)]
    rows = [_row(r) for r in results]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))] if rows else [len(h) for h in header]
    text_columns = {0, 1}  # left-aligned; numbers are right-aligned so digits line up

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out.write(f"\n{title}\n{line(header)}\n{'  '.join('-' * w for w in widths)}\n")
    for row in rows:
        out.write(line(row) + "\n")
    out.write("(cpu: CPU seconds used in the measured window, summed per role; other: the rest of the machine, the system too with --url)\n")
    for result in results:
        kinds = result.extra.get("error_kinds")
        if kinds:
            samples = result.extra.get("error_samples") or {}
            listed = ", ".join(f"{kind} x{count}" + (f" [{samples[kind]}]" if samples.get(kind) else "") for kind, count in sorted(kinds.items()))
            out.write(f"errors in '{result.label}' ({result.connections}): {listed}\n")
    out.flush()


# ---- the JSONL record ----------------------------------------------------------------------


class ResultsFile:
    """bench/results/<timestamp>.jsonl: one JSON object per line, each carrying the run's settings."""

    def __init__(self, settings: dict[str, Any], directory: Path = RESULTS_DIR) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.run_id = time.strftime("%Y%m%dT%H%M%S")
        self.path = directory / f"{self.run_id}.jsonl"
        self._settings = settings

    def write(self, kind: str, record: dict[str, Any]) -> None:
        line = {"run_id": self.run_id, "kind": kind, "time": time.time(), "settings": self._settings, **record}
        with self.path.open("a") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")

    def write_scenario(self, result: ScenarioResult, kind: str = "scenario") -> None:
        """``kind="slice"`` for one slice of a scenario that runs in alternating slices; the
        merged result is then written as the ``scenario``."""
        record = asdict(result)
        outcome = record.pop("outcome")
        record.update({k: round(v, 3) if isinstance(v, float) else v for k, v in outcome.items()})
        record["rps"] = round(result.outcome.rps, 1)
        record["errors"] = result.outcome.errors
        self.write(kind, record)
