"""Webhook rules without I/O: filters, target choice, validation, status codes, backoff, signature."""

from __future__ import annotations

import hashlib
import hmac
import random
from email.utils import format_datetime
from datetime import UTC, datetime

import msgspec
import pytest

from sessionmgr.common.errors import ValidationFailedError
from sessionmgr.common.models import WebhookConfig
from sessionmgr.common.webhook_models import DeadLetterQuery, RedriveRequest, dead_letter_query_decoder, redrive_request_decoder
from sessionmgr.worker.webhook_policy import (
    EventFilter,
    backoff_delay,
    global_targets,
    matching_targets,
    next_step,
    parse_retry_after,
    sign,
    validate_webhooks,
)

POLICY = {"max_attempts": 6, "base_delay": 1.0, "max_delay": 300.0}


@pytest.mark.parametrize(
    ("patterns", "event_type", "expected"),
    [
        (["*"], "message.ack", True),
        (["message"], "message", True),
        (["message"], "message.ack", False),
        (["message.*"], "message.ack", True),
        (["message.*"], "message", False),
        (["message.*"], "messages.x", False),
        (["created", "request.*"], "request.applied", True),
        (["created", "request.*"], "terminated", False),
        ([], "created", False),
    ],
)
def test_event_filter(patterns: list[str], event_type: str, expected: bool) -> None:
    assert EventFilter(patterns).matches(event_type) is expected


def test_targets_session_first_then_global_each_url_once() -> None:
    hooks = [
        WebhookConfig(url="https://a.example/h", events=["message.*"], secret="s1"),
        WebhookConfig(url="https://b.example/h", events=["created"]),
        WebhookConfig(url="https://g.example/h", events=["*"], secret="own"),
    ]
    globals_ = global_targets(["https://g.example/h", "https://h.example/h"], ["message", "message.*"])
    chosen = matching_targets("message.ack", hooks, globals_)
    assert [(t.key, t.url, t.secret, t.scope) for t in chosen] == [
        ("s0", "https://a.example/h", "s1", "session"),
        ("s2", "https://g.example/h", "own", "session"),  # the same URL globally is not sent twice
        ("g1", "https://h.example/h", None, "global"),
    ]
    assert matching_targets("updated", hooks[:2], ()) == []


def test_validate_webhooks_accepts_good_config() -> None:
    validate_webhooks([WebhookConfig(url="https://hooks.example.com/wa?x=1", events=["*", "message.*", "session.status"], secret="k")])
    validate_webhooks([WebhookConfig(url="http://127.0.0.1:8080/hook")])
    validate_webhooks([])


@pytest.mark.parametrize(
    "hooks",
    [
        [WebhookConfig(url=f"https://h.example/{i}") for i in range(17)],
        [WebhookConfig(url="ftp://h.example/x")],
        [WebhookConfig(url="https:///nohost")],
        [WebhookConfig(url="https://user:pw@h.example/")],
        [WebhookConfig(url="https://h.example/" + "a" * 2048)],
        [WebhookConfig(url="https://h.example/a b")],
        [WebhookConfig(url="https://h.example:99999/")],
        [WebhookConfig(url="https://h.example/", events=[])],
        [WebhookConfig(url="https://h.example/", events=["Message"])],
        [WebhookConfig(url="https://h.example/", events=["message.*.x"])],
        [WebhookConfig(url="https://h.example/", events=["*"] * 33)],
        [WebhookConfig(url="https://h.example/", secret="")],
        [WebhookConfig(url="https://h.example/", secret="x" * 257)],
    ],
)
def test_validate_webhooks_refuses(hooks: list[WebhookConfig]) -> None:
    with pytest.raises(ValidationFailedError):
        validate_webhooks(hooks)


@pytest.mark.parametrize("url", ["http://localhost/h", "http://127.0.0.1/h", "http://10.1.2.3/h", "http://169.254.169.254/latest", "http://[::1]/h"])
def test_validate_webhooks_can_refuse_private_networks(url: str) -> None:
    validate_webhooks([WebhookConfig(url=url)])
    with pytest.raises(ValidationFailedError):
        validate_webhooks([WebhookConfig(url=url)], allow_private_networks=False)
    validate_webhooks([WebhookConfig(url="https://hooks.example.com/")], allow_private_networks=False)


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert next_step(status, 1, **POLICY).action == "ack"


