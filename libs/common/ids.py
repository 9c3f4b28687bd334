"""Session IDs: the only user-chosen text that ever reaches a NATS subject or a Redis key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import re
import secrets

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Actions are dotted lower-case words; they become the tail of a NATS subject.
ACTION_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){0,3}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


def is_valid_user_id(value: str) -> bool:
    """User IDs (a token's ``sub``) travel in NATS headers, which trim whitespace: allow none."""
    return 1 <= len(value) <= 128 and value.isprintable() and not any(c.isspace() for c in value)


def is_valid_session_id(value: str) -> bool:
    # re's ``$`` also matches before a trailing newline; fullmatch does not.
    return SESSION_ID_RE.fullmatch(value) is not None


def is_valid_action(value: str) -> bool:
    return ACTION_RE.fullmatch(value) is not None


def is_valid_idempotency_key(value: str) -> bool:
    return IDEMPOTENCY_KEY_RE.fullmatch(value) is not None


def new_session_id() -> str:
    return secrets.token_urlsafe(16)


def new_request_id() -> str:
    """24 hex characters, unique but not secret (request and event IDs, deduplication keys):
    the process's Mersenne Twister (seeded from the OS at start-up) instead of a system call
    for each of the two or three IDs a request makes."""
    return f"{random.getrandbits(96):024x}"


def session_id_for_key(secret: str, user_id: str, idempotency_key: str) -> str:
    """A create retried with the same Idempotency-Key must name the same session (and shard)."""
    mac = hmac.new(secret.encode(), f"{user_id}\x00{idempotency_key}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:16]).rstrip(b"=").decode()
