"""Request actions (``POST /sessions/{id}/request``), dispatched through one registry.

A handler gets the session's context (a private copy it may change) and the payload, and
returns its result. The worker persists the changed context atomically with the new version,
so a handler never writes anywhere itself. Later features register more handlers here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from sessionmgr.common.errors import UnknownActionError, ValidationFailedError
from sessionmgr.common.validation import check_json_value, check_key

ActionHandler = Callable[[dict[str, Any], Any], Any]


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    handler: ActionHandler
    mutates: bool


class ActionRegistry:
    def __init__(self) -> None:
        self._actions: dict[str, Action] = {}

    def register(self, name: str, *, mutates: bool) -> Callable[[ActionHandler], ActionHandler]:
        def decorator(handler: ActionHandler) -> ActionHandler:
            if name in self._actions:
                raise ValueError(f"action {name!r} registered twice")
            self._actions[name] = Action(name, handler, mutates)
            return handler

        return decorator

    def get(self, name: str) -> Action:
        action = self._actions.get(name)
        if action is None:
            raise UnknownActionError(f"unknown action {name!r}; known actions: {', '.join(sorted(self._actions))}")
        return action

    def names(self) -> list[str]:
        return sorted(self._actions)


class ContextGetPayload(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[str] | None = None


class ContextIncrPayload(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    by: int = 1


def _convert(payload: Any, kind: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.convert(payload, kind)
    except msgspec.ValidationError as exc:
        raise ValidationFailedError(f"payload: {exc}") from None


registry = ActionRegistry()


@registry.register("echo", mutates=False)
def echo(context: dict[str, Any], payload: Any) -> Any:
    return payload


@registry.register("context.set", mutates=True)
def context_set(context: dict[str, Any], payload: Any) -> Any:
    if not isinstance(payload, dict) or not payload:
        raise ValidationFailedError("payload: an object of the keys to set, for example {\"lang\": \"en\"}")
    values: dict[str, Any] = payload
    for key, value in values.items():
        check_key(key, where="payload")
        check_json_value(value, where=f"context.{key}", depth=1)
    context.update(values)
    return {"keys": sorted(values)}


@registry.register("context.get", mutates=False)
def context_get(context: dict[str, Any], payload: Any) -> Any:
    keys = _convert(payload, ContextGetPayload).keys
    if keys is None:
        return dict(context)
    return {key: context[key] for key in keys if key in context}


@registry.register("context.incr", mutates=True)
def context_incr(context: dict[str, Any], payload: Any) -> Any:
    incr = _convert(payload, ContextIncrPayload)
    check_key(incr.key, where="payload.key")
    current = context.get(incr.key, 0)
    if isinstance(current, bool) or not isinstance(current, int):
        raise ValidationFailedError(f"context key {incr.key!r} does not hold an integer")
    value = current + incr.by
    if abs(value) > 2**63 - 1:
        raise ValidationFailedError("counter would overflow a 64-bit integer")
    context[incr.key] = value
    return {"key": incr.key, "value": value}
