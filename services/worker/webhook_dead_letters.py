"""The webhook streams, and the dead-letter list operators inspect and redrive.

``SM_WEBHOOKS`` (work queue, file storage) holds every pending delivery; ``SM_WEBHOOKS_DLQ``
(limits: 30 days, 100,000 messages, 256 MiB, oldest dropped first) holds the ones given up on.
A dead letter's id is its sequence in ``SM_WEBHOOKS_DLQ``. Redrive publishes the delivery back to
``SM_WEBHOOKS`` (acked) and only then deletes the dead letter, so a crash in between duplicates a
delivery rather than losing it; ``Nats-Msg-Id`` ``<delivery id>.r<dead letter id>`` drops a repeat
within the stream's duplicate window.

Any worker answers ``sm.webhooks.admin.dead-letters`` and ``sm.webhooks.admin.redrive`` (queue group
``webhooks-admin``); replies and errors look like every other worker reply (``Sm-Status``, error headers).
"""

from __future__ import annotations

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from sessionmgr.common import bus
from sessionmgr.common.errors import InternalError, SessionManagerError, ValidationFailedError, error_headers
from sessionmgr.common.models import event_decoder
from sessionmgr.common.streams import ensure_stream_configs
from sessionmgr.common.webhook_models import (
    ADMIN_DEAD_LETTERS,
    ADMIN_QUEUE,
    ADMIN_REDRIVE,
    DEAD_LETTER_STREAM,
    DEAD_PREFIX,
    DELIVER_PREFIX,
    MAX_REDRIVE,
    WEBHOOKS_STREAM,
    DeadLetter,
    DeadLetterPage,
    DeadLetterQuery,
    DeadLetterView,
    RedriveReply,
    RedriveRequest,
    dead_letter_decoder,
    dead_letter_query_decoder,
    dead_subject,
    deliver_subject,
    redrive_request_decoder,
    webhook_json,
)

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT = 2.0


def stream_configs() -> list[StreamConfig]:
    return [
        StreamConfig(
            name=WEBHOOKS_STREAM,
            subjects=[f"{DELIVER_PREFIX}.>"],
            storage=StorageType.FILE,
            # Work queue: a delivered (acked) or dead-lettered delivery leaves the stream.
            retention=RetentionPolicy.WORK_QUEUE,
            max_bytes=512 * 1024**2,
            max_age=7 * 24 * 3600,
            # Full means refuse new deliveries (logged, counted), never drop pending ones.
            discard=DiscardPolicy.NEW,
            duplicate_window=120,
        ),
        StreamConfig(
            name=DEAD_LETTER_STREAM,
            subjects=[f"{DEAD_PREFIX}.>"],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_msgs=100_000,
            max_bytes=256 * 1024**2,
            max_age=30 * 24 * 3600,
            discard=DiscardPolicy.OLD,
            duplicate_window=120,
        ),
    ]


async def ensure_webhook_streams(js: JetStreamContext) -> None:
    await ensure_stream_configs(js, stream_configs())


def view_of(seq: int, dead: DeadLetter) -> DeadLetterView:
    d = dead.delivery
    return DeadLetterView(
        id=seq,
        delivery_id=d.id,
        event_id=d.event_id,
        event_type=d.event_type,
        session_id=d.session_id,
        url=d.url,
        target=d.target,
        attempts=dead.attempts,
        last_status=dead.last_status,
        last_error=dead.last_error,
        enqueued_at=d.enqueued_at,
        failed_at=dead.failed_at,
        event=event_decoder.decode(d.event),
    )


