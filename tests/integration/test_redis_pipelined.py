"""The worker's pipelined Redis connection against a real redis-server: replies reach the right
caller, and a paused, killed or refusing server gives redis-py's errors (what degraded mode acts on)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sessionmgr.common import procs
from sessionmgr.common.redis_pipelined import PipelineFullError, PipelinedRedis, PipelinedScript


class RedisProcess:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = procs.free_port()
        self.process: procs.ManagedProcess | None = None

    def start(self) -> RedisProcess:
        self.process = procs.redis_server(self.port, self.root / "data", log_path=self.root / "redis.log").start()
        self.process.wait_for_port(self.port)
        return self


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    srv = RedisProcess(tmp_path).start()
    yield srv
    assert srv.process is not None
    srv.process.resume()  # a test that paused it must not leave stop() waiting
    srv.process.stop()


@pytest.fixture
async def pipelined(server: RedisProcess) -> AsyncIterator[PipelinedRedis]:
    client = PipelinedRedis(host="127.0.0.1", port=server.port, reply_timeout=0.5)
    yield client
    await client.aclose()


async def test_many_callers_at_once_each_get_their_own_reply(pipelined: PipelinedRedis) -> None:
    await asyncio.gather(*(pipelined.execute("SET", f"k{i}", f"v{i}") for i in range(500)))
    replies = await asyncio.gather(*(pipelined.execute("GET", f"k{i}") for i in range(500)))
    assert replies == [f"v{i}".encode() for i in range(500)]
    # Commands from one caller keep their order on the connection.
    assert [await pipelined.execute("INCR", "counter") for _ in range(5)] == [1, 2, 3, 4, 5]


async def test_an_error_reply_goes_to_its_caller_only(pipelined: PipelinedRedis) -> None:
    await pipelined.execute("SET", "text", "x")
    before, wrong, after = await asyncio.gather(
        pipelined.execute("INCR", "n"), pipelined.execute("INCR", "text"), pipelined.execute("INCR", "n"), return_exceptions=True
    )
    assert (before, after) == (1, 2)
    assert isinstance(wrong, ResponseError) and not isinstance(wrong, NoScriptError)
    assert await pipelined.execute("GET", "text") == b"x"  # the connection is still in step


async def test_a_script_unknown_to_redis_is_loaded_by_eval(pipelined: PipelinedRedis, server: RedisProcess) -> None:
    script = PipelinedScript(pipelined, "return {KEYS[1], ARGV[1]}")
    with pytest.raises(NoScriptError):
        await pipelined.execute("EVALSHA", script.sha, 1, "k", "a")
    assert await script(["k"], ["a"]) == [b"k", b"a"]
    assert await pipelined.execute("EVALSHA", script.sha, 1, "k", "b") == [b"k", b"b"]  # cached by that EVAL


async def test_a_paused_server_times_out_and_the_next_call_reconnects(pipelined: PipelinedRedis, server: RedisProcess) -> None:
    assert server.process is not None
    await pipelined.execute("SET", "k", "1")
    server.process.pause()
    started = time.monotonic()
    results = await asyncio.gather(*(pipelined.execute("GET", "k") for _ in range(3)), return_exceptions=True)
    waited = time.monotonic() - started
    server.process.resume()
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    assert 0.5 <= waited < 2.0  # reply_timeout, checked every quarter of it
    assert await pipelined.execute("GET", "k") == b"1"


async def test_a_killed_server_fails_in_flight_calls_and_a_restarted_one_is_reconnected(pipelined: PipelinedRedis, server: RedisProcess) -> None:
    assert server.process is not None
    await pipelined.execute("SET", "k", "1")
    server.process.kill()
    with pytest.raises(RedisConnectionError):
        await pipelined.execute("GET", "k")
    with pytest.raises(RedisConnectionError):  # refused while it is down: at once, not after a timeout
        await pipelined.execute("GET", "k")
    server.start()
    assert await pipelined.execute("PING") == b"PONG"


async def test_password_and_database_are_sent_when_it_connects(server: RedisProcess) -> None:
    admin = Redis(host="127.0.0.1", port=server.port)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    client = PipelinedRedis(host="127.0.0.1", port=server.port, password="s3cret", db=3)
    wrong = PipelinedRedis(host="127.0.0.1", port=server.port, password="nope")
    try:
        await client.execute("SET", "where", "db3")
        async with Redis(host="127.0.0.1", port=server.port, password="s3cret", db=3) as check:
            assert await check.get("where") == b"db3"
        with pytest.raises(RedisConnectionError):
            await wrong.execute("PING")
    finally:
        await client.aclose()
        await wrong.aclose()


async def test_commands_awaiting_replies_are_bounded(server: RedisProcess) -> None:
    client = PipelinedRedis(host="127.0.0.1", port=server.port, max_pending=2)
    try:
        await client.execute("PING")
        results = await asyncio.gather(*(client.execute("PING") for _ in range(3)), return_exceptions=True)
        assert results[:2] == [b"PONG", b"PONG"] and isinstance(results[2], PipelineFullError)
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_a_closed_client_refuses_new_commands(pipelined: PipelinedRedis) -> None:
    await pipelined.execute("PING")
    await pipelined.aclose()
    with pytest.raises(RedisConnectionError):
        await pipelined.execute("PING")


async def test_every_command_is_reported_by_name_with_its_error(server: RedisProcess) -> None:
    seen: list[tuple[str, str | None]] = []

    class Recorder:
        async def observe(self, command: str, operation: Awaitable[Any]) -> Any:
            try:
                result = await operation
            except Exception as exc:
                seen.append((command, type(exc).__name__))
                raise
            seen.append((command, None))
            return result

    client = PipelinedRedis(host="127.0.0.1", port=server.port, observer=Recorder())
    try:
        await client.execute("SET", "k", "v")
        with pytest.raises(ResponseError):
            await client.execute("INCR", "k")
    finally:
        await client.aclose()
    assert seen == [("SET", None), ("INCR", "ResponseError")]
