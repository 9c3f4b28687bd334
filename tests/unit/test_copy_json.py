"""Actions and bots change a copy of the session's context: the stored one stays as it was."""

from __future__ import annotations

from sessionmgr.common.models import copy_json


def test_a_copied_context_is_equal_and_shares_nothing_with_the_original() -> None:
    original = {"n": 1, "name": "bob", "tags": ["a", {"deep": [1, 2]}], "ratio": 0.5, "none": None, "flag": True}
    copy = copy_json(original)
    assert copy == original
    copy["tags"][1]["deep"].append(3)
    copy["n"] += 1
    assert original == {"n": 1, "name": "bob", "tags": ["a", {"deep": [1, 2]}], "ratio": 0.5, "none": None, "flag": True}
