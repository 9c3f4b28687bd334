"""Leader lease in JetStream KV, held by compare-and-set on the key's revision.

The leader renews every ``renew_interval``; a standby that sees the revision unchanged for
``ttl`` (judged on its own monotonic clock, so clocks need not agree) takes the key over with
``term + 1``. A deposed leader's next renewal fails its compare-and-set and it steps down.
"""

from __future__ import annotations

import time

import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from sessionmgr.common.models import LeaderLease, json_encoder, lease_decoder
from sessionmgr.common.subjects import LEADER_KEY

log = structlog.get_logger(__name__)


class LeaderLeaseHolder:
    def __init__(self, kv: KeyValue, holder: str, ttl: float) -> None:
        self._kv = kv
        self._holder = holder
        self._ttl = ttl
        self.term = 0
        self._revision: int | None = None
        self._renewed_at = 0.0  # monotonic time of our last successful write
        self._seen_revision: int | None = None
        self._seen_since = 0.0

    @property
    def is_leader(self) -> bool:
        # Stop acting as leader before the standby may take over: never two leaders at once.
        return self._revision is not None and time.monotonic() - self._renewed_at < self._ttl * 0.8

    async def tick(self) -> bool:
        """Renew or try to acquire; returns whether we lead after this tick."""
        now = time.monotonic()
        if self._revision is not None:
            try:
                self._revision = await self._kv.update(LEADER_KEY, self._encode(), last=self._revision)
                self._renewed_at = now
                return True
            except KeyWrongLastSequenceError:
                log.warning("leadership_lost", term=self.term)
                self._revision = None
        try:
            entry = await self._kv.get(LEADER_KEY)
        except KeyNotFoundError:
            entry = None
        if entry is None or entry.value is None or entry.operation is not None:
            return await self._claim(None, 1)
        lease = lease_decoder.decode(entry.value)
        if entry.revision != self._seen_revision:
            self._seen_revision, self._seen_since = entry.revision, now
            return False
        if now - self._seen_since >= self._ttl:
            return await self._claim(entry.revision, lease.term + 1)
        return False

    async def _claim(self, last: int | None, term: int) -> bool:
        previous_term = self.term
        self.term = term
        try:
            if last is None:
                self._revision = await self._kv.create(LEADER_KEY, self._encode())
            else:
                self._revision = await self._kv.update(LEADER_KEY, self._encode(), last=last)
        except Exception:  # noqa: BLE001 - another standby won the race
            self.term = previous_term
            self._revision = None
            return False
        self._renewed_at = time.monotonic()
        log.info("leadership_acquired", term=term)
        return True

    async def resign(self) -> None:
        if self._revision is None:
            return
        try:
            await self._kv.delete(LEADER_KEY, last=self._revision)
        except Exception:  # noqa: BLE001 - the lease lapses by itself
            pass
        self._revision = None

    def _encode(self) -> bytes:
        return json_encoder.encode(LeaderLease(holder=self._holder, term=self.term, renewed_at=time.time()))
