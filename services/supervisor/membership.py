"""Which workers are alive, from their heartbeats; silence for the failure window means dead."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sessionmgr.common.models import Heartbeat


@dataclass(slots=True)
class WorkerState:
    heartbeat: Heartbeat
    last_seen: float  # monotonic


class Membership:
    def __init__(self, failure_timeout: float) -> None:
        self._failure_timeout = failure_timeout
        self._workers: dict[str, WorkerState] = {}

    def beat(self, heartbeat: Heartbeat, now: float | None = None) -> bool:
        """Record a heartbeat; True when this worker was not known to be alive before."""
        now = time.monotonic() if now is None else now
        known = self._workers.get(heartbeat.worker_id)
        fresh = known is None or now - known.last_seen > self._failure_timeout
        self._workers[heartbeat.worker_id] = WorkerState(heartbeat, now)
        return fresh

    def leave(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def live(self, now: float | None = None) -> list[str]:
        """Workers that may own shards: heard from within the window and not draining."""
        now = time.monotonic() if now is None else now
        return sorted(
            wid
            for wid, state in self._workers.items()
            if now - state.last_seen <= self._failure_timeout and not state.heartbeat.draining
        )

    def alive(self, now: float | None = None) -> set[str]:
        """Workers heard from within the window, draining ones included."""
        now = time.monotonic() if now is None else now
        return {wid for wid, state in self._workers.items() if now - state.last_seen <= self._failure_timeout}

    def forget_dead(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        dead = [wid for wid, s in self._workers.items() if now - s.last_seen > 10 * self._failure_timeout]
        for wid in dead:
            del self._workers[wid]
        return dead

    def snapshot(self) -> dict[str, WorkerState]:
        return dict(self._workers)
