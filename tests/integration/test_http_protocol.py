"""The gateway's HTTP protocol: uvicorn with httptools, but each response leaves in one write."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from sessionmgr.common import procs
from sessionmgr.common.write_coalescing import CoalescingTransport
from sessionmgr.gateway.http_protocol import CoalescingHttpToolsProtocol

BODY = b'{"ok":true}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    if scope["path"] == "/stream":  # a body in several parts, as a streamed response sends it
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY, "more_body": False})


class CountingTransport:
    """Between uvicorn's protocol and the socket: counts the writes that reach the socket."""

    writes: list[bytes] = []

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        CountingTransport.writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CountedProtocol(CoalescingHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CountingTransport(transport))  # type: ignore[arg-type]


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    port = procs.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=CountedProtocol, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


async def test_each_response_reaches_the_socket_in_one_write(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        for _ in range(3):  # keep-alive: every response on the connection, not just the first
            CountingTransport.writes.clear()
            response = await client.get("/")
            assert response.status_code == 200 and response.content == BODY
            assert response.headers["content-type"] == "application/json"
            assert len(CountingTransport.writes) == 1
            assert CountingTransport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and CountingTransport.writes[0].endswith(BODY)


async def test_a_streamed_body_still_arrives_whole_and_in_order(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.get("/stream")
    assert response.status_code == 200 and response.text == "one two three"


class RecordingTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0


async def test_close_sends_what_was_written_before_it_and_abort_drops_it() -> None:
    loop = asyncio.get_running_loop()
    inner = RecordingTransport()
    transport = CoalescingTransport(inner, loop)  # type: ignore[arg-type]
    transport.write(b"head")
    transport.write(b"body")
    assert inner.written == [] and transport.get_write_buffer_size() == 8
    transport.close()
    assert inner.written == [b"headbody"] and inner.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
    assert inner.written == [b"headbody"]

    other = RecordingTransport()
    aborted = CoalescingTransport(other, loop)  # type: ignore[arg-type]
    aborted.write(b"late")
    aborted.abort()
    await asyncio.sleep(0)
    assert other.written == [] and other.aborted