@pytest.mark.parametrize("status", [301, 302, 400, 401, 403, 404, 410, 413, 422])
def test_other_4xx_and_redirects_are_dead_at_once(status: int) -> None:
    assert next_step(status, 1, **POLICY).action == "dead"


@pytest.mark.parametrize("status", [None, 408, 429, 500, 502, 503, 504])
def test_transient_failures_retry_until_max_attempts(status: int | None) -> None:
    assert next_step(status, 1, **POLICY).action == "retry"
    assert next_step(status, 5, **POLICY).action == "retry"
    assert next_step(status, 6, **POLICY).action == "dead"


def test_backoff_is_exponential_jittered_and_capped() -> None:
    rng = random.Random(7)
    for attempt in range(1, 30):
        cap = min(300.0, 1.0 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 1.0, 300.0, rng) for _ in range(50)]
        assert all(1.0 <= d <= cap for d in delays)
        if cap >= 8:
            assert max(delays) - min(delays) > cap / 10  # spread, not one value
    assert backoff_delay(10_000, 0.05, 0.2) <= 0.2  # no overflow on absurd attempt counts


def test_retry_after_is_honoured_on_429_and_503_within_the_max_delay() -> None:
    assert next_step(429, 1, **POLICY, retry_after="7").delay == 7.0
    assert next_step(503, 1, **POLICY, retry_after="100000").delay == 300.0
    assert next_step(429, 1, **POLICY, retry_after="0").delay == 0.0
    when = format_datetime(datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC), usegmt=True)
    now = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert next_step(503, 1, **POLICY, retry_after=when, now=now).delay == pytest.approx(30.0)
    # Elsewhere, or unreadable, the usual backoff applies.
    assert 1.0 <= next_step(500, 1, **POLICY, retry_after="7").delay <= 1.0
    assert 1.0 <= next_step(429, 2, **POLICY, retry_after="soon").delay <= 2.0


@pytest.mark.parametrize(("value", "expected"), [("12", 12.0), (" 3 ", 3.0), ("-1", None), ("1.5", None), ("", None), ("Wed, 21 Oct", None)])
def test_parse_retry_after(value: str, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"id":"e1","type":"created"}'
    expected = hmac.new(b"secret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("secret", 1700000000, body) == f"sha256={expected}"
    assert sign("secret", 1700000001, body) != sign("secret", 1700000000, body)


def test_operator_messages_are_bounded() -> None:
    assert dead_letter_query_decoder.decode(b"{}") == DeadLetterQuery()
    for bad in (b'{"limit": 0}', b'{"limit": 101}', b'{"after": -1}', b'{"session_id": "a.b"}', b'{"extra": 1}'):
        with pytest.raises(msgspec.ValidationError):
            dead_letter_query_decoder.decode(bad)
    assert redrive_request_decoder.decode(b'{"ids": [3, 4]}') == RedriveRequest(ids=[3, 4])
    with pytest.raises(msgspec.ValidationError):
        redrive_request_decoder.decode(msgspec.json.encode({"ids": list(range(1, 1002))}))
    with pytest.raises(msgspec.ValidationError):
        redrive_request_decoder.decode(b'{"ids": [0]}')


def test_webhook_events_setting_is_checked_at_start() -> None:
    from sessionmgr.common.settings import SettingsError, load_settings

    assert load_settings({"WEBHOOK_EVENTS": "created, message.*"}).webhook_event_filter == ["created", "message.*"]
    with pytest.raises(SettingsError, match="WEBHOOK_EVENTS"):
        load_settings({"WEBHOOK_EVENTS": "created,Message Ack"})
    with pytest.raises(SettingsError, match="WEBHOOK_URL"):
        load_settings({"WEBHOOK_URL": "ftp://h.example/x"})
