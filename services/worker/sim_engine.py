"""The ``simulated`` engine: an offline stand-in for a WhatsApp Web client.

It behaves like one where the product can see it: QR codes that rotate until scanned (or a
pairing code), a linked account, text messages between simulated phone numbers with acks
``sent`` -> ``delivered`` -> ``read``, and faults. ``make run`` and the tests use it.

The "WhatsApp network" is NATS: a connected device listens on ``sm.sim.phone.<number>``.
Sending asks that subject; the recipient's answer is the ``delivered`` ack and it reports
``read`` a moment later. A number nobody has linked is an outside contact that is always
online: the sender sees delivered and read after ``SIM_ACK_DELAY``. The network keeps nothing
for a linked device that is offline (it is not a WhatsApp server), so a message sent while the
recipient's session is between workers is acked by the outside-contact rule instead.
A device that connects announces itself on the same subject; an older device with the same
credentials disconnects as ``replaced``, as WhatsApp does when a second client logs in.
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import string
import time
from base64 import b64encode
from collections import OrderedDict
from typing import Any

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from sessionmgr.common.errors import ValidationFailedError
from sessionmgr.common.models import LinkedAccount, json_encoder
from sessionmgr.worker.engine import (
    Connected,
    Disconnected,
    EngineError,
    EngineEvents,
    EngineSpec,
    InboundMessage,
    MessageAck,
    Paired,
    PairingTimedOut,
    QrCode,
)

log = structlog.get_logger(__name__)

SIM_PREFIX = "sm.sim.phone"
PHONE_RE = re.compile(r"^[0-9]{5,20}$")
_PAIRING_ALPHABET = "ABCDEFGHJKLMNPQRSTVWXYZ23456789"  # no look-alikes, as WhatsApp's codes
_MAX_PAIRING_CODES = 8
_SEEN_LIMIT = 1024
_DELIVERY_TIMEOUT = 2.0


def phone_subject(phone: str) -> str:
    return f"{SIM_PREFIX}.{phone}"


def chat_id_of(phone: str) -> str:
    return f"{phone}@c.us"


def phone_of(chat_id: str) -> str:
    phone, _, server = chat_id.partition("@")
    if server != "c.us" or not PHONE_RE.match(phone):
        raise ValidationFailedError(f"chat_id must be <phone digits>@c.us, got {chat_id!r}")
    return phone


# ---- what travels on the simulated network -------------------------------------------------


class SimText(msgspec.Struct, tag="text"):
    key: str  # the message key both sides' ids are built from
    sender: str
    text: str
    timestamp: float


class SimAck(msgspec.Struct, tag="ack"):
    key: str
    reader: str
    status: str


class SimClaim(msgspec.Struct, tag="claim"):
    device: str  # a connection's random id: a newer claim replaces every other device


SimEnvelope = SimText | SimAck | SimClaim
_envelope_decoder = msgspec.json.Decoder(SimEnvelope)


class SimAuth(msgspec.Struct):
    """The simulated linked device's credentials (a real engine stores its keys here)."""

    phone: str
    push_name: str | None
    device_key: str


_auth_decoder = msgspec.json.Decoder(SimAuth)


def outbound_id(chat_id: str, key: str) -> str:
    return f"true_{chat_id}_{key}"


def inbound_id(chat_id: str, key: str) -> str:
    return f"false_{chat_id}_{key}"


def key_of(message_id: str) -> str:
    return message_id.rsplit("_", 1)[-1]


class SimScan(msgspec.Struct, forbid_unknown_fields=True):
    phone: str | None = None
    code: str | None = None
    push_name: str | None = None


class SimInbound(msgspec.Struct, forbid_unknown_fields=True):
    sender: str = msgspec.field(name="from")
    text: str


class SimDisconnect(msgspec.Struct, forbid_unknown_fields=True):
    reason: str = "simulated network failure"
    logged_out: bool = False
    fail_next_connects: int = 0


