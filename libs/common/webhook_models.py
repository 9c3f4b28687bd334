"""Webhook delivery records and the dead-letter operator API (issue 7).

A delivery is one event for one target URL. It waits on ``sm.webhooks.deliver.<session_id>`` in the
``SM_WEBHOOKS`` work-queue stream until a worker's POST succeeds (acked, so it leaves the stream)
or gives up; then it moves, with why, to ``sm.webhooks.dead.<session_id>`` in ``SM_WEBHOOKS_DLQ``.
Operators list and redrive dead letters over ``sm.webhooks.admin.*`` (any worker answers) or the
gateway's ``/webhooks/dead-letters`` routes, which forward there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sessionmgr.common.models import SessionEvent

WEBHOOKS_STREAM = "SM_WEBHOOKS"
DEAD_LETTER_STREAM = "SM_WEBHOOKS_DLQ"
DELIVER_PREFIX = "sm.webhooks.deliver"
DEAD_PREFIX = "sm.webhooks.dead"
ADMIN_DEAD_LETTERS = "sm.webhooks.admin.dead-letters"
ADMIN_REDRIVE = "sm.webhooks.admin.redrive"
ADMIN_QUEUE = "webhooks-admin"

MAX_PAGE = 100  # dead letters per list reply
MAX_REDRIVE = 1000  # dead letters moved back per redrive request


def deliver_subject(session_id: str) -> str:
    return f"{DELIVER_PREFIX}.{session_id}"


def dead_subject(session_id: str) -> str:
    return f"{DEAD_PREFIX}.{session_id}"


class WebhookDelivery(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One event for one target, as kept in ``SM_WEBHOOKS`` until delivered or dead."""

    id: str  # <event id>.<s|g><index>: the target's place among the session's (s) or global (g) webhooks
    event_id: str
    event_type: str
    session_id: str
    url: str
    target: Literal["session", "global"]
    enqueued_at: datetime
    event: msgspec.Raw  # the event's JSON, sent byte for byte as the request body (and signed as such)
    # A session webhook's own key; None means WEBHOOK_SECRET, read by the delivering worker.
    secret: str | None = None


class DeadLetter(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A delivery that will not be retried any more, and why (``SM_WEBHOOKS_DLQ``)."""

    delivery: WebhookDelivery
    attempts: int
    last_error: str
    failed_at: datetime
    last_status: int | None = None  # the receiver's HTTP status; None for a network error or timeout


class DeadLetterView(msgspec.Struct, kw_only=True):
    """A dead letter as operators see it: never the secret."""

    id: int  # its sequence in SM_WEBHOOKS_DLQ: what a redrive names
    delivery_id: str
    event_id: str
    event_type: str
    session_id: str
    url: str
    target: str
    attempts: int
    last_status: int | None
    last_error: str
    enqueued_at: datetime
    failed_at: datetime
    event: SessionEvent


class DeadLetterQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A page of dead letters, oldest first, after sequence ``after``."""

    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 50
    after: Annotated[int, Meta(ge=0)] = 0
    session_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None


class DeadLetterPage(msgspec.Struct, kw_only=True):
    items: list[DeadLetterView]
    next_after: int | None  # pass as ``after`` for the next page; None: this was the last
    total: int  # dead letters kept (all sessions)


class RedriveRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Move dead letters back to delivery: the given ``ids``, or ``all`` (of one session if named)."""

    ids: Annotated[list[Annotated[int, Meta(ge=1)]], Meta(max_length=MAX_REDRIVE)] = []
    all: bool = False
    session_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None


class RedriveReply(msgspec.Struct, kw_only=True):
    redriven: list[int]  # ids moved back to SM_WEBHOOKS
    missing: list[int]  # ids asked for that are not (or no longer) dead letters
    more: bool  # ``all`` stopped at MAX_REDRIVE: ask again


webhook_json = msgspec.json.Encoder()
delivery_decoder = msgspec.json.Decoder(WebhookDelivery)
dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
dead_letter_query_decoder = msgspec.json.Decoder(DeadLetterQuery)
dead_letter_page_decoder = msgspec.json.Decoder(DeadLetterPage)
redrive_request_decoder = msgspec.json.Decoder(RedriveRequest)
redrive_reply_decoder = msgspec.json.Decoder(RedriveReply)
