"""The worker's hot copy of the sessions it owns: a bounded LRU keyed by session ID."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from sessionmgr.common.models import Session


class SessionCache:
    def __init__(self, max_sessions: int) -> None:
        self._max = max_sessions
        self._items: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def sessions(self) -> Iterable[Session]:
        """The sessions held, read-only (metrics count them by state)."""
        return self._items.values()

    def get(self, session_id: str) -> Session | None:
        session = self._items.get(session_id)
        if session is not None:
            self._items.move_to_end(session_id)
        return session

    def put(self, session: Session) -> None:
        self._items[session.session_id] = session
        self._items.move_to_end(session.session_id)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def evict(self, session_id: str) -> None:
        self._items.pop(session_id, None)

    def evict_where(self, predicate: Callable[[str], bool]) -> int:
        doomed = [sid for sid in self._items if predicate(sid)]
        for sid in doomed:
            del self._items[sid]
        return len(doomed)