class SimulatedEngine:
    def __init__(self, spec: EngineSpec, events: EngineEvents) -> None:
        self._spec = spec
        self._nc = spec.nc
        self._events = events
        self._ack_delay = spec.settings.sim_ack_delay
        self._qr_interval = spec.settings.qr_rotate_interval
        self._qr_rotations = spec.settings.qr_max_rotations
        self._max_text = spec.settings.max_message_text
        self._auth: SimAuth | None = None
        self._device = secrets.token_hex(8)
        self._sub: Subscription | None = None
        self._pairing: asyncio.Task[None] | None = None
        self._pairing_codes: OrderedDict[str, str] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._fail_connects = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- the Engine interface -------------------------------------------------------------

    async def start(self, auth: bytes | None) -> None:
        if self._fail_connects > 0:
            self._fail_connects -= 1
            raise EngineError("simulated connection failure")
        if auth is None:
            self._stop_pairing()
            self._pairing = asyncio.get_running_loop().create_task(self._rotate_qr())
            return
        try:
            self._auth = _auth_decoder.decode(auth)
        except msgspec.DecodeError:
            raise EngineError("stored auth state is not a simulated device's") from None
        await self._connect()

    async def send_text(self, message_id: str, chat_id: str, text: str) -> None:
        if self._sub is None or self._auth is None:
            raise EngineError("not connected")
        phone = phone_of(chat_id)
        envelope = SimText(key=key_of(message_id), sender=self._auth.phone, text=text, timestamp=time.time())
        self._spawn(self._deliver(message_id, chat_id, phone, envelope))

    async def request_pairing_code(self, phone: str) -> str:
        if not PHONE_RE.match(phone):
            raise ValidationFailedError("phone must be 5-20 digits with the country code, no +")
        code = "".join(random.choice(_PAIRING_ALPHABET) for _ in range(8))
        self._pairing_codes[code] = phone
        while len(self._pairing_codes) > _MAX_PAIRING_CODES:
            self._pairing_codes.popitem(last=False)
        return code

    async def logout(self) -> None:
        await self._disconnect()
        self._auth = None

    async def stop(self) -> None:
        self._stop_pairing()
        await self._disconnect()
        for task in list(self._tasks):
            task.cancel()

    def command(self, name: str, payload: dict[str, Any]) -> None:
        try:
            if name == "simulate.scan":
                self._scan(msgspec.convert(payload, SimScan))
            elif name == "simulate.inbound":
                self._inbound(msgspec.convert(payload, SimInbound))
            elif name == "simulate.disconnect":
                self._spawn(self._fault(msgspec.convert(payload, SimDisconnect)))
            else:
                raise ValidationFailedError(f"the simulated engine has no command {name!r}")
        except msgspec.ValidationError as exc:
            raise ValidationFailedError(f"payload: {exc}") from None

    # ---- pairing --------------------------------------------------------------------------

    async def _rotate_qr(self) -> None:
        for _ in range(self._qr_rotations):
            self._events.emit(QrCode(qr=_qr_payload()))
            await asyncio.sleep(self._qr_interval)
        self._events.emit(PairingTimedOut())

    def _stop_pairing(self) -> None:
        if self._pairing is not None:
            self._pairing.cancel()
            self._pairing = None

    def _scan(self, scan: SimScan) -> None:
        if self._pairing is None or self._pairing.done():
            raise EngineError("no QR code is waiting to be scanned")
        phone = scan.phone
        if scan.code is not None:
            phone = self._pairing_codes.pop(scan.code.replace("-", "").upper(), None)
            if phone is None:
                raise ValidationFailedError("unknown pairing code")
        if phone is None or not PHONE_RE.match(phone):
            raise ValidationFailedError("simulate.scan needs a phone (5-20 digits) or a pairing code")
        self._stop_pairing()
        self._auth = SimAuth(phone=phone, push_name=scan.push_name, device_key=secrets.token_hex(16))
        self._events.emit(Paired(me=self._me(), auth=json_encoder.encode(self._auth)))
        self._spawn(self._connect())

    # ---- the connection -------------------------------------------------------------------

    def _me(self) -> LinkedAccount:
        assert self._auth is not None
        return LinkedAccount(id=chat_id_of(self._auth.phone), push_name=self._auth.push_name)

    async def _connect(self) -> None:
        assert self._auth is not None
        subject = phone_subject(self._auth.phone)
        self._device = secrets.token_hex(8)
        # Older devices on these credentials hear the claim and step down (WhatsApp's conflict).
        await self._nc.publish(subject, json_encoder.encode(SimClaim(device=self._device)))
        self._sub = await self._nc.subscribe(subject, cb=self._on_network)
        self._events.emit(Connected(me=self._me()))

    async def _disconnect(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the NATS connection may be gone already
                log.debug("sim_unsubscribe_failed", exc_info=True)

    async def _fault(self, fault: SimDisconnect) -> None:
        if self._sub is None:
            return
        self._fail_connects = max(0, min(fault.fail_next_connects, 1000))
        await self._disconnect()
        if fault.logged_out:
            self._auth = None
        self._events.emit(Disconnected(reason=fault.reason, logged_out=fault.logged_out))

    async def _on_network(self, msg: Msg) -> None:
        try:
            envelope = _envelope_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if isinstance(envelope, SimClaim):
            if envelope.device != self._device and self._sub is not None:
                await self._disconnect()
                self._events.emit(Disconnected(reason="replaced by a newer connection of this device", replaced=True))
            return
        if isinstance(envelope, SimAck):
            chat = chat_id_of(envelope.reader)
            self._events.emit(MessageAck(id=outbound_id(chat, envelope.key), chat_id=chat, status=envelope.status))
            return
        if msg.reply:
            await self._nc.publish(msg.reply, b"delivered")
        if envelope.key in self._seen:
            return  # a resend after a failover: delivered once
        self._seen[envelope.key] = None
        if len(self._seen) > _SEEN_LIMIT:
            self._seen.popitem(last=False)
        chat = chat_id_of(envelope.sender)
        text = envelope.text[: self._max_text]
        self._events.emit(InboundMessage(id=inbound_id(chat, envelope.key), chat_id=chat, text=text, timestamp=envelope.timestamp))
        self._spawn(self._report_read(envelope))

    async def _report_read(self, envelope: SimText) -> None:
        await asyncio.sleep(self._ack_delay)
        if self._auth is None:
            return
        ack = SimAck(key=envelope.key, reader=self._auth.phone, status="read")
        await self._nc.publish(phone_subject(envelope.sender), json_encoder.encode(ack))

    async def _deliver(self, message_id: str, chat_id: str, phone: str, envelope: SimText) -> None:
        try:
            await self._nc.request(phone_subject(phone), json_encoder.encode(envelope), timeout=_DELIVERY_TIMEOUT)
        except NoRespondersError:
            # An outside contact: always online, reads at once.
            await asyncio.sleep(self._ack_delay)
            self._events.emit(MessageAck(id=message_id, chat_id=chat_id, status="delivered"))
            await asyncio.sleep(self._ack_delay)
            self._events.emit(MessageAck(id=message_id, chat_id=chat_id, status="read"))
            return
        except (NatsTimeoutError, TimeoutError):
            return  # stays "sent", as a message to a phone that is off
        self._events.emit(MessageAck(id=message_id, chat_id=chat_id, status="delivered"))

    def _inbound(self, inbound: SimInbound) -> None:
        if self._sub is None:
            raise EngineError("not connected")
        if not PHONE_RE.match(inbound.sender):
            raise ValidationFailedError("from must be 5-20 digits")
        if not 1 <= len(inbound.text) <= self._max_text:
            raise ValidationFailedError(f"text must be 1-{self._max_text} characters")
        key = _message_key()
        chat = chat_id_of(inbound.sender)
        self._seen[key] = None
        self._events.emit(InboundMessage(id=inbound_id(chat, key), chat_id=chat, text=inbound.text, timestamp=time.time()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _qr_payload() -> str:
    """The shape of a WhatsApp Web QR: ref, noise key, identity key, adv secret (base64)."""
    parts = [b64encode(secrets.token_bytes(n)).decode() for n in (24, 32, 32, 32)]
    return "2@" + ",".join(parts)


def _message_key() -> str:
    return "3EB0" + "".join(random.choices(string.hexdigits.upper()[:16], k=16))


def new_message_key() -> str:
    return _message_key()
