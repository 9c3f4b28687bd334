"""Fast crash detection: ask a suspect worker directly instead of waiting out its heartbeats.

A process that died has no subscriptions left, so NATS answers a ping to it with "no
responders" at once; that is definitive. A ping that merely times out (a paused or overloaded
worker) proves nothing, and such a worker is left to the heartbeat window. Suspicion comes from
a late heartbeat or from a gateway that just got "no responders" on a shard subject.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import nats.errors
import structlog
from nats.aio.client import Client as NATS

from sessionmgr.common import subjects

log = structlog.get_logger(__name__)
_MIN_GAP_S = 0.1  # at most one probe of a worker per 100 ms


class LivenessProbe:
    def __init__(self, nc: NATS, on_dead: Callable[[str], None], timeout: float) -> None:
        self._nc = nc
        self._on_dead = on_dead
        self._timeout = timeout
        self._last: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def suspect(self, worker_id: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._last.get(worker_id, 0.0) < _MIN_GAP_S:
            return
        self._last[worker_id] = now
        task = asyncio.get_running_loop().create_task(self._probe(worker_id, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, worker_id: str, reason: str) -> None:
        try:
            await self._nc.request(subjects.ping_subject(worker_id), b"", timeout=self._timeout)
        except nats.errors.NoRespondersError:
            log.warning("worker_unreachable", worker_id=worker_id, reason=reason)
            self._on_dead(worker_id)
        except Exception:  # noqa: BLE001 - a timeout or a NATS hiccup proves nothing
            return

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
