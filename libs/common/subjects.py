"""Every NATS subject the system uses, built in one place from validated parts.

Request subjects:  ``sm.shard.<p>.<session_id>.<op>`` (workers, queue group ``shard-<p>``)
CLI subjects:      ``sessions.<session_id>.<op>``, mapped by nats.conf onto the one above
Heartbeats:        ``sm.hb.<worker_id>``; graceful leave: ``sm.bye.<worker_id>``
Queries:           ``sm.query.list`` (any worker, queue group ``query``)
Events:            ``sm.events.<session_id>.<type>``
Worker control:    ``sm.ctl.<worker_id>.release`` (shard handoff), ``sm.ctl.<worker_id>.ping``
Hints:             ``sm.hint.unreachable`` (gateway saw no responders on a shard; body: shard number)
Operator (leader): ``sm.admin.status``, ``sm.admin.drain``, ``sm.admin.move``
"""

from __future__ import annotations

from sessionmgr.common.hashing import shard_for

SHARD_PREFIX = "sm.shard"
CLI_PREFIX = "sessions"
HEARTBEAT_PREFIX = "sm.hb"
BYE_PREFIX = "sm.bye"
QUERY_LIST = "sm.query.list"
QUERY_QUEUE = "query"
EVENTS_PREFIX = "sm.events"
SHARD_MAP_BUCKET = "sm-shard-map"
SHARD_MAP_KEY = "map"
LEADER_KEY = "leader"
ADMIN_STATUS = "sm.admin.status"
ADMIN_DRAIN = "sm.admin.drain"
ADMIN_MOVE = "sm.admin.move"

# Operations on the session itself; everything else after the session ID is a request action.
OP_CREATE = "session.create"
OP_GET = "session.get"
OP_UPDATE = "session.update"
OP_DELETE = "session.delete"
SESSION_OPS = frozenset({OP_CREATE, OP_GET, OP_UPDATE, OP_DELETE})


def shard_subject(shard: int, session_id: str, op: str) -> str:
    return f"{SHARD_PREFIX}.{shard}.{session_id}.{op}"


def session_subject(session_id: str, op: str, shard_count: int) -> str:
    return shard_subject(shard_for(session_id, shard_count), session_id, op)


def shard_wildcard(shard: int) -> str:
    return f"{SHARD_PREFIX}.{shard}.>"


def shard_queue(shard: int, epoch: int) -> str:
    """One queue group per ownership epoch.

    Within an epoch NATS gives each request to one subscriber. A new epoch is a new group, so a
    paused former owner whose subscription the server still holds cannot swallow every other
    request: the new owner gets each one too, and the old owner's late answer is fenced.
    """
    return f"shard-{shard}-e{epoch}"


def parse_shard_subject(subject: str) -> tuple[int, str, str]:
    """``sm.shard.<p>.<sid>.<op...>`` -> (p, sid, op); raises ValueError on anything else."""
    parts = subject.split(".", 4)
    if len(parts) != 5 or parts[0] != "sm" or parts[1] != "shard":
        raise ValueError(f"not a shard subject: {subject!r}")
    return int(parts[2]), parts[3], parts[4]


def heartbeat_subject(worker_id: str) -> str:
    return f"{HEARTBEAT_PREFIX}.{worker_id}"


def bye_subject(worker_id: str) -> str:
    return f"{BYE_PREFIX}.{worker_id}"


def release_subject(worker_id: str) -> str:
    return f"sm.ctl.{worker_id}.release"


def ping_subject(worker_id: str) -> str:
    return f"sm.ctl.{worker_id}.ping"


# A gateway that got "no responders" for a shard tells the supervisor, which probes the owner.
UNREACHABLE_HINT = "sm.hint.unreachable"


def event_subject(session_id: str, event_type: str) -> str:
    return f"{EVENTS_PREFIX}.{session_id}.{event_type}"
