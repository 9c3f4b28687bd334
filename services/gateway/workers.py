"""The gateway's side of the bus: sends a session request to its shard and tracks worker liveness."""

from __future__ import annotations

import time

import msgspec
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace
from opentelemetry.trace import Tracer

from sessionmgr.common import bus, subjects
from sessionmgr.common.natsauth import connect_options
from sessionmgr.common.models import RequestStatus, heartbeat_decoder, request_status_decoder
from sessionmgr.common.streams import request_status_bucket
from sessionmgr.common.settings import Settings
from sessionmgr.common.errors import UnknownActionError
from sessionmgr.common.tracing import inject_trace_headers
from sessionmgr.gateway.metrics import GatewayMetrics
from sessionmgr.gateway.telemetry import current_request

log = structlog.get_logger(__name__)
_default_tracer = trace.get_tracer("sessionmgr.gateway")


class WorkerClient:
    def __init__(self, settings: Settings, *, metrics: GatewayMetrics | None = None, tracer: Tracer | None = None) -> None:
        self._settings = settings
        self._metrics = metrics or GatewayMetrics()
        self._tracer = tracer or _default_tracer
        self.nc: NATS | None = None
        self._workers: dict[str, tuple[bool, float]] = {}  # worker -> (degraded, last heartbeat)
        self._statuses: KeyValue | None = None
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
            beat = heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        now = time.monotonic()
        self._workers[beat.worker_id] = (beat.degraded, now)

    @property
    def degraded(self) -> bool:
        """A live worker's latest heartbeat reports degraded mode (Redis away or changes queued)."""
        now = time.monotonic()
        return any(flag and now - seen <= self._settings.failure_timeout for flag, seen in self._workers.values())

    async def request_status(self, request_id: str) -> RequestStatus | None:
        assert self.nc is not None
        if self._statuses is None:
            self._statuses = await request_status_bucket(self.nc.jetstream())
        try:
            entry = await self._statuses.get(request_id)
        except KeyNotFoundError:
            return None
        return request_status_decoder.decode(entry.value) if entry.value else None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def workers_alive(self) -> bool:
        now = time.monotonic()
        return any(now - seen <= self._settings.failure_timeout for _, seen in self._workers.values())

    async def call(self, subject: str, payload: bytes, headers: dict[str, str], *, op: str) -> Msg:
        assert self.nc is not None
        deadline = time.monotonic() + self._settings.request_timeout
        request = current_request()
        if request is not None:
            # One request ID per HTTP request, shared with the worker's log line and the canonical one.
            headers[bus.HEADER_REQUEST_ID] = headers.get(bus.HEADER_REQUEST_ID) or request.ensure_request_id()
            headers[bus.HEADER_LOGGED_BY] = "gateway"
            request.adopt(headers[bus.HEADER_REQUEST_ID], _session_of(subject))
        started = time.perf_counter()
        known_op = True
        try:
            parent = trace.get_current_span()
            if parent.is_recording() or not parent.get_span_context().is_valid:
                with self._tracer.start_as_current_span(
                    f"sm {op} publish",
                    kind=trace.SpanKind.PRODUCER,
                    attributes={"messaging.system": "nats", "messaging.destination.name": subject, "sm.op": op},
                ):
                    inject_trace_headers(headers)
                    reply = await self._request(subject, payload, headers, deadline)
            else:
                # Inside an unsampled trace the producer span would not be recorded either (parent-based
                # sampling): skip making it and send the server span's context, trace ID and all.
                inject_trace_headers(headers)
                reply = await self._request(subject, payload, headers, deadline)
            if request is not None and reply.headers:
                request.worker_id = reply.headers.get(bus.HEADER_WORKER)
            return reply
        except UnknownActionError:
            known_op = False  # a client's made-up action name never becomes a label value
            raise
        finally:
            self._metrics.observe_nats(op, time.perf_counter() - started, known_op=known_op)

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str], deadline: float) -> Msg:
        assert self.nc is not None
        return await bus.request(
            self.nc,
            subject,
            payload,
            headers,
            deadline=deadline,
            attempt_timeout=self._settings.request_attempt_timeout,
            on_no_responders=self._hint_unreachable,
            on_retry=self._metrics.count_retry,
        )

    async def _hint_unreachable(self, subject: str) -> None:
        """Tell the supervisor a shard has no subscriber; it probes the owner (at most every 100 ms)."""
        try:
            shard = str(subjects.parse_shard_subject(subject)[0])
        except ValueError:
            return
        now = time.monotonic()
        if now - self._hinted.get(shard, 0.0) < 0.1:
            return
        self._hinted[shard] = now
        try:
            # With the request's trace context: the supervisor links its reassignment span to it.
            await self.nc.publish(subjects.UNREACHABLE_HINT, shard.encode(), headers=inject_trace_headers({}))  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - only a hint
            pass


def _session_of(subject: str) -> str | None:
    if not subject.startswith(subjects.SHARD_PREFIX + "."):
        return None
    try:
        return subjects.parse_shard_subject(subject)[1]
    except ValueError:
        return None
