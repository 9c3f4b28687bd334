"""One FIFO lock per key, created on demand and dropped when nobody holds or waits for it."""

from __future__ import annotations

import asyncio
from types import TracebackType


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # holders and waiters: the entry goes when the last of them leaves


class KeyedLock:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def hold(self, key: str) -> _Hold:
        """``async with locks.hold(key):`` runs the block while no other holder of ``key`` does."""
        return _Hold(self._entries, key)

    def __len__(self) -> int:
        return len(self._entries)


class _Hold:
    # A plain class instead of @asynccontextmanager: every request takes a lock, and the
    # generator machinery cost more than the lock itself.
    __slots__ = ("_entries", "_key", "_entry")

    def __init__(self, entries: dict[str, _Entry], key: str) -> None:
        self._entries = entries
        self._key = key

    async def __aenter__(self) -> None:
        entry = self._entries.get(self._key)
        if entry is None:
            entry = self._entries[self._key] = _Entry()
        entry.users += 1
        try:
            await entry.lock.acquire()
        except BaseException:  # cancelled while waiting: leave without ever holding it
            self._leave(entry)
            raise
        self._entry = entry

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._entry.lock.release()
        self._leave(self._entry)

    def _leave(self, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._entries[self._key]
