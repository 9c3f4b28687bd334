"""The error contract between workers and callers, and the ID validators that guard subjects."""

from __future__ import annotations

import pytest

from sessionmgr.common import errors
from sessionmgr.common.errors import (
    HEADER_ERROR,
    HEADER_ERROR_CODE,
    HEADER_SM_ERROR,
    InternalError,
    SessionManagerError,
    error_from_headers,
    error_headers,
)
from sessionmgr.common.ids import (
    is_valid_action,
    is_valid_idempotency_key,
    is_valid_session_id,
    new_request_id,
    new_session_id,
    session_id_for_key,
)


def _all_subclasses(cls: type[SessionManagerError]) -> list[type[SessionManagerError]]:
    out: list[type[SessionManagerError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


SUBCLASSES = _all_subclasses(SessionManagerError)


def test_every_error_class_in_the_module_is_covered() -> None:
    in_module = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, SessionManagerError) and obj is not SessionManagerError
    }
    assert in_module <= set(SUBCLASSES)
    assert len(SUBCLASSES) >= 15


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_headers_round_trip_class_and_detail(cls: type[SessionManagerError]) -> None:
    error = cls(f"something about {cls.__name__}")
    headers = error_headers(error)
    assert headers[HEADER_SM_ERROR] == cls.code
    assert headers[HEADER_ERROR_CODE] == str(cls.status)
    back = error_from_headers(headers)
    assert type(back) is cls
    assert back is not None and back.detail == f"something about {cls.__name__}"
    assert back.status == cls.status and back.retryable == cls.retryable


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_default_detail_is_the_title(cls: type[SessionManagerError]) -> None:
    back = error_from_headers(error_headers(cls()))
    assert type(back) is cls and back is not None and back.detail == cls.title


def test_base_class_comes_back_as_internal_error() -> None:
    back = error_from_headers(error_headers(SessionManagerError("boom")))
    assert type(back) is InternalError and back is not None and back.detail == "boom"


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in SUBCLASSES]
    duplicates = sorted({c for c in codes if codes.count(c) > 1})
    assert not duplicates, duplicates


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_retryable_only_on_503(cls: type[SessionManagerError]) -> None:
    assert cls.retryable == (cls.status == 503)


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_status_is_an_http_error(cls: type[SessionManagerError]) -> None:
    assert 400 <= cls.status <= 599
    assert cls.code and cls.code == cls.code.lower() and " " not in cls.code


def test_header_values_are_single_line_and_bounded() -> None:
    error = errors.ValidationFailedError("bad\r\nInjected: header\n\tvalue  " + "x" * 1000)
    headers = error_headers(error)
    for value in headers.values():
        assert "\r" not in value and "\n" not in value and "\t" not in value
    assert headers[HEADER_ERROR].startswith("bad Injected: header value x")
    assert len(headers[HEADER_ERROR]) <= 500


def test_no_error_headers_means_no_error() -> None:
    assert error_from_headers(None) is None
    assert error_from_headers({}) is None
    assert error_from_headers({"Sm-Status": "200", "Sm-Version": "3"}) is None


def test_unknown_or_missing_code_is_an_internal_error() -> None:
    back = error_from_headers({HEADER_ERROR_CODE: "500", HEADER_ERROR: "x", HEADER_SM_ERROR: "no_such_code"})
    assert type(back) is InternalError
    back = error_from_headers({HEADER_ERROR_CODE: "500", HEADER_ERROR: "from a NATS micro service"})
    assert type(back) is InternalError and back is not None and back.detail == "from a NATS micro service"
    back = error_from_headers({HEADER_ERROR_CODE: "500"})
    assert type(back) is InternalError and back is not None and back.detail == InternalError.title


# ---- ids -------------------------------------------------------------------------------------

GOOD_IDS = ["a", "A", "0", "abc-DEF_123", "x" * 64, "-", "_", "Zm9vYmFy", new_session_id()]
BAD_IDS = [
    "",
    ".",
    "a.b",
    "*",
    "a*",
    ">",
    "a>",
    " ",
    "a b",
    "a\tb",
    " a",
    "a ",
    "a\n",
    "a\r\n",
    "\na",
    "%2E",
    "a%2Eb",
    "a/b",
    "a\\b",
    "a:b",
    "a\x00b",
    "x" * 65,
    "\u0430",  # Cyrillic a
    "s\u0435ssion",  # Cyrillic ie in the middle
    "\u0131d",  # dotless i
    "\u212a",  # Kelvin sign (folds to K)
    "\uff11",  # fullwidth digit one
    "\u0661",  # Arabic-Indic digit one
    "a\u200bb",  # zero-width space
    "caf\u00e9",
]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_session_id_accepts_normal_ids(value: str) -> None:
    assert is_valid_session_id(value)


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
def test_session_id_rejects_subject_breakers_and_look_alikes(value: str) -> None:
    assert not is_valid_session_id(value)


def test_generated_ids_are_valid() -> None:
    for _ in range(200):
        assert is_valid_session_id(new_session_id())
    assert len(new_request_id()) == 24


def test_session_id_for_key_is_stable_valid_and_scoped() -> None:
    sid = session_id_for_key("secret", "alice", "key-1")
    assert sid == session_id_for_key("secret", "alice", "key-1")
    assert is_valid_session_id(sid)
    assert sid != session_id_for_key("secret", "bob", "key-1")
    assert sid != session_id_for_key("secret", "alice", "key-2")
    assert sid != session_id_for_key("other-secret", "alice", "key-1")
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert session_id_for_key("s", "ab", "c") != session_id_for_key("s", "a", "bc")


@pytest.mark.parametrize("value", ["echo", "context.get", "context.incr", "a.b.c.d", "x_1", "a" * 32])
def test_action_accepts(value: str) -> None:
    assert is_valid_action(value)


@pytest.mark.parametrize(
    "value",
    ["", ".", "a.", ".a", "a..b", "*", ">", "a.*", "a.>", "A", "Echo", "1abc", "a b", "a\n", "a.b.c.d.e", "a" * 33, "\u0430", "a-b"],
    ids=repr,
)
def test_action_rejects(value: str) -> None:
    assert not is_valid_action(value)


@pytest.mark.parametrize("value", ["k", "order-123:retry#2", "~" * 128, "!"])
def test_idempotency_key_accepts_printable_ascii(value: str) -> None:
    assert is_valid_idempotency_key(value)


@pytest.mark.parametrize("value", ["", " ", "a b", "a\n", "k\r\n", "x" * 129, "\u0430", "a\x7f", "a\x00"], ids=repr)
def test_idempotency_key_rejects(value: str) -> None:
    assert not is_valid_idempotency_key(value)
