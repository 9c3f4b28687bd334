"""The gateway's side of the bus: sends a session request to its shard and tracks worker liveness."""

from __future__ import annotations

import time

import msgspec
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace

from sessionmgr.common import bus, subjects
from sessionmgr.common.natsauth import connect_options
from sessionmgr.common.models import heartbeat_decoder
from sessionmgr.common.settings import Settings
from sessionmgr.common.tracing import inject_trace_headers

log = structlog.get_logger(__name__)
tracer = trace.get_tracer("sessionmgr.gateway")


class WorkerClient:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.nc: NATS | None = None
        self._last_heartbeat = 0.0
        self._hinted: dict[str, float] = {}

    async def connect(self) -> None:
        self.nc = await nats.connect(
            self._settings.nats_url,
            name="gateway",
            **connect_options(self._settings),  # NATS_USER/NATS_PASSWORD, NATS_TLS_*, own inbox prefix
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            connect_timeout=2,
        )
        await self.nc.subscribe(f"{subjects.HEARTBEAT_PREFIX}.*", cb=self._on_heartbeat)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        self._last_heartbeat = time.monotonic()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def workers_alive(self) -> bool:
        return time.monotonic() - self._last_heartbeat <= self._settings.failure_timeout

    async def call(self, subject: str, payload: bytes, headers: dict[str, str], *, op: str) -> Msg:
        assert self.nc is not None
        deadline = time.monotonic() + self._settings.request_timeout
        with tracer.start_as_current_span(
            f"sm {op} publish",
            kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.destination.name": subject, "sm.op": op},
        ):
            inject_trace_headers(headers)
            return await bus.request(
                self.nc,
                subject,
                payload,
                headers,
                deadline=deadline,
                attempt_timeout=self._settings.request_attempt_timeout,
                on_no_responders=self._hint_unreachable,
            )

    async def _hint_unreachable(self, subject: str) -> None:
        """Tell the supervisor a shard has no subscriber; it probes the owner (at most every 100 ms)."""
        if not subject.startswith(subjects.SHARD_PREFIX + "."):
            return
        shard = subject.split(".", 3)[2]
        now = time.monotonic()
        if now - self._hinted.get(shard, 0.0) < 0.1:
            return
        self._hinted[shard] = now
        try:
            await self.nc.publish(subjects.UNREACHABLE_HINT, shard.encode())  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - only a hint
            pass
