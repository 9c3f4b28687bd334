"""Durable session state in Redis, written only through fenced compare-and-set Lua scripts.

Keys carry the shard as their hash tag (``sm:{<p>}:...``) so the fencing epoch, the session and
its idempotency record share one cluster slot and one script can check and write them all
atomically; ARCHITECTURE.md's per-session tag could not fence in one script under Redis Cluster.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.asyncio import Redis

from sessionmgr.common.hashing import shard_for
from sessionmgr.common.redis_pipelined import PipelinedRedis, PipelinedScript
from sessionmgr.common.models import ChatMessage, Session, json_encoder, session_decoder

_WRITE_SCRIPT = """
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < fence then return {'FENCED', tostring(fence)} end
if ARGV[6] ~= '' then
  local prior = redis.call('GET', KEYS[3])
  if prior then return {'DUP', prior} end
end
local current = tonumber(redis.call('HGET', KEYS[2], 'v') or '-1')
if current ~= tonumber(ARGV[2]) then return {'VERSION', tostring(current)} end
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[2], KEYS[6], KEYS[7], KEYS[8])
  redis.call('SREM', KEYS[4], ARGV[8])
  redis.call('SREM', KEYS[9], ARGV[8])
  redis.call('ZREM', KEYS[5], ARGV[10])
else
  redis.call('HSET', KEYS[2], 'v', ARGV[3], 'd', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('SADD', KEYS[4], ARGV[8])
  redis.call('ZADD', KEYS[5], ARGV[9], ARGV[10])
  if ARGV[11] == '1' then redis.call('SADD', KEYS[9], ARGV[8]) elseif ARGV[11] == '0' then redis.call('SREM', KEYS[9], ARGV[8]) end
  -- New or changed messages: id, seq, json triples; the history keeps the newest ARGV[12].
  if #ARGV > 12 then
    for i = 13, #ARGV, 3 do
      redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 2])
      redis.call('ZADD', KEYS[7], ARGV[i + 1], ARGV[i])
    end
    local extra = redis.call('ZCARD', KEYS[7]) - tonumber(ARGV[12])
    if extra > 0 then
      local old = redis.call('ZRANGE', KEYS[7], 0, extra - 1)
      redis.call('HDEL', KEYS[6], unpack(old))
      redis.call('ZREMRANGEBYRANK', KEYS[7], 0, extra - 1)
    end
  end
  -- Messages and auth state live and die with their session.
  redis.call('PEXPIRE', KEYS[6], ARGV[5])
  redis.call('PEXPIRE', KEYS[7], ARGV[5])
  redis.call('PEXPIRE', KEYS[8], ARGV[5])
end
if ARGV[6] ~= '' then redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[7]) end
return {'OK'}
"""

# A message's delivery status moves on (acks) without a new session version; fenced like every write.
_MESSAGE_STATUS_SCRIPT = """
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < fence then return -1 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# The engine's auth state (credentials of the linked device): versioned, fenced, written through.
_AUTH_SCRIPT = """
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < fence then return {'FENCED', tostring(fence)} end
local current = tonumber(redis.call('HGET', KEYS[2], 'v') or '0')
if current ~= tonumber(ARGV[2]) then return {'VERSION', tostring(current)} end
if ARGV[4] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('HSET', KEYS[2], 'v', ARGV[3], 'd', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return {'OK'}
"""

# An expiry candidate is reported once: only if its data is gone (TTL) and our epoch holds.
_EXPIRE_SCRIPT = """
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < fence then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SREM', KEYS[4], ARGV[3])
redis.call('SREM', KEYS[5], ARGV[3])
return redis.call('ZREM', KEYS[3], ARGV[2])
"""

