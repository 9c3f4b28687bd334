"""Drive load with wrk (C, event-driven) when it is installed, through a generated Lua script.

The script holds the same pre-built raw requests as the Python generator (bodies and bearer
tokens included), picks one at random per request, spreads wrk's threads over the targets and
prints wrk's own summary and latency percentiles as one JSON line from ``done``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from report import LoadOutcome, cpu_delta, cpu_snapshot

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%.1f,"p99_us":%.1f,"p999_us":%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"""


class WrkError(RuntimeError):
    pass


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def _lua_string(raw: bytes) -> str:
    # Decimal escapes for everything but plain printable ASCII: valid in Lua 5.1 and LuaJIT. Always
    # three digits: Lua reads up to three, so "\34" before a digit ('"4...') would be another byte.
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in raw) + '"'


def write_script(path: Path, targets: list[tuple[str, int]], requests: list[bytes]) -> None:
    lines = ["local requests = {"]
    lines += [f"  {_lua_string(r)}," for r in requests]
    lines.append("}")
    lines.append("local targets = {" + ", ".join(f'{{"{h}", "{p}"}}' for h, p in targets) + "}")
    lines.append(
        """
local n = #requests
local threads = 0
setup = function(thread)
  -- one wrk thread per target at least, assigned round-robin
  local t = targets[threads % #targets + 1]
  threads = threads + 1
  thread.addr = wrk.lookup(t[1], t[2])[1]
end
init = function(args)
  -- each thread has its own Lua state: seed it from a per-state table address
  math.randomseed(os.time() + tonumber(string.match(tostring({}), "0x(%x+)") or "0", 16) % 1000003)
end
request = function()
  return requests[math.random(n)]
end
"""
    )
    lines.append(_DONE)
    path.write_text("\n".join(lines))


def _run_wrk(binary: str, script: Path, url: str, connections: int, threads: int, seconds: int, timeout_s: float) -> dict[str, float]:
    argv = [binary, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", f"{math.ceil(timeout_s)}s", "-s", str(script), url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout_s + 30, check=False)
    if proc.returncode != 0:
        raise WrkError(f"wrk exited with {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise WrkError(f"wrk printed no summary: {proc.stdout.strip()}")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_wrk_load(
    targets: list[tuple[str, int]],
    requests: list[bytes],
    *,
    connections: int,
    warmup_s: float,
    duration_s: float,
    timeout_s: float,
    roles: dict[str, list[int]],
) -> tuple[LoadOutcome, dict[str, float], dict[str, dict[str, int]]]:
    """A warm-up run, then the measured run; returns wrk's outcome, the roles' CPU seconds and error kinds."""
    binary = wrk_binary()
    if binary is None:
        raise WrkError("wrk is not installed")
    host, port = targets[0]
    url = f"http://{host}:{port}/"
    # wrk needs at least one connection per thread; use both cores but never fewer threads than targets.
    threads = min(connections, max(len(targets), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="sm-bench-wrk-") as tmp:
        script = Path(tmp) / "load.lua"
        write_script(script, targets, requests)
        if warmup_s > 0:
            _run_wrk(binary, script, url, connections, threads, max(1, round(warmup_s)), timeout_s)
        # wrk takes whole seconds; the measured duration is what wrk itself reports.
        seconds = max(1, round(duration_s))
        children_before = _children_cpu()
        before = cpu_snapshot(roles)
        started = time.monotonic()
        summary = _run_wrk(binary, script, url, connections, threads, seconds, timeout_s)
        cpu = cpu_delta(before, cpu_snapshot(roles))
        elapsed = time.monotonic() - started
    status_errors = int(summary["status"])
    transport_errors = int(summary["connect"] + summary["read"] + summary["write"] + summary["timeout"])
    outcome = LoadOutcome(
        requests=int(summary["requests"]) - status_errors,
        status_errors=status_errors,
        transport_errors=transport_errors,
        duration_s=summary["duration_us"] / 1e6 or elapsed,
        p50_ms=summary["p50_us"] / 1000.0,
        p99_ms=summary["p99_us"] / 1000.0,
        p999_ms=summary["p999_us"] / 1000.0,
        loadgen_cpu_s=round(_children_cpu() - children_before, 2),
    )
    kinds = {kind: int(summary[kind]) for kind in ("connect", "read", "write", "timeout") if summary[kind]}
    if status_errors:
        kinds["http status >= 400"] = status_errors
    return outcome, cpu, ({"error_kinds": kinds} if kinds else {})
