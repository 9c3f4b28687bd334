"""The session state machine that ``PUT /sessions/{id}`` is checked against.

    active <-> idle          a bot that is connected but quiet
    active|idle -> suspended an operator pauses the session
    suspended -> active      resumed

Deleting a session is ``DELETE``, not a state. A new session starts ``active``.
"""

from __future__ import annotations

from sessionmgr.common.errors import InvalidTransitionError, ValidationFailedError

INITIAL_STATE = "active"
TRANSITIONS: dict[str, frozenset[str]] = {
    "active": frozenset({"idle", "suspended"}),
    "idle": frozenset({"active", "suspended"}),
    "suspended": frozenset({"active"}),
}
STATES = frozenset(TRANSITIONS)


def check_transition(current: str, wanted: str) -> None:
    if wanted not in STATES:
        raise ValidationFailedError(f"unknown state {wanted!r}; states are {', '.join(sorted(STATES))}")
    if wanted == current:
        return
    allowed = TRANSITIONS.get(current, frozenset())
    if wanted not in allowed:
        names = ", ".join(sorted(allowed)) or "none"
        raise InvalidTransitionError(f"cannot go from {current!r} to {wanted!r}; allowed from {current!r}: {names}")
