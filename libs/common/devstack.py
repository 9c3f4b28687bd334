"""``make run``: the whole system on one machine, every part its own OS process.

Starts nats-server (``nats.conf``, JetStream in ``.data/nats``) and redis-server (AOF in
``.data/redis``), then the supervisor, ``WORKER_COUNT`` workers and the gateway, prefixes and
prints their logs, and on Ctrl-C or SIGTERM stops them all in reverse order, servers last.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from sessionmgr.common import natsauth, procs
from sessionmgr.common.settings import SettingsError, load_settings

DEFAULT_METRICS_PORT = 9400


def _metrics_env(ports: list[int], index: int) -> dict[str, str]:
    return {"METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(ports[index])} if ports else {"METRICS_PORT": "0"}


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"make run: {exc}")
    data = Path(os.environ.get("SM_DATA_DIR", procs.REPO_ROOT / ".data"))
    nats_port = urlparse(settings.nats_url).port or 4222
    # Metrics listeners: the supervisor on METRICS_PORT (9400 unless set; 0 turns them off), worker i on +i.
    metrics_base = settings.metrics_port if "METRICS_PORT" in os.environ else DEFAULT_METRICS_PORT
    metrics_ports = [metrics_base + i for i in range(settings.worker_count + 1)] if metrics_base else []
    checks = [(nats_port, "NATS", "NATS_URL"), (settings.db_port, "Redis", "DB_PORT"), (settings.port, "the gateway", "PORT")]
    checks += [(port, "a metrics listener", "METRICS_PORT") for port in metrics_ports]
    for port, what, var in checks:
        if procs.port_open(port):
            sys.exit(f"make run: port {port} for {what} is already in use; stop what holds it or set {var}")

    started: list[procs.ManagedProcess] = []
    selector = selectors.DefaultSelector()
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def launch(proc: procs.ManagedProcess, port: int | None = None) -> None:
        proc.start(stdout=subprocess.PIPE)
        started.append(proc)
        assert proc.popen is not None and proc.popen.stdout is not None
        os.set_blocking(proc.popen.stdout.fileno(), False)
        selector.register(proc.popen.stdout, selectors.EVENT_READ, proc)
        if port is not None:
            proc.wait_for_port(port)

    env = {"NATS_URL": f"nats://127.0.0.1:{nats_port}", "DB_HOST": "127.0.0.1", "DB_PORT": str(settings.db_port), "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console")}
    try:
        launch(procs.nats_server(nats_port, data / "nats"), nats_port)
        launch(procs.redis_server(settings.db_port, data / "redis"), settings.db_port)
        launch(procs.service("supervisor", "supervisor", {**env, **_metrics_env(metrics_ports, 0), "SUPERVISOR_ID": "supervisor-1"}))
        for index in range(1, settings.worker_count + 1):
            launch(procs.service("worker", f"worker-{index}", {**env, **_metrics_env(metrics_ports, index), "WORKER_ID": f"worker-{index}"}))
        launch(procs.service("gateway", "gateway", env), settings.port)
        _banner(settings.port, nats_port, settings.db_port, settings.worker_count, metrics_ports)
        pending: dict[str, bytes] = {}
        while not stopping:
            for key, _ in selector.select(timeout=0.5):
                proc: procs.ManagedProcess = key.data
                chunk = key.fileobj.read()  # type: ignore[union-attr]
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                lines = (pending.pop(proc.name, b"") + chunk).split(b"\n")
                pending[proc.name] = lines.pop()
                for line in lines:
                    sys.stdout.write(f"[{proc.name}] {line.decode(errors='replace')}\n")
                sys.stdout.flush()
            for proc in started:
                if not proc.alive() and not stopping:
                    sys.stdout.write(f"*** {proc.name} exited with status {proc.popen.returncode if proc.popen else '?'}\n")
                    started.remove(proc)
                    break
    except procs.ProcessError as exc:
        sys.stdout.write(f"make run: {exc}\n")
    finally:
        sys.stdout.write("stopping every process...\n")
        sys.stdout.flush()
        for proc in reversed(started):
            proc.stop(timeout=10)
        sys.stdout.write("all stopped.\n")


def _banner(port: int, nats_port: int, redis_port: int, workers: int, metrics_ports: list[int]) -> None:
    metrics = (
        f"http://127.0.0.1:{port}/metrics (gateway), :{metrics_ports[0]} (supervisor), :{metrics_ports[1]}-{metrics_ports[-1]} (workers)"
        if metrics_ports
        else f"http://127.0.0.1:{port}/metrics (gateway; METRICS_PORT=0 turned the others off)"
    )
    print(
        f"""
==============================================================================
 Session Manager is running ({workers} workers)
   gateway   http://127.0.0.1:{port}   (OpenAPI: http://127.0.0.1:{port}/schema)
   NATS      nats://127.0.0.1:{nats_port}   users per role (nats.conf); as the CLI user:
             nats --user cli --password {natsauth.role_credentials("cli")["password"]} req sessions.<id>.session.get ''
   Redis     redis://127.0.0.1:{redis_port}
   metrics   {metrics}
 Get a token:  make token USER=alice
   curl -H "Authorization: Bearer $(make -s token USER=alice)" -X POST http://127.0.0.1:{port}/sessions
 Ctrl-C stops everything.
==============================================================================
""",
        flush=True,
    )
    time.sleep(0)


if __name__ == "__main__":
    main()
