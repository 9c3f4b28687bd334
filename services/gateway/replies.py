"""An HTTP answer independent of how it is sent: a Litestar ``Response``, or the fast path's raw
ASGI messages (:mod:`sessionmgr.gateway.fastpath`). Routes and the problem mapping build these."""

from __future__ import annotations

from typing import NamedTuple

from litestar import Response
from litestar.enums import MediaType


class HttpReply(NamedTuple):
    status: int
    body: bytes
    headers: dict[str, str]
    media_type: str | None  # None: no body (204)


def to_response(reply: HttpReply) -> Response[bytes]:
    return Response(reply.body, status_code=reply.status, media_type=reply.media_type or MediaType.JSON, headers=reply.headers or None)
