"""uvicorn's httptools protocol with one ``write`` per response instead of two.

uvicorn writes a response's status line and headers to the socket when the app sends
``http.response.start``, and the body when it sends ``http.response.body``: two ``send`` syscalls
and two TCP segments for every small JSON reply. In the gateway that was about 14 % of its CPU
(py-spy), and the client is woken twice. Here writes are held and joined: a complete response
is written at once, when uvicorn marks it complete; the parts of a streamed one right after the
event-loop pass that wrote them. Everything else goes to uvicorn's transport.
"""

from __future__ import annotations

import asyncio
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sessionmgr.common.write_coalescing import CoalescingTransport


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """Pass as ``uvicorn.run(..., http=CoalescingHttpToolsProtocol)``."""

    transport: CoalescingTransport  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        self.transport.flush()  # whole: send it now rather than after the pass (one loop hop less)
        super().on_response_complete()