# Raise the shard's epoch to ours unless someone already holds a newer one; returns the epoch in force.
_ACQUIRE_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted = tonumber(ARGV[1])
if wanted > current then redis.call('SET', KEYS[1], wanted); return wanted end
return current
"""

ABSENT = -1


def epoch_key(shard: int) -> str:
    return f"sm:{{{shard}}}:epoch"


def session_key(shard: int, session_id: str) -> str:
    return f"sm:{{{shard}}}:s:{session_id}"


def idempotency_key(shard: int, session_id: str, key: str) -> str:
    return f"sm:{{{shard}}}:idem:{session_id}:{key}"


def shard_index_key(shard: int) -> str:
    return f"sm:{{{shard}}}:sessions"


def expiry_index_key(shard: int) -> str:
    return f"sm:{{{shard}}}:expiry"


def expiry_member(session_id: str, user_id: str) -> str:
    # The user travels with the candidate: once the data has expired nothing else knows it.
    return f"{session_id}|{user_id}"


def messages_key(shard: int, session_id: str) -> str:
    return f"sm:{{{shard}}}:m:{session_id}"


def message_order_key(shard: int, session_id: str) -> str:
    return f"sm:{{{shard}}}:mo:{session_id}"


def auth_key(shard: int, session_id: str) -> str:
    return f"sm:{{{shard}}}:auth:{session_id}"


def live_index_key(shard: int) -> str:
    """Sessions whose WhatsApp connection should be up: a new owner reconnects exactly these."""
    return f"sm:{{{shard}}}:live"


def user_index_key(user_id: str) -> str:
    return f"sm:user:{{{user_id}}}:sessions"


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    status: str  # OK | DUP | VERSION | FENCED
    detail: bytes | None = None


class IdempotencyRecord(msgspec.Struct, array_like=True):
    body_hash: str
    reply: bytes
    version: int


_record_decoder = msgspec.json.Decoder(IdempotencyRecord)


def encode_record(record: IdempotencyRecord) -> bytes:
    return json_encoder.encode(record)


def decode_record(raw: bytes) -> IdempotencyRecord:
    return _record_decoder.decode(raw)


class SessionStore:
    """Everything a request does goes over the ``pipelined`` connection: no pool to wait for, so a
    burst can never turn a busy pool into "Redis unavailable" (and degraded mode); so do the expiry
    sweep's index reads (64 shards in one round trip). The pooled ``redis`` serves what runs beside
    requests and may take long: taking shards, warm starts (thousands of reads at once), confirming
    an expiry."""

    def __init__(self, redis: Redis, pipelined: PipelinedRedis, *, shard_count: int) -> None:
        self._redis = redis
        self._pipe = pipelined
        self._shard_count = shard_count
        self._write = PipelinedScript(pipelined, _WRITE_SCRIPT)
        self._message_status = PipelinedScript(pipelined, _MESSAGE_STATUS_SCRIPT)
        self._auth = PipelinedScript(pipelined, _AUTH_SCRIPT)
        self._acquire = redis.register_script(_ACQUIRE_SCRIPT)
        self._expire = redis.register_script(_EXPIRE_SCRIPT)
        self._message_decoder = msgspec.json.Decoder(ChatMessage)

    def shard_of(self, session_id: str) -> int:
        return shard_for(session_id, self._shard_count)

    async def acquire_epoch(self, shard: int, epoch: int) -> int:
        """Fence older owners out of ``shard``; returns the epoch now in force (> ours: we are stale)."""
        return int(await self._acquire(keys=[epoch_key(shard)], args=[epoch]))

    async def load(self, session_id: str) -> Session | None:
        raw = await self._pipe.execute("HGET", session_key(self.shard_of(session_id), session_id), "d")
        return None if raw is None else session_decoder.decode(raw)

    async def load_many(self, session_ids: list[str]) -> list[Session | None]:
        """Warm starts: thousands at once, as one pipeline on the pool, beside the requests."""
        if not session_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for sid in session_ids:
            pipe.hget(session_key(self.shard_of(sid), sid), "d")
        return _decode_sessions(await pipe.execute())

    async def _load_page(self, session_ids: list[str]) -> list[Session | None]:
        # One listing page (at most 201 reads: pages are capped at 200); issued together, they leave in one write.
        return _decode_sessions(await asyncio.gather(*(self._pipe.execute("HGET", session_key(self.shard_of(sid), sid), "d") for sid in session_ids)))

    async def shard_session_ids(self, shard: int, limit: int) -> list[str]:
        members = await self._redis.srandmember(shard_index_key(shard), limit)
        return [m.decode() for m in members or []]

    async def write(
        self,
        *,
        shard: int,
        epoch: int,
        session_id: str,
        expected_version: int,
        user_id: str,
        session: Session | None,
        ttl_ms: int,
        idem_key: str | None,
        record: IdempotencyRecord | None,
        idem_ttl_ms: int,
        live: bool | None = None,
        messages: Sequence[ChatMessage] = (),
        history_limit: int = 200,
    ) -> WriteOutcome:
        """Persist ``session`` (or delete it when ``None``) if our epoch and its version still hold.

        ``live`` adds the session to (True) or removes it from (False) the shard's live-connection
        index; ``messages`` are new or changed history entries, written in the same script.
        """
        idem = idempotency_key(shard, session_id, idem_key) if idem_key else idempotency_key(shard, session_id, "-")
        extra: list[Any] = []
        for message in messages:
            extra += [message.id, message.seq, json_encoder.encode(message)]
        result = await self._write(
            [
                epoch_key(shard),
                session_key(shard, session_id),
                idem,
                shard_index_key(shard),
                expiry_index_key(shard),
                messages_key(shard, session_id),
                message_order_key(shard, session_id),
                auth_key(shard, session_id),
                live_index_key(shard),
            ],
            [
                epoch,
                expected_version,
                0 if session is None else session.version,
                b"" if session is None else json_encoder.encode(session),
                ttl_ms,
                encode_record(record) if (idem_key and record) else b"",
                idem_ttl_ms,
                session_id,
                0 if session is None else int(session.expires_at.timestamp() * 1000),
                expiry_member(session_id, user_id),
                "" if live is None else ("1" if live else "0"),
                history_limit,
                *extra,
            ],
        )
        status = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        return WriteOutcome(status, result[1] if len(result) > 1 else None)

    # ---- WhatsApp: message history, live connections, engine auth state -------------------

    async def live_session_ids(self, shard: int) -> list[str]:
        return sorted(m.decode() for m in await self._redis.smembers(live_index_key(shard)))

    async def messages(self, session_id: str) -> list[ChatMessage]:
        """The whole (bounded) history, oldest first."""
        shard = self.shard_of(session_id)
        ids = await self._pipe.execute("ZRANGE", message_order_key(shard, session_id), 0, -1)
        if not ids:
            return []
        raws = await self._pipe.execute("HMGET", messages_key(shard, session_id), *ids)
        return [self._message_decoder.decode(raw) for raw in raws if raw is not None]

    async def message(self, session_id: str, message_id: str) -> ChatMessage | None:
        raw = await self._pipe.execute("HGET", messages_key(self.shard_of(session_id), session_id), message_id)
        return None if raw is None else self._message_decoder.decode(raw)

    async def update_message(self, *, shard: int, epoch: int, session_id: str, message: ChatMessage) -> bool | None:
        """Rewrite one history entry in place; None when fenced, False when it left the history."""
        result = int(
            await self._message_status([epoch_key(shard), messages_key(shard, session_id)], [epoch, message.id, json_encoder.encode(message)])
        )
        return None if result < 0 else result == 1

    async def load_auth(self, session_id: str) -> tuple[int, bytes | None]:
        """(version, state) of the engine's auth state; (0, None) when there is none."""
        raw = await self._pipe.execute("HMGET", auth_key(self.shard_of(session_id), session_id), "v", "d")
        return (0, None) if raw[0] is None else (int(raw[0]), raw[1])

    async def save_auth(self, *, shard: int, epoch: int, session_id: str, expected_version: int, state: bytes | None, ttl_ms: int) -> WriteOutcome:
        """Write (or delete, when ``state`` is None) the auth state if our epoch and its version hold."""
        result = await self._auth(
            [epoch_key(shard), auth_key(shard, session_id)],
            [epoch, expected_version, expected_version + 1, state or b"", ttl_ms],
        )
        status = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        return WriteOutcome(status, result[1] if len(result) > 1 else None)

    async def expired_candidates(self, shard: int, now_ms: int, limit: int = 200) -> list[tuple[str, str]]:
        """(session_id, user_id) of sessions whose expiry time has passed."""
        members = await self._pipe.execute("ZRANGEBYSCORE", expiry_index_key(shard), "-inf", now_ms, "LIMIT", 0, limit)
        return [tuple(m.decode().split("|", 1)) for m in members]  # type: ignore[misc]

    async def confirm_expired(self, shard: int, epoch: int, session_id: str, user_id: str) -> bool:
        """True exactly once per expired session (its data is gone and we still own the shard)."""
        result = await self._expire(
            keys=[epoch_key(shard), session_key(shard, session_id), expiry_index_key(shard), shard_index_key(shard), live_index_key(shard)],
            args=[epoch, expiry_member(session_id, user_id), session_id],
        )
        return int(result) == 1

    async def idempotency_record(self, session_id: str, key: str) -> IdempotencyRecord | None:
        raw = await self._pipe.execute("GET", idempotency_key(self.shard_of(session_id), session_id, key))
        return None if raw is None else decode_record(raw)

    # ---- per-user index (its own slot; a superset of the live sessions, pruned lazily) ----

    async def index_add(self, session: Session) -> None:
        await self._pipe.execute("ZADD", user_index_key(session.user_id), 0, _index_member(session))

    async def index_remove(self, session: Session) -> None:
        await self._pipe.execute("ZREM", user_index_key(session.user_id), _index_member(session))

    async def list_user_sessions(self, user_id: str, limit: int, cursor: str | None) -> tuple[list[Session], str | None]:
        key = user_index_key(user_id)
        start = b"-" if cursor is None else b"(" + _decode_cursor(cursor)
        sessions: list[Session] = []
        last_member: bytes | None = None
        # Pages skip members whose session expired; bound the number of index reads per call.
        for _ in range(5):
            members = await self._pipe.execute("ZRANGEBYLEX", key, start, b"+", "LIMIT", 0, limit - len(sessions) + 1)
            if not members:
                break
            ids = [m.decode().split(":", 1)[1] for m in members]
            loaded = await self._load_page(ids)
            dead = []
            for member, session in zip(members, loaded, strict=True):
                if session is None:
                    dead.append(member)
                    continue
                if len(sessions) == limit:
                    return sessions, _cursor(last_member)
                sessions.append(session)
                last_member = member
            if dead:
                await self._pipe.execute("ZREM", key, *dead)
            start = b"(" + members[-1]
        return sessions, None


def _decode_sessions(raws: Sequence[bytes | None]) -> list[Session | None]:
    return [None if raw is None else session_decoder.decode(raw) for raw in raws]


def _index_member(session: Session) -> str:
    # Lexical order of "<created ms>:<id>" is creation order, so pages are stable.
    return f"{int(session.created_at.timestamp() * 1000):013d}:{session.session_id}"


_CURSOR_RE = re.compile(rb"^\d{13}:[A-Za-z0-9_-]{1,64}$")


def _decode_cursor(cursor: str) -> bytes:
    """Cursors are ours (base64url of an index member); anything else is a client error."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,200}", cursor):
        raise ValueError("invalid cursor")
    padded = cursor + "=" * (-len(cursor) % 4)
    member = binascii.a2b_base64(padded.replace("-", "+").replace("_", "/").encode(), strict_mode=True)
    if not _CURSOR_RE.fullmatch(member):
        raise ValueError("invalid cursor")
    return member


def _cursor(member: bytes | None) -> str | None:
    return None if member is None else base64.urlsafe_b64encode(member).rstrip(b"=").decode()
