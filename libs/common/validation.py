"""Bounds on user-supplied JSON: every size, count and depth is limited."""

from __future__ import annotations

import re
from typing import Any

from sessionmgr.common.errors import LimitExceededError, ValidationFailedError

KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_DEPTH = 8
MAX_STRING = 4096


def check_json_value(value: Any, *, where: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise LimitExceededError(f"{where}: nesting deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise LimitExceededError(f"{where}: string longer than {MAX_STRING} characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_key(key, where=where)
            check_json_value(item, where=f"{where}.{key}", depth=depth + 1)
    elif isinstance(value, list):
        if len(value) > 1000:
            raise LimitExceededError(f"{where}: list longer than 1000 items")
        for index, item in enumerate(value):
            check_json_value(item, where=f"{where}[{index}]", depth=depth + 1)
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise ValidationFailedError(f"{where}: unsupported value type")


def check_key(key: Any, *, where: str) -> None:
    if not isinstance(key, str) or KEY_RE.fullmatch(key) is None:
        raise ValidationFailedError(f"{where}: keys must match [A-Za-z0-9_.:-]{{1,64}}")


def check_metadata(metadata: dict[str, Any], *, max_keys: int) -> None:
    if len(metadata) > max_keys:
        raise LimitExceededError(f"metadata has {len(metadata)} keys; the limit is {max_keys}")
    check_json_value(metadata, where="metadata")
