"""Pure webhook rules: which targets an event goes to, what a reply means, when to try again.

No I/O here, so each rule has a unit test (tests/unit/test_webhook_policy.py).

- Filters: ``*`` is every event, ``message.ack`` exactly that type, ``message.*`` every type
  starting with ``message.``.
- A 2xx reply is delivered. A 4xx other than 408 and 429, and a 3xx (redirects are not followed),
  will not change by retrying: dead at once. 408, 429, 5xx, a network error or a timeout are
  retried after ``uniform(base, min(max, base * 2**(attempt-1)))`` seconds (exponential backoff,
  jittered so many failed deliveries do not return together), or after the receiver's
  ``Retry-After`` on 429/503 (capped at the max delay), until ``WEBHOOK_MAX_ATTEMPTS``.
- The signature is ``sha256=hex(HMAC-SHA256(secret, "<timestamp>.<body>"))``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from sessionmgr.common.errors import ValidationFailedError
from sessionmgr.common.models import WebhookConfig
from sessionmgr.common.settings import WEBHOOK_FILTER_RE

MAX_WEBHOOKS_PER_SESSION = 16
MAX_URL_LENGTH = 2048
MAX_FILTERS = 32
MAX_SECRET_LENGTH = 256


class EventFilter:
    """Compiled ``events`` list: a set lookup and a few prefix checks per event."""

    __slots__ = ("_all", "_exact", "_prefixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = list(patterns)
        self._all = "*" in patterns
        self._exact = frozenset(p for p in patterns if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith(".*"))

    def matches(self, event_type: str) -> bool:
        return self._all or event_type in self._exact or (bool(self._prefixes) and event_type.startswith(self._prefixes))


@dataclass(frozen=True, slots=True)
class Target:
    """Where one event goes: ``key`` is ``s<i>`` (session webhook i) or ``g<i>`` (global URL i)."""

    key: str
    url: str
    filter: EventFilter
    secret: str | None
    scope: str  # session | global


def global_targets(urls: Sequence[str], events: Sequence[str]) -> tuple[Target, ...]:
    event_filter = EventFilter(events)
    return tuple(Target(f"g{i}", url, event_filter, None, "global") for i, url in enumerate(urls))


def matching_targets(event_type: str, session_webhooks: Sequence[WebhookConfig], globals_: Sequence[Target]) -> list[Target]:
    """The targets that want ``event_type``; a URL set both per session and globally gets it once (the session's)."""
    chosen: list[Target] = []
    seen: set[str] = set()
    for i, hook in enumerate(session_webhooks):
        event_filter = EventFilter(hook.events)
        if hook.url not in seen and event_filter.matches(event_type):
            seen.add(hook.url)
            chosen.append(Target(f"s{i}", hook.url, event_filter, hook.secret, "session"))
    for target in globals_:
        if target.url not in seen and target.filter.matches(event_type):
            seen.add(target.url)
            chosen.append(target)
    return chosen


def validate_webhooks(hooks: Sequence[WebhookConfig], *, allow_private_networks: bool = True) -> None:
    """Check a session's webhooks where its config is accepted; raises ValidationFailedError.

    ``allow_private_networks=False`` also refuses literal loopback, private and link-local
    addresses and ``localhost`` (a first guard against requests into the operator's network; a
    name that resolves there is not caught).
    """
    if len(hooks) > MAX_WEBHOOKS_PER_SESSION:
        raise ValidationFailedError(f"config.webhooks: at most {MAX_WEBHOOKS_PER_SESSION} webhooks per session")
    for i, hook in enumerate(hooks):
        where = f"config.webhooks[{i}]"
        _check_url(hook.url, where=f"{where}.url", allow_private_networks=allow_private_networks)
        if not 1 <= len(hook.events) <= MAX_FILTERS:
            raise ValidationFailedError(f"{where}.events: 1 to {MAX_FILTERS} event types")
        for pattern in hook.events:
            if not isinstance(pattern, str) or WEBHOOK_FILTER_RE.fullmatch(pattern) is None:
                raise ValidationFailedError(f"{where}.events: {str(pattern)[:64]!r} is not '*', an event type or a prefix such as 'message.*'")
        if hook.secret is not None and not 1 <= len(hook.secret) <= MAX_SECRET_LENGTH:
            raise ValidationFailedError(f"{where}.secret: 1 to {MAX_SECRET_LENGTH} characters")


def _check_url(url: str, *, where: str, allow_private_networks: bool) -> None:
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
        raise ValidationFailedError(f"{where}: at most {MAX_URL_LENGTH} characters")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise ValidationFailedError(f"{where}: no spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValidationFailedError(f"{where}: not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailedError(f"{where}: an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValidationFailedError(f"{where}: no credentials in the URL (use the webhook secret)")
    if not allow_private_networks and _is_private_host(parts.hostname):
        raise ValidationFailedError(f"{where}: private, loopback and link-local addresses are not allowed")


def _is_private_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_private or address.is_loopback or address.is_link_local or address.is_reserved or address.is_unspecified


# ---- after an attempt ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    action: str  # ack | retry | dead
    delay: float = 0.0


DELIVERED = Step("ack")
DEAD = Step("dead")


def is_retryable(status: int | None) -> bool:
    """None is a network error or timeout."""
    return status is None or status in (408, 429) or status >= 500


def next_step(
    status: int | None,
    attempt: int,
    *,
    max_attempts: int,
    base_delay: float,
    max_delay: float,
    retry_after: str | None = None,
    rng: random.Random | None = None,
    now: float | None = None,
) -> Step:
    """What to do after attempt number ``attempt`` (1-based) got ``status``."""
    if status is not None and 200 <= status < 300:
        return DELIVERED
    if not is_retryable(status) or attempt >= max_attempts:
        return DEAD
    if status in (429, 503) and retry_after:
        asked = parse_retry_after(retry_after, now=now)
        if asked is not None:
            return Step("retry", min(asked, max_delay))
    return Step("retry", backoff_delay(attempt, base_delay, max_delay, rng))


def backoff_delay(attempt: int, base_delay: float, max_delay: float, rng: random.Random | None = None) -> float:
    cap = min(max_delay, base_delay * 2 ** min(max(attempt - 1, 0), 40))
    return (rng or random).uniform(base_delay, cap)


def parse_retry_after(value: str, *, now: float | None = None) -> float | None:
    """``Retry-After``: delay-seconds or an HTTP date; None when unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(min(int(value[:12]), 10**9))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"
