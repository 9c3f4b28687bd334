"""Wire and storage models. Every payload that crosses a process boundary is one of these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

JsonObject = dict[str, Any]


# ---- WhatsApp connection, config and messages (issue 7) ---------------------------------------

CONNECTION_STATUSES = ("STOPPED", "STARTING", "SCAN_QR_CODE", "WORKING", "FAILED")


class WebhookConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Where a session's events go. ``events`` filters by event type (``*`` for all, or a prefix
    such as ``message.*``); ``secret`` is the HMAC-SHA256 key for the signature header."""

    url: str
    events: list[str] = msgspec.field(default_factory=lambda: ["*"])
    secret: str | None = None


class SessionConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    engine: str | None = None  # None: WHATSAPP_DEFAULT_ENGINE
    bot: str | None = None  # a bot handler's entry-point name (echo, menu), or None for no bot
    webhooks: list[WebhookConfig] = []


class LinkedAccount(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The WhatsApp account a session is linked to once paired (WAHA's ``me``)."""

    id: str  # <phone>@c.us
    push_name: str | None = None


class Connection(msgspec.Struct, kw_only=True):
    status: str = "STOPPED"  # one of CONNECTION_STATUSES
    since: datetime | None = None
    me: LinkedAccount | None = None
    last_error: str | None = None
    failures: int = 0  # consecutive failed connection attempts (the crash-loop guard counts these)


class ChatMessage(msgspec.Struct, kw_only=True):
    """One message of a session's bounded history (``message.list``)."""

    id: str
    chat_id: str
    from_me: bool
    text: str
    timestamp: datetime
    status: str  # outbound: pending | sent | delivered | read | failed; inbound: received
    seq: int = 0


class Session(msgspec.Struct, kw_only=True):
    """A session as stored in Redis and held in a worker's memory."""

    session_id: str
    user_id: str
    state: str
    version: int
    created_at: datetime
    last_updated: datetime
    expires_at: datetime
    metadata: JsonObject = {}
    context: JsonObject = {}
    config: SessionConfig = msgspec.field(default_factory=SessionConfig)
    connection: Connection = msgspec.field(default_factory=Connection)
    message_seq: int = 0  # last message sequence number given out (history order)


class SessionView(msgspec.Struct, kw_only=True):
    """A session as clients see it (REST and NATS replies)."""

    session_id: str
    user_id: str
    state: str
    version: int
    created_at: datetime
    last_updated: datetime
    expires_at: datetime
    metadata: JsonObject
    context: JsonObject
    config: SessionConfig
    connection: Connection


def redacted(config: SessionConfig) -> SessionConfig:
    """Webhook secrets are write-only: views say one is set, never what it is."""
    if not any(hook.secret for hook in config.webhooks):
        return config
    hooks = [msgspec.structs.replace(h, secret="***") if h.secret else h for h in config.webhooks]
    return msgspec.structs.replace(config, webhooks=hooks)


def view_of(session: Session) -> SessionView:
    return SessionView(
        session_id=session.session_id,
        user_id=session.user_id,
        state=session.state,
        version=session.version,
        created_at=session.created_at,
        last_updated=session.last_updated,
        expires_at=session.expires_at,
        metadata=session.metadata,
        context=session.context,
        config=redacted(session.config),
        connection=session.connection,
    )


# ---- REST bodies -------------------------------------------------------------------------


class CreateSessionBody(msgspec.Struct, forbid_unknown_fields=True):
    metadata: JsonObject = {}
    config: SessionConfig | None = None


class UpdateSessionBody(msgspec.Struct, forbid_unknown_fields=True):
    state: str | UnsetType = UNSET
    metadata: JsonObject | UnsetType = UNSET
    config: SessionConfig | UnsetType = UNSET


class ActionBody(msgspec.Struct, forbid_unknown_fields=True):
    action: str
    payload: JsonObject = {}


class ActionResult(msgspec.Struct, kw_only=True):
    request_id: str
    action: str
    result: Any
    version: int


class SessionPage(msgspec.Struct, kw_only=True):
    items: list[SessionView]
    next_cursor: str | None


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None


# ---- NATS commands (what the gateway or the CLI sends to a worker) -------------------------


class CreateSessionCommand(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    user_id: str | None = None  # the gateway sends it as a header; the CLI may put it here
    metadata: JsonObject = {}
    config: SessionConfig | None = None


class UpdateSessionCommand(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    state: str | UnsetType = UNSET
    metadata: JsonObject | UnsetType = UNSET
    config: SessionConfig | UnsetType = UNSET
    expected_version: int | None = None


class ListSessionsQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    user_id: str
    limit: int = 50
    cursor: str | None = None


# ---- Cluster membership ------------------------------------------------------------------


class Heartbeat(msgspec.Struct, kw_only=True):
    worker_id: str
    pid: int
    host: str
    started_at: float
    seq: int
    sessions: int
    in_flight: int
    shards: list[int]
    draining: bool = False
    degraded: bool = False  # Redis unreachable or changes queued (degraded mode)


class WorkerBye(msgspec.Struct, kw_only=True):
    worker_id: str


class ShardOwner(msgspec.Struct, kw_only=True, array_like=True):
    owner: str | None
    epoch: int
    # The live worker the shard is moving away from: the new owner asks it to finish and
    # release first. None after a death (nobody to wait for; the epoch fences it anyway).
    previous: str | None = None


class ShardMap(msgspec.Struct, kw_only=True):
    """The whole map in one KV value so every change is one atomic compare-and-set.

    ``term`` is the supervisor leadership term that wrote it: a deposed leader's write carries an
    old revision and is rejected by the KV's compare-and-set.
    """

    term: int
    shards: list[ShardOwner]
    updated_at: float
    drained: list[str] = []  # operators drained these workers: they get no shards
    pinned: dict[int, str] = {}  # operator moves: shard -> worker, honoured while it is live

    def owner_of(self, shard: int) -> ShardOwner:
        return self.shards[shard]


class ReleaseShard(msgspec.Struct, kw_only=True):
    """New owner -> old owner: stop intake, finish in-flight requests, let go, then reply."""

    shard: int
    epoch: int


class WorkerInfo(msgspec.Struct, kw_only=True):
    worker_id: str
    pid: int
    host: str
    shards: list[int]
    sessions: int
    in_flight: int
    draining: bool
    last_heartbeat_age_s: float
    live: bool


class ClusterStatus(msgspec.Struct, kw_only=True):
    leader: str
    term: int
    workers: list[WorkerInfo]
    shard_map: ShardMap


class DrainWorker(msgspec.Struct, kw_only=True):
    worker_id: str
    undrain: bool = False


class MoveShard(msgspec.Struct, kw_only=True):
    shard: int
    worker_id: str


class AdminReply(msgspec.Struct, kw_only=True):
    ok: bool
    detail: str


class LeaderLease(msgspec.Struct, kw_only=True):
    holder: str
    term: int
    renewed_at: float


class SessionEvent(msgspec.Struct, kw_only=True):
    """Published on ``sm.events.<session_id>.<type>`` after the change it describes was persisted."""

    id: str
    # created | updated | terminated | expired | request.applied | session.status | message | message.ack
    type: str
    session_id: str
    user_id: str
    version: int
    timestamp: datetime
    data: Any = None


class QueuedReply(msgspec.Struct, kw_only=True):
    """The 202 body: the change is stored durably and will be applied when storage is back."""

    request_id: str
    status: str


class QueuedRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A change accepted while Redis was down, replayed by the shard's owner when it is back."""

    request_id: str
    session_id: str
    op: str
    payload: bytes
    headers: dict[str, str]
    queued_at: datetime


class RequestStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``GET /sessions/{id}/requests/{request_id}``: queued, applied (with the result) or rejected."""

    request_id: str
    session_id: str
    status: str  # queued | applied | rejected
    user_id: str | None = None
    queued_at: datetime | None = None
    applied_at: datetime | None = None
    http_status: int | None = None
    result: Any = None
    error: dict[str, Any] | None = None


# Cached codecs: building them per call costs more than the encode itself.
json_encoder = msgspec.json.Encoder()
session_decoder = msgspec.json.Decoder(Session)
session_view_decoder = msgspec.json.Decoder(SessionView)
heartbeat_decoder = msgspec.json.Decoder(Heartbeat)
shard_map_decoder = msgspec.json.Decoder(ShardMap)
lease_decoder = msgspec.json.Decoder(LeaderLease)
event_decoder = msgspec.json.Decoder(SessionEvent)
queued_request_decoder = msgspec.json.Decoder(QueuedRequest)
request_status_decoder = msgspec.json.Decoder(RequestStatus)
_any_json_decoder = msgspec.json.Decoder()


def copy_json(value: Any) -> Any:
    """A deep copy of JSON data (a session's context): an encode/decode round trip in msgspec is
    5 to 8 times faster than ``copy.deepcopy`` and gives the same data for anything JSON holds."""
    return _any_json_decoder.decode(json_encoder.encode(value))
