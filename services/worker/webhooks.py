"""Webhook delivery (issue 7): every event a session's webhooks or WEBHOOK_URL ask for, POSTed
signed, retried with backoff, kept in JetStream until delivered or dead-lettered.

``enqueue`` runs on the request path after the change's event. With no webhook for the event it
returns after a filter check. Otherwise it records one delivery per target with a JetStream
*acked* publish into ``SM_WEBHOOKS``: when the client gets its reply, the delivery is on disk in
NATS, so a restart of any worker (or of NATS: file storage) loses none. A core publish would save
the ack's round trip (~0.2 ms) but could drop deliveries silently on a disconnect. ``Nats-Msg-Id``
is ``<event id>.<target>``, so a repeated publish is dropped by the stream. ``enqueue`` never
raises: a delivery it cannot record is logged (``webhook_enqueue_failed``) and counted.

``run`` is the dispatcher: every worker pulls from one shared durable consumer (``webhooks``), so
each delivery goes to one worker at a time, at most ``WEBHOOK_MAX_IN_FLIGHT`` per worker (only as
many are fetched as there are free slots). One ``httpx.AsyncClient`` (no redirects followed) does
the POSTs, each bounded by ``WEBHOOK_TIMEOUT`` from connect to status line. A retry is a
``nak(delay)``: JetStream itself redelivers later, counting attempts in ``num_delivered``, so
retries survive worker restarts too. A worker killed mid-POST leaves the delivery unacked;
JetStream redelivers it after the consumer's ack wait (``WEBHOOK_TIMEOUT`` + 2 s). Delivery is
at least once: receivers dedupe on ``X-Webhook-Id`` + URL. Order is not kept across retries; the
event's ``version`` orders a session's events.

Policy (filters, status codes, backoff, signature) is in ``webhook_policy``; the streams and the
dead-letter list in ``webhook_dead_letters``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError as JsBadRequestError
from nats.js.errors import NoStreamResponseError

from sessionmgr.common.models import SessionEvent, WebhookConfig, json_encoder
from sessionmgr.common.settings import Settings
from sessionmgr.common.webhook_models import (
    DELIVER_PREFIX,
    WEBHOOKS_STREAM,
    DeadLetter,
    WebhookDelivery,
    delivery_decoder,
    deliver_subject,
    webhook_json,
)
from sessionmgr.worker.webhook_dead_letters import PUBLISH_TIMEOUT, DeadLetters, ensure_webhook_streams
from sessionmgr.worker.webhook_policy import (
    MAX_WEBHOOKS_PER_SESSION,
    Target,
    global_targets,
    matching_targets,
    next_step,
    sign,
    validate_webhooks,
)

__all__ = ["CONSUMER", "MAX_WEBHOOKS_PER_SESSION", "WebhookService", "validate_webhooks"]

log = structlog.get_logger(__name__)

CONSUMER = "webhooks"
USER_AGENT = "session-manager-webhooks/0.1"
_FETCH_WAIT = 1.0  # seconds a pull waits for work before asking again
_ERROR_TEXT = 300  # characters of a receiver's error body kept in a dead letter


@dataclass(frozen=True, slots=True)
class Attempt:
    status: int | None  # None: network error or timeout
    error: str | None = None
    retry_after: str | None = None


class WebhookService:
    def __init__(
        self,
        *,
        nc: NATS,
        settings: Settings,
        count: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``count(outcome)``: delivery outcomes for metrics (enqueued, enqueue_failed, delivered,
        retried, dead_lettered)."""
        self._nc = nc
        self._settings = settings
        self._js = nc.jetstream()
        self._dead = DeadLetters(nc, self._js)
        self._globals: tuple[Target, ...] = global_targets(settings.webhook_urls, settings.webhook_event_filter)
        self._count = count or (lambda outcome: None)
        self._rng = rng or random.Random()
        self._transport = transport
        self._in_flight: set[asyncio.Task[None]] = set()

    # ---- setup ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the streams and the shared consumer, and subscribe the operator subjects."""
        await self._ensure()
        await self._dead.subscribe()

    async def _ensure(self) -> None:
        await ensure_webhook_streams(self._js)
        config = ConsumerConfig(
            durable_name=CONSUMER,
            filter_subject=f"{DELIVER_PREFIX}.>",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._settings.webhook_timeout + 2.0,
            max_deliver=-1,  # attempts are counted here (WEBHOOK_MAX_ATTEMPTS), then dead-lettered
            # Deliveries waiting for a retry count as pending: room for a long receiver outage.
            max_ack_pending=20_000,
            max_waiting=1024,
        )
        try:
            await self._js.add_consumer(WEBHOOKS_STREAM, config=config)
        except JsBadRequestError as exc:
            # Another worker made it with settings that cannot be changed in place: deliver with it.
            log.warning("webhook_consumer_kept", error=str(exc))

    # ---- request path -----------------------------------------------------------------------

    async def enqueue(self, event: SessionEvent, session_webhooks: Sequence[WebhookConfig]) -> None:
        """Record one delivery per matching webhook (session and global); never raises."""
        if not session_webhooks and not self._globals:
            return
        try:
            targets = matching_targets(event.type, session_webhooks, self._globals)
            if not targets:
                return
            body = msgspec.Raw(json_encoder.encode(event))
            now = datetime.now(UTC)
            deliveries = [
                WebhookDelivery(
                    id=f"{event.id}.{target.key}",
                    event_id=event.id,
                    event_type=event.type,
                    session_id=event.session_id,
                    url=target.url,
                    target=target.scope,  # type: ignore[arg-type]
                    enqueued_at=now,
                    event=body,
                    secret=target.secret,
                )
                for target in targets
            ]
        except Exception:  # noqa: BLE001 - a webhook problem never fails the change it reports
            log.warning("webhook_enqueue_failed", event_id=event.id, exc_info=True)
            self._count("enqueue_failed")
            return
        results = await asyncio.gather(*(self._record(d) for d in deliveries), return_exceptions=True)
        for delivery, result in zip(deliveries, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("webhook_enqueue_failed", delivery_id=delivery.id, url=delivery.url, error=repr(result))
                self._count("enqueue_failed")
            else:
                self._count("enqueued")

    async def _record(self, delivery: WebhookDelivery) -> None:
        data = webhook_json.encode(delivery)
        headers = {"Nats-Msg-Id": delivery.id}
        subject = deliver_subject(delivery.session_id)
        try:
            await self._js.publish(subject, data, timeout=PUBLISH_TIMEOUT, stream=WEBHOOKS_STREAM, headers=headers)
        except NoStreamResponseError:
            await ensure_webhook_streams(self._js)  # NATS lost its storage: make the stream again, once
            await self._js.publish(subject, data, timeout=PUBLISH_TIMEOUT, stream=WEBHOOKS_STREAM, headers=dict(headers))

    # ---- dispatcher -------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until cancelled; NATS outages are waited out, not fatal."""
        limits = httpx.Limits(max_connections=self._settings.webhook_max_in_flight, max_keepalive_connections=self._settings.webhook_max_in_flight)
        async with httpx.AsyncClient(
            timeout=self._settings.webhook_timeout,
            follow_redirects=False,
            limits=limits,
            headers={"User-Agent": USER_AGENT},
            transport=self._transport,
        ) as client:
            try:
                while True:
                    try:
                        await self._consume(client)
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # noqa: BLE001 - NATS restarting or the consumer gone: set up again
                        log.warning("webhook_consumer_failed", exc_info=True)
                        await asyncio.sleep(1.0)
                        with contextlib.suppress(Exception):
                            await self._ensure()
            finally:
                await self._stop_deliveries()

    async def _consume(self, client: httpx.AsyncClient) -> None:
        sub = await self._js.pull_subscribe_bind(durable=CONSUMER, stream=WEBHOOKS_STREAM)
        try:
            while True:
                free = self._settings.webhook_max_in_flight - len(self._in_flight)
                if free <= 0:
                    await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await sub.fetch(batch=free, timeout=_FETCH_WAIT)
                except (TimeoutError, NatsTimeoutError):
                    continue
                for msg in msgs:
                    task = asyncio.get_running_loop().create_task(self._deliver(client, msg))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _stop_deliveries(self) -> None:
        """Shutdown: deliveries still running are cancelled and handed back (nak) at once."""
        tasks = set(self._in_flight)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    async def _deliver(self, client: httpx.AsyncClient, msg: Msg) -> None:
        try:
            meta = msg.metadata
            delivery = delivery_decoder.decode(msg.data)
        except Exception:  # noqa: BLE001 - a record nobody can read would be redelivered forever
            log.error("webhook_delivery_unreadable", subject=msg.subject)
            with contextlib.suppress(Exception):
                await msg.term()
            return
        attempt = meta.num_delivered
        try:
            outcome = await self._post(client, delivery, attempt)
            s = self._settings
            step = next_step(
                outcome.status,
                attempt,
                max_attempts=s.webhook_max_attempts,
                base_delay=s.webhook_retry_base_delay,
                max_delay=s.webhook_retry_max_delay,
                retry_after=outcome.retry_after,
                rng=self._rng,
            )
            if step.action == "ack":
                await msg.ack()
                self._count("delivered")
            elif step.action == "retry":
                await msg.nak(delay=step.delay)
                self._count("retried")
                log.info("webhook_retry", delivery_id=delivery.id, url=delivery.url, attempt=attempt, status=outcome.status, delay_s=round(step.delay, 3), error=outcome.error)
            else:
                dead = DeadLetter(
                    delivery=delivery,
                    attempts=attempt,
                    last_status=outcome.status,
                    last_error=outcome.error or f"HTTP {outcome.status}",
                    failed_at=datetime.now(UTC),
                )
                await self._dead.record(dead, msg_id=f"{delivery.id}.d{meta.sequence.stream}")
                await msg.ack()
                self._count("dead_lettered")
                log.warning("webhook_dead_lettered", delivery_id=delivery.id, url=delivery.url, attempts=attempt, status=outcome.status, error=outcome.error)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()  # shutting down: another worker takes it now, not after the ack wait
            raise
        except Exception:  # noqa: BLE001 - e.g. the dead-letter stream unreachable: try again later
            log.warning("webhook_delivery_failed", delivery_id=delivery.id, exc_info=True)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self._settings.webhook_retry_base_delay)

    async def _post(self, client: httpx.AsyncClient, delivery: WebhookDelivery, attempt: int) -> Attempt:
        body = bytes(delivery.event)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "X-Webhook-Id": delivery.event_id,
            "X-Webhook-Event": delivery.event_type,
            "X-Webhook-Timestamp": str(timestamp),
            "X-Webhook-Attempt": str(attempt),
            "X-Webhook-Delivery": delivery.id,
        }
        secret = delivery.secret or self._settings.webhook_secret
        if secret:
            headers["X-Webhook-Signature"] = sign(secret, timestamp, body)
        try:
            async with asyncio.timeout(self._settings.webhook_timeout):
                async with client.stream("POST", delivery.url, content=body, headers=headers) as response:
                    status = response.status_code
                    if 200 <= status < 300:
                        return Attempt(status)
                    text = await _read_prefix(response, _ERROR_TEXT)
                    return Attempt(status, f"HTTP {status}: {text}".strip(), response.headers.get("retry-after"))
        except TimeoutError:
            return Attempt(None, f"timed out after {self._settings.webhook_timeout:g} s")
        except httpx.HTTPError as exc:
            return Attempt(None, f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT])


async def _read_prefix(response: httpx.Response, limit: int) -> str:
    """The start of an error body, for the dead letter; the rest is never read."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit].decode("utf-8", "replace").replace("\n", " ")
