"""The supervisor's Prometheus metrics, served on ``METRICS_PORT``.

| metric | labels | what |
|---|---|---|
| ``sm_supervisor_leader`` | | 1 on the supervisor holding the lease |
| ``sm_supervisor_live_workers`` | | workers heard from within the failure window and not draining |
| ``sm_shards_unowned`` | | shards whose owner is not alive (leader only; 0 on a standby) |
| ``sm_shard_moves_total`` | ``reason`` | shards moved: ``death``, ``join``, ``drain`` or ``move`` (operator) |
| ``sm_failover_seconds`` | | from a worker's death being detected to the map without it written |

A death is detected when the liveness probe gets "no responders", or when the failure window
(``HEARTBEAT_INTERVAL`` x ``HEARTBEAT_MISSES``) after its last heartbeat has passed.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sessionmgr.common.metrics import FAILOVER_BUCKETS, new_registry
from sessionmgr.common.models import ShardMap
from sessionmgr.supervisor.membership import Membership

if TYPE_CHECKING:
    from sessionmgr.supervisor.server import Supervisor

REASONS = ("death", "join", "drain", "move")


@dataclass(slots=True)
class MoveReport:
    """Why the shards of one map change moved, worked out before the map is written."""

    reasons: Tally[str] = field(default_factory=Tally)
    deaths_detected_at: dict[str, float] = field(default_factory=dict)  # dead owner -> monotonic detection time


class SupervisorMetrics:
    def __init__(self, failure_timeout: float, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        self._failure_timeout = failure_timeout
        self.moves = Counter("sm_shard_moves", "Shards the leader moved to another worker, by reason", ["reason"], registry=self.registry)
        self._moves: dict[str, Any] = {reason: self.moves.labels(reason=reason) for reason in REASONS}
        self.failover = Histogram(
            "sm_failover_seconds",
            "Seconds from a worker's death being detected to the shard map without it being written",
            buckets=FAILOVER_BUCKETS,
            registry=self.registry,
        )
        self._declared_dead: dict[str, float] = {}  # probe verdicts, which drop the worker from membership
        self._left: dict[str, float] = {}  # workers that said goodbye after draining
        self._state = _SupervisorStateCollector()
        self.registry.register(self._state)

    def watch(self, supervisor: Supervisor) -> None:
        self._state.supervisor = supervisor

    def worker_declared_dead(self, worker_id: str) -> None:
        self._remember(self._declared_dead, worker_id)

    def worker_left(self, worker_id: str) -> None:
        self._remember(self._left, worker_id)

    def _remember(self, book: dict[str, float], worker_id: str) -> None:
        now = time.monotonic()
        for stale in [w for w, at in book.items() if now - at > 20 * self._failure_timeout]:
            del book[stale]
        book[worker_id] = now

    def classify(self, previous: ShardMap, new: ShardMap, moved: list[int], membership: Membership) -> MoveReport:
        report = MoveReport()
        snapshot = membership.snapshot()
        alive = membership.alive()
        for shard in moved:
            owner, new_owner = previous.shards[shard].owner, new.shards[shard].owner
            if owner is None:
                reason = "join"
            elif owner in self._left:
                reason = "drain"
            elif owner not in alive:
                reason = "death"
                detected = self._declared_dead.get(owner)
                if detected is None and owner in snapshot:
                    detected = snapshot[owner].last_seen + self._failure_timeout
                if detected is not None:
                    report.deaths_detected_at[owner] = detected
            elif new.pinned.get(shard) == new_owner and previous.pinned.get(shard) != new_owner:
                reason = "move"
            elif owner in new.drained or (owner in snapshot and snapshot[owner].heartbeat.draining):
                reason = "drain"
            else:
                reason = "join"
            report.reasons[reason] += 1
        return report

    def record(self, report: MoveReport, written_at: float | None = None) -> None:
        """The map of ``report`` was written: count the moves and time each failover."""
        written_at = time.monotonic() if written_at is None else written_at
        for reason, count in report.reasons.items():
            self._moves[reason].inc(count)
        for worker_id, detected in report.deaths_detected_at.items():
            self.failover.observe(max(0.0, written_at - detected))
            self._declared_dead.pop(worker_id, None)


class _SupervisorStateCollector(Collector):
    def __init__(self) -> None:
        self.supervisor: Supervisor | None = None

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.supervisor)

    def _families(self, supervisor: Supervisor | None) -> Iterator[Metric]:
        leader = GaugeMetricFamily("sm_supervisor_leader", "1 if this supervisor holds the leader lease")
        live = GaugeMetricFamily("sm_supervisor_live_workers", "Workers heard from within the failure window, not draining")
        unowned = GaugeMetricFamily("sm_shards_unowned", "Shards whose owner is not alive (reported by the leader; 0 on a standby)")
        if supervisor is not None:
            leading = supervisor.is_leader
            leader.add_metric([], 1 if leading else 0)
            live.add_metric([], len(supervisor.membership.live()))
            unowned.add_metric([], supervisor.unowned_shards() if leading else 0)
        yield from (leader, live, unowned)
