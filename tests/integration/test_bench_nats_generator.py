"""The direct-NATS load generator: bench/natsproto.py's lean client, and both clients of bench/natsload.py.

A real nats-server with nats.conf carries ``sessions.<sid>.<op>`` requests from the cli user to
``sm.shard.<n>.<sid>.<op>``, where a nats-py responder with the worker's credentials answers as
a worker would: a body, or an empty body with the error headers. Both generators must count the
same things under the same kinds, so the lean one can replace nats-py in the benchmark tables.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from array import array
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from sessionmgr.common import natsauth, subjects
from sessionmgr.common.errors import HEADER_ERROR, HEADER_ERROR_CODE, HEADER_SM_ERROR, SessionNotFoundError, error_headers
from tests.support.cluster import Servers

# bench/ modules import each other by bare names (bench/run.py runs with bench/ as sys.path[0]).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import natsload  # noqa: E402
import natsproto  # noqa: E402
from harness import Window  # noqa: E402

MISSING = "missing"  # session IDs starting with this get the worker's session_not_found reply
SILENT_OP = "context.silent"  # subscribed, never answered: requests time out
UNSERVED_OP = "context.get"  # nobody subscribes: nats-server answers "no responders"
REVERSED_OP = "context.reversed"  # answered like context.incr, but each batch of REVERSED_BATCH last first
REVERSED_BATCH = 10
RUN_S = 0.3
NOT_FOUND = error_headers(SessionNotFoundError("session not found"))
NOT_FOUND_KIND = f"{NOT_FOUND[HEADER_SM_ERROR]} ({NOT_FOUND[HEADER_ERROR_CODE]})"  # how bench tables name it


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    servers = Servers(root=tmp_path_factory.mktemp("bench-nats"))
    servers.start_nats()
    try:
        yield servers.nats_url
    finally:
        servers.stop()


@pytest.fixture(scope="module")
async def responder(nats_url: str) -> AsyncIterator[NATS]:
    """Answers context.incr on every shard like a worker, REVERSED_OP out of order, SILENT_OP never."""

    async def answer(msg: Msg) -> None:
        _, sid, _ = subjects.parse_shard_subject(msg.subject)
        if sid.startswith(MISSING):
            await nc.publish(msg.reply, b"", headers=NOT_FOUND)  # a worker's error reply: headers, no body
        else:
            await msg.respond(b'{"key":"n","value":1}')

    held: list[Msg] = []

    async def answer_reversed(msg: Msg) -> None:
        held.append(msg)
        if len(held) == REVERSED_BATCH:
            for each in reversed(held):
                await answer(each)
            held.clear()

    nc = await nats.connect(nats_url, **natsauth.role_credentials("worker"))
    await nc.subscribe(f"{subjects.SHARD_PREFIX}.*.*.context.incr", cb=answer)
    await nc.subscribe(f"{subjects.SHARD_PREFIX}.*.*.{REVERSED_OP}", cb=answer_reversed)
    await nc.subscribe(f"{subjects.SHARD_PREFIX}.*.*.{SILENT_OP}")
    await nc.flush()  # the interest is registered before the first request
    try:
        yield nc
    finally:
        await nc.close()


async def lean_client(url: str, timeout_s: float = 5.0) -> natsproto.NatsLean:
    credentials = natsauth.role_credentials("cli")
    return await natsproto.connect(
        url, user=credentials["user"], password=credentials["password"], inbox_prefix=natsauth.inbox_prefix("cli"), timeout_s=timeout_s
    )


async def run(url: str, requests: list[tuple[str, bytes]], client: str) -> dict[str, Any]:
    now = time.time()
    spec = natsload.NatsSpec(url=url, requests=requests, in_flight=8, timeout_s=5.0, seed=1, client=client)
    return await natsload.run_load(spec, Window(start=now, measure_start=now, end=now + RUN_S))


def latencies(result: dict[str, Any]) -> list[float]:
    values = array("d")
    values.frombytes(result["latencies"])
    return values.tolist()


# ---- both generators, end to end -------------------------------------------------------------


@pytest.mark.parametrize("client", natsload.CLIENTS)
async def test_replies_are_counted_with_their_latencies(nats_url: str, responder: NATS, client: str) -> None:
    result = await run(nats_url, natsload.incr_requests([f"s{i}" for i in range(20)]), client)
    assert result["ok"] > 0
    assert (result["status_errors"], result["transport_errors"], result["error_kinds"]) == (0, 0, {})
    measured = latencies(result)
    assert len(measured) == result["ok"]
    assert all(0 < latency < RUN_S for latency in measured)
    assert result["cpu_s"] >= 0


@pytest.mark.parametrize("client", natsload.CLIENTS)
async def test_error_replies_are_status_errors_of_the_workers_kind(nats_url: str, responder: NATS, client: str) -> None:
    result = await run(nats_url, natsload.incr_requests([f"{MISSING}-{i}" for i in range(20)]), client)
    assert result["ok"] == 0 and result["transport_errors"] == 0
    assert result["status_errors"] > 0
    assert result["error_kinds"] == {NOT_FOUND_KIND: result["status_errors"]}
    assert result["error_samples"] == {NOT_FOUND_KIND: NOT_FOUND[HEADER_ERROR]}
    assert len(latencies(result)) == result["status_errors"]  # an error reply is still a reply


@pytest.mark.parametrize("client", natsload.CLIENTS)
async def test_no_responders_is_a_transport_error(nats_url: str, responder: NATS, client: str) -> None:
    result = await run(nats_url, [(f"sessions.s1.{UNSERVED_OP}", b"{}")], client)
    assert result["ok"] == 0 and result["status_errors"] == 0
    assert result["transport_errors"] > 0
    assert result["error_kinds"] == {"NoRespondersError": result["transport_errors"]}
    assert latencies(result) == []


# ---- the lean client -------------------------------------------------------------------------


async def test_each_reply_resolves_its_own_request(nats_url: str, responder: NATS) -> None:
    client = await lean_client(nats_url)
    try:
        sids = [f"{MISSING}-{i}" if i % 3 == 0 else f"s{i}" for i in range(30 * REVERSED_BATCH)]
        replies = await asyncio.gather(*(client.request(client.frame(f"sessions.{sid}.{REVERSED_OP}", b"{}")) for sid in sids))
    finally:
        client.close()
    for sid, headers in zip(sids, replies, strict=True):
        assert headers == (NOT_FOUND if sid.startswith(MISSING) else None), sid


async def test_an_unanswered_request_times_out(nats_url: str, responder: NATS) -> None:
    client = await lean_client(nats_url, timeout_s=0.2)
    try:
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            await client.request(client.frame(f"sessions.s1.{SILENT_OP}", b"{}"))
        waited = time.perf_counter() - started
    finally:
        client.close()
    assert 0.2 <= waited < 0.2 + 1.0  # failed by the periodic check, a tick or two after the timeout (not the default 5 s)


@pytest.mark.parametrize(
    ("password", "inbox", "refusal"),
    [("wrong", "_INBOX_cli", "Authorization Violation"), (None, "_INBOX_worker", "Permissions Violation for Subscription")],
    ids=["wrong-password", "inbox-of-another-user"],
)
async def test_a_refused_connect_fails_clearly(nats_url: str, password: str | None, inbox: str, refusal: str) -> None:
    password = password or natsauth.role_credentials("cli")["password"]
    with pytest.raises(ConnectionError, match=f"refused.*{refusal}"):
        await natsproto.connect(nats_url, user="cli", password=password, inbox_prefix=inbox, timeout_s=1.0)


# ---- the parser, without a server ------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self, protocol: natsproto.NatsLean) -> None:
        super().__init__()
        self.protocol = protocol
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.protocol.connection_lost(None)


async def handshaken() -> tuple[natsproto.NatsLean, FakeTransport]:
    client = natsproto.NatsLean(asyncio.get_running_loop(), user="cli", password="pw", inbox_prefix="_INBOX_cli", timeout_s=5.0, name="test")
    transport = FakeTransport(client)
    client.connection_made(transport)
    client.data_received(b'INFO {"server_id":"x","headers":true}\r\n')
    await asyncio.sleep(0)  # one loop pass: the buffered writes go out
    assert len(transport.writes) == 1
    assert re.match(rb'CONNECT \{.*"user":"cli","pass":"pw".*\}\r\nSUB _INBOX_cli\.[0-9a-f]+\.\* 1\r\nPING\r\n$', transport.writes[0])
    client.data_received(b"PONG\r\n")
    assert client.ready.done() and client.ready.exception() is None
    transport.writes.clear()
    return client, transport


def reply_subjects(written: bytes) -> list[bytes]:
    return re.findall(rb"^PUB \S+ (\S+) \d+\r\n", written, re.MULTILINE)


def server_stream(inboxes: list[bytes]) -> bytes:
    """What nats-server sends back: an OK reply, an error reply, no responders, a traced OK reply."""
    error = b"NATS/1.0\r\nNats-Service-Error-Code: 404\r\nSm-Error: session_not_found\r\nNats-Service-Error: gone\r\n\r\n"
    traced = b"NATS/1.0\r\ntraceparent: 00-ab-cd-01\r\n\r\n"
    status = b"NATS/1.0 503\r\n\r\n"
    return b"".join(
        [
            b"PING\r\n",
            b"MSG %s 1 5\r\nhello\r\n" % inboxes[0],
            b"HMSG %s 1 %d %d\r\n%s\r\n" % (inboxes[1], len(error), len(error), error),
            b"+OK\r\n",
            b"HMSG %s 1 %d %d\r\n%s\r\n" % (inboxes[2], len(status), len(status), status),
            b"HMSG %s 1 %d %d\r\n%s{}\r\n" % (inboxes[3], len(traced), len(traced) + 2, traced),
        ]
    )


@pytest.mark.parametrize("chunk", [1, 7, 10_000], ids=["byte-by-byte", "7-byte-reads", "one-read"])
async def test_frames_split_across_reads_are_parsed(chunk: int) -> None:
    client, transport = await handshaken()
    futures = [client.request(client.frame(f"sessions.s{i}.context.incr", b'{"by":1}')) for i in range(4)]
    await asyncio.sleep(0)
    assert len(transport.writes) == 1  # the four PUBs of one loop pass go out in one write
    written = transport.writes.pop()
    assert written.count(b"PUB ") == 4 and written.endswith(b' 8\r\n{"by":1}\r\n')
    stream = server_stream(reply_subjects(written))
    for at in range(0, len(stream), chunk):
        client.data_received(stream[at : at + chunk])
    assert futures[0].result() is None
    assert futures[1].result() == {"Nats-Service-Error-Code": "404", "Sm-Error": "session_not_found", "Nats-Service-Error": "gone"}
    with pytest.raises(natsproto.NoRespondersError):
        futures[2].result()
    assert futures[3].result() is None  # headers without an error code are not an error
    await asyncio.sleep(0)
    assert transport.writes == [b"PONG\r\n"]
    transport.close()


async def test_a_lost_connection_fails_what_is_pending() -> None:
    client, transport = await handshaken()
    pending = client.request(client.frame("sessions.s1.context.incr", b"{}"))
    transport.close()
    with pytest.raises(ConnectionError):
        pending.result()
    with pytest.raises(ConnectionError):
        client.request(client.frame("sessions.s1.context.incr", b"{}")).result()
