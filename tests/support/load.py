"""Concurrent increment load with idempotency keys, and the checks that prove nothing was lost.

Each logical increment keeps its Idempotency-Key across retries, as a careful client would, so
in the end every one of them is acknowledged exactly once. Then for every session the
acknowledged values must be exactly 1..N: a lost write leaves the counter short, a write applied
twice (or by a stale owner working from old memory) leaves a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import httpx


@dataclass
class Ack:
    session_id: str
    key: str
    value: int
    version: int


@dataclass
class LoadReport:
    acks: list[Ack] = field(default_factory=list)
    failed_attempts: int = 0  # client-visible errors that were retried
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def by_session(self) -> dict[str, list[Ack]]:
        grouped: dict[str, list[Ack]] = defaultdict(list)
        for ack in self.acks:
            grouped[ack.session_id].append(ack)
        return grouped


class IncrementLoad:
    def __init__(self, api: httpx.AsyncClient, headers: dict[str, str], sessions: list[str], clients: int = 8) -> None:
        self._api = api
        self._headers = headers
        self._sessions = sessions
        self._clients = clients
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.report = LoadReport()
        self._progress = asyncio.Condition()

    async def __aenter__(self) -> IncrementLoad:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self._clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def wait_acks(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` more increments have been acknowledged (proves progress)."""
        target = len(self.report.acks) + count
        async with self._progress:
            await asyncio.wait_for(self._progress.wait_for(lambda: len(self.report.acks) >= target), timeout)

    async def _client(self, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            sid = self._sessions[turn % len(self._sessions)]
            turn += 1
            key = uuid.uuid4().hex
            await self._increment_until_acked(sid, key)

    async def _increment_until_acked(self, sid: str, key: str) -> None:
        deadline = time.monotonic() + 60
        last = "none"
        while time.monotonic() < deadline:
            try:
                response = await self._api.post(
                    f"/sessions/{sid}/request",
                    json={"action": "context.incr", "payload": {"key": "n", "by": 1}},
                    headers={**self._headers, "Idempotency-Key": key},
                    timeout=30,
                )
            except httpx.HTTPError as exc:
                self.report.failed_attempts += 1
                last = repr(exc)
                continue
            self.report.statuses[response.status_code] += 1
            if response.status_code == 200:
                body = response.json()
                self.report.acks.append(Ack(sid, key, body["result"]["value"], body["version"]))
                async with self._progress:
                    self._progress.notify_all()
                return
            self.report.failed_attempts += 1
            last = f"{response.status_code} {response.text[:200]}"
            await asyncio.sleep(0.05)
        raise AssertionError(f"increment {key} on {sid} never acknowledged; last answer {last}; statuses {dict(self.report.statuses)}")


async def assert_exactly_once(api: httpx.AsyncClient, headers: dict[str, str], report: LoadReport, sessions: list[str]) -> None:
    grouped = report.by_session()
    for sid in sessions:
        acks = grouped.get(sid, [])
        values = sorted(a.value for a in acks)
        assert values == list(range(1, len(acks) + 1)), f"{sid}: acknowledged values are not 1..{len(acks)}: gaps or duplicates"
        keys = [a.key for a in acks]
        assert len(set(keys)) == len(keys), f"{sid}: a key was acknowledged twice"
        versions = [a.version for a in sorted(acks, key=lambda a: a.value)]
        assert versions == sorted(set(versions)), f"{sid}: versions did not only rise"
        response = await api.get(f"/sessions/{sid}", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["context"].get("n", 0) == len(acks), f"{sid}: stored counter != acknowledged increments"
