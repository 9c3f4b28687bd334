"""Per-user rate limits and the per-user session cap, shared by every gateway replica via Redis.

One Lua script per request checks, atomically and on Redis's clock:

* the user's request budget, ``RATE_LIMIT_PER_MINUTE`` (GCRA: a burst of up to N requests, then
  N per minute; one key per user holding the "theoretical arrival time", with a TTL);
* for ``POST /sessions`` also ``CREATE_RATE_LIMIT_PER_MINUTE`` (a second GCRA key);
* for ``POST /sessions`` also ``MAX_SESSIONS_PER_USER``, counted on the worker's per-user index
  ``sm:user:{<user>}:sessions`` (``ZCARD``).

A gateway takes request tokens in small batches (up to ``MAX_LEASE``, about 1/300 of the per-minute
limit) and spends them locally for at most ``LEASE_TTL_S``: one Redis call then serves many
requests (the call cost a third of the gateway's throughput when made per request). Tokens are
charged when taken, so over time a user never gets more than the rate; near it a gateway may
refuse up to ``MAX_LEASE - 1`` requests early, and a slow user is charged at least a batch per
``LEASE_TTL_S`` (20 of 6,000 a minute by default), never enough to be refused. The tradeoff:
tokens taken earlier may be spent later, so within one instant a user can go past the burst by
the tokens its gateways hold, at most ``MAX_LEASE - 1`` per gateway (0.3 % of the default burst).
The TTL is long (a minute, the GCRA window) because with many users each sending a few requests
a second a short lease expired unused and almost every request paid the Redis call again (the
benchmark's 100k-session run: 5,000 users). Creates always go to Redis.
Requests of one user that find the lease empty while a batch is being taken wait for that batch
(one Redis call at a time per user): with 64 connections of one user, a batch per waiting request
charged the user about nine times what it used.

All three keys carry the user as hash tag, so they share one Redis Cluster slot. A refused request
consumes nothing. Over a rate: 429 with ``Retry-After``; at the cap: 409 ``session_limit_reached``
(waiting does not help, deleting sessions does). The index is a superset of the live sessions
(entries of expired sessions are pruned lazily), so at the cap the oldest entries are checked
and dead ones removed before the create is refused. Concurrent creates of one user can overshoot
the cap by the number in flight; the create rate bounds that.

If Redis cannot be reached the check lets the request through (logged, at most every 10 s) and
is skipped for the next ``BYPASS_AFTER_FAILURE_S`` seconds, so a Redis outage (which the workers
ride out in degraded mode) does not add a connect timeout to every request: the limits protect
capacity, they do not decide who may do what.
"""

from __future__ import annotations

import asyncio
import math
import time

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sessionmgr.common.errors import RateLimitedError, SessionLimitError
from sessionmgr.common.hashing import shard_for
from sessionmgr.common.settings import Settings
from sessionmgr.worker.store import session_key, user_index_key

log = structlog.get_logger(__name__)

WINDOW_US = 60_000_000
PRUNE_BATCH = 200
_WARN_EVERY_S = 10.0
BYPASS_AFTER_FAILURE_S = 5.0
MAX_LEASE = 20
LEASE_TTL_S = 60.0
_MAX_LEASES = 100_000

# KEYS: [1] request bucket, [2] create bucket, [3] user index (2 and 3 only for creates)
# ARGV: [1] request interval in µs (0 = off), [2] create interval in µs (0 = off), [3] session cap (0 = off)
# -> {0, 0} allowed; {1, wait_us} rate limited; {2, sessions} at the cap
_SCRIPT = """
pcall(redis.replicate_commands)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local wait = 0
local updates = {}
local intervals = {tonumber(ARGV[1]), tonumber(ARGV[2])}
for i = 1, 2 do
  local key, interval = KEYS[i], intervals[i]
  if key and interval > 0 then
    local tat = tonumber(redis.call('GET', key) or '0') or 0
    if tat < now then tat = now end
    local new_tat = tat + interval
    local early = new_tat - window - now
    if early > 0 then
      if early > wait then wait = early end
    else
      updates[#updates + 1] = {key, new_tat}
    end
  end
end
if wait > 0 then return {1, wait} end
local cap = tonumber(ARGV[3])
if KEYS[3] and cap > 0 then
  local n = redis.call('ZCARD', KEYS[3])
  if n >= cap then return {2, n} end
end
for _, u in ipairs(updates) do
  redis.call('SET', u[1], string.format('%d', u[2]), 'PX', math.ceil((u[2] - now) / 1000))
end
return {0, 0}
"""


def bucket_key(user_id: str, kind: str) -> str:
    return f"sm:rl:{{{user_id}}}:{kind}"


def _interval_us(per_minute: int) -> int:
    return WINDOW_US // per_minute if per_minute > 0 else 0


