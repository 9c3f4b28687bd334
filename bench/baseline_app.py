"""The baseline: one Litestar process doing the same per-request work with no NATS and no workers.

It answers the same three routes the benchmark drives, with the same HS256 check (pyjwt, verified
tokens cached as the gateway caches them), sessions as one Redis hash each and every write a Lua
compare-and-set on the version, the read-modify-write of context.incr done in Python. It has no
sharding, fencing, idempotency or failover: the gap between it and the system is the price of
those and of the two extra hops (gateway -> NATS -> worker).

    JWT_SECRET=... python bench/baseline_app.py --port 8001 --redis-port 6390
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import msgspec
import uvicorn
from litestar import Litestar, Request, Response, get, post
from redis.asyncio import Redis

AnyRequest = Request[Any, Any, Any]
JSON = "application/json"
SESSION_TTL = timedelta(hours=1)
_CAS_RETRIES = 3
_TOKEN_CACHE_MAX = 10_000

# Write only if the stored version is the one we read; returns -2 on success, else the version found.
_CAS_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '-1')
if current ~= tonumber(ARGV[1]) then return current end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return -2
"""
_CAS_OK = -2
_ABSENT = -1


class Session(msgspec.Struct, kw_only=True):
    session_id: str
    user_id: str
    state: str
    version: int
    created_at: datetime
    last_updated: datetime
    expires_at: datetime
    metadata: dict[str, Any] = {}
    context: dict[str, Any] = {}


class CreateBody(msgspec.Struct, forbid_unknown_fields=True):
    metadata: dict[str, Any] = {}


class ActionBody(msgspec.Struct, forbid_unknown_fields=True):
    action: str
    payload: dict[str, Any] = {}


class IncrPayload(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    by: int = 1


class ActionResult(msgspec.Struct, kw_only=True):
    request_id: str
    action: str
    result: Any
    version: int


_encoder = msgspec.json.Encoder()
_session_decoder = msgspec.json.Decoder(Session)


class Problem(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _problem_response(_: AnyRequest, exc: Problem) -> Response[bytes]:
    return Response(_encoder.encode({"status": exc.status, "detail": exc.detail}), status_code=exc.status, media_type=JSON)


class Backend:
    """The Redis client, the CAS script and the token cache; one per process."""

    def __init__(self, secret: str, redis_port: int) -> None:
        self.secret = secret
        self.redis = Redis(host="127.0.0.1", port=redis_port, max_connections=64, socket_timeout=2.0)
        self.cas = self.redis.register_script(_CAS_SCRIPT)
        self._tokens: dict[str, tuple[str, float]] = {}

    def user_of(self, authorization: str | None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Problem(401, "missing bearer token")
        cached = self._tokens.get(token)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        try:
            claims = jwt.decode(token, self.secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.PyJWTError as exc:
            raise Problem(401, f"invalid token: {exc}") from None
        if len(self._tokens) >= _TOKEN_CACHE_MAX:
            self._tokens.clear()
        self._tokens[token] = (claims["sub"], float(claims["exp"]))
        return str(claims["sub"])

    async def load(self, session_id: str) -> Session | None:
        raw = await self.redis.hget(_key(session_id), "d")
        return None if raw is None else _session_decoder.decode(raw)

    async def write(self, session: Session, expected_version: int) -> bool:
        ttl_ms = int((session.expires_at - session.last_updated).total_seconds() * 1000)
        found = await self.cas(keys=[_key(session.session_id)], args=[expected_version, session.version, _encoder.encode(session), ttl_ms])
        return int(found) == _CAS_OK


def _key(session_id: str) -> str:
    return f"bl:s:{session_id}"


def _backend(request: AnyRequest) -> Backend:
    return request.app.state.backend  # type: ignore[no-any-return]


@post("/sessions")
async def create_session(request: AnyRequest, data: CreateBody | None = None) -> Response[bytes]:
    backend = _backend(request)
    user = backend.user_of(request.headers.get("authorization"))
    now = datetime.now(UTC)
    session = Session(
        session_id=secrets.token_urlsafe(16),
        user_id=user,
        state="active",
        version=1,
        created_at=now,
        last_updated=now,
        expires_at=now + SESSION_TTL,
        metadata=dict(data.metadata) if data else {},
    )
    if not await backend.write(session, _ABSENT):
        raise Problem(409, "session already exists")
    return Response(_encoder.encode(session), status_code=201, media_type=JSON, headers={"Location": f"/sessions/{session.session_id}"})


@get("/sessions/{session_id:str}")
async def get_session(request: AnyRequest, session_id: str) -> Response[bytes]:
    backend = _backend(request)
    user = backend.user_of(request.headers.get("authorization"))
    session = await backend.load(session_id)
    if session is None or session.user_id != user:
        raise Problem(404, "no such session")
    return Response(_encoder.encode(session), media_type=JSON, headers={"ETag": f'"{session.version}"'})


@post("/sessions/{session_id:str}/request", status_code=200)
async def run_action(request: AnyRequest, session_id: str, data: ActionBody) -> Response[bytes]:
    backend = _backend(request)
    user = backend.user_of(request.headers.get("authorization"))
    if data.action != "context.incr":
        raise Problem(422, "the baseline only knows context.incr")
    try:
        incr = msgspec.convert(data.payload, IncrPayload)
    except msgspec.ValidationError as exc:
        raise Problem(400, str(exc)) from None
    # Read, change in Python, compare-and-set; a concurrent writer makes us re-read.
    for _ in range(_CAS_RETRIES):
        current = await backend.load(session_id)
        if current is None or current.user_id != user:
            raise Problem(404, "no such session")
        value = int(current.context.get(incr.key, 0)) + incr.by
        now = datetime.now(UTC)
        updated = msgspec.structs.replace(
            current, version=current.version + 1, last_updated=now, expires_at=now + SESSION_TTL, context={**current.context, incr.key: value}
        )
        if await backend.write(updated, current.version):
            body = ActionResult(request_id=secrets.token_hex(12), action=data.action, result={"key": incr.key, "value": value}, version=updated.version)
            return Response(_encoder.encode(body), media_type=JSON, headers={"ETag": f'"{updated.version}"'})
    raise Problem(503, "session kept changing; retry")


@get("/readyz")
async def readyz(request: AnyRequest) -> Response[bytes]:
    await _backend(request).redis.ping()
    return Response(b'{"status":"ready"}', media_type=JSON)


def create_app(secret: str, redis_port: int) -> Litestar:
    backend = Backend(secret, redis_port)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await backend.redis.aclose()

    app = Litestar(
        route_handlers=[create_session, get_session, run_action, readyz],
        lifespan=[lifespan],
        exception_handlers={Problem: _problem_response},  # type: ignore[dict-item]
        openapi_config=None,
        debug=False,
    )
    app.state.backend = backend
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Minimal single-process baseline for the Session Manager benchmark.")
    parser.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    parser.add_argument("--redis-port", type=int, required=True, help="redis-server port on 127.0.0.1")
    args = parser.parse_args()
    secret = os.environ.get("JWT_SECRET", "")
    if len(secret) < 32:
        sys.exit("baseline_app: set JWT_SECRET (at least 32 characters)")
    uvicorn.run(
        create_app(secret, args.redis_port),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