class DeadLetters:
    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js

    async def subscribe(self) -> None:
        await self._nc.subscribe(ADMIN_DEAD_LETTERS, queue=ADMIN_QUEUE, cb=self._on_list)
        await self._nc.subscribe(ADMIN_REDRIVE, queue=ADMIN_QUEUE, cb=self._on_redrive)

    async def record(self, dead: DeadLetter, msg_id: str) -> None:
        """Store ``dead`` (acked); raises if JetStream did not take it, so the caller keeps the delivery."""
        await self._js.publish(
            dead_subject(dead.delivery.session_id),
            webhook_json.encode(dead),
            timeout=PUBLISH_TIMEOUT,
            stream=DEAD_LETTER_STREAM,
            headers={"Nats-Msg-Id": msg_id},
        )

    async def page(self, query: DeadLetterQuery) -> DeadLetterPage:
        subject = dead_subject(query.session_id) if query.session_id else f"{DEAD_PREFIX}.>"
        items: list[DeadLetterView] = []
        seq = query.after + 1
        while len(items) < query.limit:
            found = await self._next(seq, subject)
            if found is None:
                break
            seq, dead = found
            if dead is not None:
                items.append(view_of(seq, dead))
            seq += 1
        more = len(items) == query.limit and await self._next(seq, subject) is not None
        info = await self._js.stream_info(DEAD_LETTER_STREAM)
        return DeadLetterPage(items=items, next_after=items[-1].id if more else None, total=info.state.messages)

    async def redrive(self, request: RedriveRequest) -> RedriveReply:
        if request.all == bool(request.ids):
            raise ValidationFailedError("give either 'ids' or 'all': true")
        redriven: list[int] = []
        missing: list[int] = []
        more = False
        if request.ids:
            for seq in dict.fromkeys(request.ids):  # in order, once each
                dead = await self._get(seq)
                if dead is None or (request.session_id and dead.delivery.session_id != request.session_id):
                    missing.append(seq)
                    continue
                await self._move_back(seq, dead)
                redriven.append(seq)
        else:
            subject = dead_subject(request.session_id) if request.session_id else f"{DEAD_PREFIX}.>"
            seq = 1
            while True:
                found = await self._next(seq, subject)
                if found is None:
                    break
                if len(redriven) >= MAX_REDRIVE:
                    more = True
                    break
                seq, dead = found
                if dead is not None:
                    await self._move_back(seq, dead)
                    redriven.append(seq)
                seq += 1
        if redriven:
            log.info("webhook_dead_letters_redriven", count=len(redriven))
        return RedriveReply(redriven=redriven, missing=missing, more=more)

    async def _move_back(self, seq: int, dead: DeadLetter) -> None:
        delivery = dead.delivery
        await self._js.publish(
            deliver_subject(delivery.session_id),
            webhook_json.encode(delivery),
            timeout=PUBLISH_TIMEOUT,
            stream=WEBHOOKS_STREAM,
            headers={"Nats-Msg-Id": f"{delivery.id}.r{seq}"},
        )
        try:
            await self._js.delete_msg(DEAD_LETTER_STREAM, seq)
        except NotFoundError:
            pass  # another redrive of the same id got there first; the msg id dedupes the publish

    async def _next(self, seq: int, subject: str) -> tuple[int, DeadLetter | None] | None:
        """The first dead letter at or after ``seq`` (None past the end); an unreadable one is (seq, None)."""
        try:
            raw = await self._js.get_msg(DEAD_LETTER_STREAM, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return None
        return raw.seq, _decode(raw.data, raw.seq)

    async def _get(self, seq: int) -> DeadLetter | None:
        try:
            raw = await self._js.get_msg(DEAD_LETTER_STREAM, seq=seq)
        except NotFoundError:
            return None
        if not (raw.subject or "").startswith(DEAD_PREFIX + "."):
            return None
        return _decode(raw.data, seq)

    # ---- NATS admin subjects ---------------------------------------------------------------

    async def _on_list(self, msg: Msg) -> None:
        async def serve() -> bytes:
            query = _decode_request(dead_letter_query_decoder, msg.data)
            return webhook_json.encode(await self.page(query))

        await self._serve(msg, serve)

    async def _on_redrive(self, msg: Msg) -> None:
        async def serve() -> bytes:
            request = _decode_request(redrive_request_decoder, msg.data)
            return webhook_json.encode(await self.redrive(request))

        await self._serve(msg, serve)

    async def _serve(self, msg: Msg, serve) -> None:  # type: ignore[no-untyped-def]
        try:
            body, headers = await serve(), {bus.HEADER_STATUS: "200"}
        except SessionManagerError as error:
            body, headers = b"", error_headers(error)
        except Exception:  # noqa: BLE001 - answered as an error, never left to time out
            log.warning("webhook_admin_failed", subject=msg.subject, exc_info=True)
            body, headers = b"", error_headers(InternalError("dead-letter store unavailable; try again"))
        if msg.reply:
            try:
                await self._nc.publish(msg.reply, body, headers=headers)
            except Exception:  # noqa: BLE001 - the caller times out
                log.warning("webhook_admin_reply_failed", exc_info=True)


def _decode_request(decoder: msgspec.json.Decoder, data: bytes):  # type: ignore[no-untyped-def]
    try:
        return decoder.decode(data or b"{}")
    except msgspec.ValidationError as exc:
        raise ValidationFailedError(str(exc)) from None
    except msgspec.DecodeError:
        raise ValidationFailedError("body must be a JSON object") from None


def _decode(data: bytes | None, seq: int) -> DeadLetter | None:
    try:
        dead = dead_letter_decoder.decode(data or b"")
        event_decoder.decode(dead.delivery.event)
        return dead
    except msgspec.DecodeError:
        log.warning("webhook_dead_letter_unreadable", seq=seq)
        return None