class RateLimiter:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self._shard_count = settings.shard_count
        self._request_interval = _interval_us(settings.rate_limit_per_minute)
        self._create_interval = _interval_us(settings.create_rate_limit_per_minute)
        self._cap = settings.max_sessions_per_user
        self._warned_at = float("-inf")
        self._bypass_until = float("-inf")
        self._lease_size = max(1, min(MAX_LEASE, settings.rate_limit_per_minute // 300))
        self._leases: dict[str, tuple[int, float]] = {}  # user -> (tokens left, usable until)
        self._refills: dict[str, asyncio.Future[None]] = {}  # user -> a batch being taken now

    @staticmethod
    def enabled(settings: Settings) -> bool:
        return bool(settings.rate_limit_per_minute or settings.create_rate_limit_per_minute or settings.max_sessions_per_user)

    async def check(self, user_id: str, *, create: bool = False) -> None:
        """Raise :class:`RateLimitedError` or :class:`SessionLimitError`, or return if allowed."""
        if not create and not self._request_interval:
            return  # nothing to check for this request
        if time.monotonic() < self._bypass_until:
            return
        refill = None
        if not create:
            # While another request of this user takes a batch, wait for it and spend from it
            # rather than take (and be charged for) a batch per concurrent request.
            while not self._spend_leased(user_id):
                pending = self._refills.get(user_id)
                if pending is None:
                    break
                await asyncio.shield(pending)
                if time.monotonic() < self._bypass_until:
                    return
            else:
                return
            # Entries live only while their call is in flight: bounded by the requests in flight.
            refill = self._refills[user_id] = asyncio.get_running_loop().create_future()
        try:
            if create:
                verdict, value = await self._run(user_id, create=True)
                if verdict == 2 and await self._prune(user_id):
                    verdict, value = await self._run(user_id, create=True)
            else:
                granted = self._lease_size
                verdict, value = await self._run(user_id, create=False, tokens=granted)
                if verdict == 1 and granted > 1:  # near the limit: one token at a time
                    granted = 1
                    verdict, value = await self._run(user_id, create=False, tokens=1)
                if verdict == 0 and granted > 1:
                    self._keep_lease(user_id, granted - 1)
        except (RedisError, OSError, TimeoutError) as exc:
            now = time.monotonic()
            self._bypass_until = now + BYPASS_AFTER_FAILURE_S
            if now - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = now
                log.warning("rate_limit_unavailable", error=type(exc).__name__)
            return
        finally:
            if refill is not None:
                del self._refills[user_id]
                refill.set_result(None)
        if verdict == 1:
            retry_after = max(1, math.ceil(value / 1_000_000))
            what = "session creations" if create and self._create_interval else "requests"
            raise RateLimitedError(f"too many {what} for this user; retry after {retry_after} s", retry_after=retry_after)
        if verdict == 2:
            raise SessionLimitError(f"this user already has {value} sessions (limit {self._cap}); delete some before creating more")

    def _spend_leased(self, user_id: str) -> bool:
        lease = self._leases.get(user_id)
        if lease is None:
            return False
        left, until = lease
        if time.monotonic() >= until:
            del self._leases[user_id]
            return False
        if left <= 1:
            del self._leases[user_id]
        else:
            self._leases[user_id] = (left - 1, until)
        return True

    def _keep_lease(self, user_id: str, tokens: int) -> None:
        if len(self._leases) >= _MAX_LEASES:
            self._leases.clear()  # crude but bounded; dropped tokens only make the limit stricter
        now = time.monotonic()
        left, until = self._leases.get(user_id, (0, now))
        # Tokens still held were paid for: add to them (they expire with the new batch).
        self._leases[user_id] = ((left if until > now else 0) + tokens, now + LEASE_TTL_S)

    async def _run(self, user_id: str, *, create: bool, tokens: int = 1) -> tuple[int, int]:
        keys = [bucket_key(user_id, "requests")]
        if create:
            keys += [bucket_key(user_id, "creates"), user_index_key(user_id)]
        args = [self._request_interval * tokens, self._create_interval if create else 0, self._cap if create else 0]
        verdict, value = await self._script(keys=keys, args=args)
        return int(verdict), int(value)

    async def _prune(self, user_id: str) -> int:
        """Drop index entries of sessions that no longer exist (oldest first); how many went."""
        index = user_index_key(user_id)
        members = await self._redis.zrange(index, 0, PRUNE_BATCH - 1)
        ids = [m.split(b":", 1)[1].decode() for m in members if b":" in m]
        if not ids:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid in ids:
                pipe.exists(session_key(shard_for(sid, self._shard_count), sid))
            exists = await pipe.execute()
        dead = [m for m, alive in zip(members, exists, strict=True) if not alive]
        if dead:
            await self._redis.zrem(index, *dead)
        return len(dead)
