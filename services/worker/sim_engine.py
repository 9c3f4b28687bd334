"""The ``simulated`` engine: an offline stand-in for a WhatsApp Web client.

It behaves like one where the product can see it: QR codes that rotate until scanned (or a
pairing code), a linked account, text messages between simulated phone numbers with acks
``sent`` -> ``delivered`` -> ``read``, and faults. ``make run`` and the tests use it.

The "WhatsApp network" is NATS: a device is reached on ``sm.sim.phone.<number>``. Each worker
has one subscription for all of them (``sm.sim.phone.*``, :class:`SimNetwork`) and hands each
message to its local devices with that number: a subscription per device cost about 5 KB of
memory per session. Sending asks that subject; the recipient's answer is the ``delivered`` ack
and it reports ``read`` a moment later. A number nobody answers for within
``_DELIVERY_TIMEOUT`` is an outside contact that is always online: the sender sees delivered
and read after ``SIM_ACK_DELAY``. The network keeps nothing
for a linked device that is offline (it is not a WhatsApp server), so a message sent while the
recipient's session is between workers is acked by the outside-contact rule instead.
A device that connects announces itself on the same subject; an older device with the same
credentials disconnects as ``replaced``, as WhatsApp does when a second client logs in.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import re
import secrets
import time
import weakref
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
_SEEN_LIMIT = 32  # recent inbound keys; the worker's check against the stored history is the real one
_DELIVERY_TIMEOUT = 0.5


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


class SimNetwork:
    """One worker's end of the simulated network: one subscription, local devices by number."""

    _by_connection: weakref.WeakKeyDictionary[Any, SimNetwork] = weakref.WeakKeyDictionary()

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._devices: dict[str, list[SimulatedEngine]] = {}
        self._sub: Subscription | None = None
        self._subscribing: asyncio.Lock = asyncio.Lock()

    @classmethod
    def of(cls, nc: Any) -> SimNetwork:
        network = cls._by_connection.get(nc)
        if network is None:
            network = cls._by_connection[nc] = cls(nc)
        return network

    async def attach(self, phone: str, engine: SimulatedEngine) -> None:
        async with self._subscribing:
            if self._sub is None:
                self._sub = await self._nc.subscribe(f"{SIM_PREFIX}.*", cb=self._on_message)
        self._devices.setdefault(phone, []).append(engine)

    def detach(self, phone: str, engine: SimulatedEngine) -> None:
        devices = self._devices.get(phone)
        if devices is not None and engine in devices:
            devices.remove(engine)
            if not devices:
                del self._devices[phone]

    async def _on_message(self, msg: Msg) -> None:
        devices = self._devices.get(msg.subject[len(SIM_PREFIX) + 1 :])
        if not devices:
            return  # not a device of this worker's
        try:
            envelope = _envelope_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        answered = False
        for engine in list(devices):
            if isinstance(envelope, SimText) and msg.reply and not answered:
                await self._nc.publish(msg.reply, b"delivered")
                answered = True
            engine.on_network(envelope)


class SimulatedEngine:
    __slots__ = (
        "_spec", "_nc", "_network", "_events", "_ack_delay", "_qr_interval", "_qr_rotations", "_max_text",
        "_auth", "_device", "_connected", "_pairing", "_pairing_codes", "_seen", "_fail_connects", "_tasks",
    )

    def __init__(self, spec: EngineSpec, events: EngineEvents) -> None:
        self._spec = spec
        self._nc = spec.nc
        self._network = SimNetwork.of(spec.nc)
        self._events = events
        self._ack_delay = spec.settings.sim_ack_delay
        self._qr_interval = spec.settings.qr_rotate_interval
        self._qr_rotations = spec.settings.qr_max_rotations
        self._max_text = spec.settings.max_message_text
        self._auth: SimAuth | None = None
        self._device = ""
        self._connected = False
        self._pairing: asyncio.Task[None] | None = None
        # Made on first use: an idle connected device should cost little (10,000 per worker).
        self._pairing_codes: OrderedDict[str, str] | None = None
        self._seen: OrderedDict[str, None] | None = None
        self._fail_connects = 0
        self._tasks: set[asyncio.Task[None]] | None = None

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
        if not self._connected or self._auth is None:
            raise EngineError("not connected")
        phone = phone_of(chat_id)
        envelope = SimText(key=key_of(message_id), sender=self._auth.phone, text=text, timestamp=time.time())
        self._spawn(self._deliver(message_id, chat_id, phone, envelope))

    async def request_pairing_code(self, phone: str) -> str:
        if not PHONE_RE.match(phone):
            raise ValidationFailedError("phone must be 5-20 digits with the country code, no +")
        code = "".join(random.choice(_PAIRING_ALPHABET) for _ in range(8))
        if self._pairing_codes is None:
            self._pairing_codes = OrderedDict()
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
        for task in list(self._tasks or ()):
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
            phone = (self._pairing_codes or {}).pop(scan.code.replace("-", "").upper(), None)
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
        self._device = secrets.token_hex(8)
        # Older devices on these credentials hear the claim and step down (WhatsApp's conflict).
        await self._nc.publish(phone_subject(self._auth.phone), json_encoder.encode(SimClaim(device=self._device)))
        await self._network.attach(self._auth.phone, self)
        self._connected = True
        self._events.emit(Connected(me=self._me()))

    async def _disconnect(self) -> None:
        if self._connected and self._auth is not None:
            self._network.detach(self._auth.phone, self)
        self._connected = False

    async def _fault(self, fault: SimDisconnect) -> None:
        if not self._connected:
            return
        self._fail_connects = max(0, min(fault.fail_next_connects, 1000))
        await self._disconnect()
        if fault.logged_out:
            self._auth = None
        self._events.emit(Disconnected(reason=fault.reason, logged_out=fault.logged_out))

    def on_network(self, envelope: SimEnvelope) -> None:
        """A message for our number (the network already answered ``delivered`` for texts)."""
        if not self._connected:
            return
        if isinstance(envelope, SimClaim):
            if envelope.device != self._device:
                self._network.detach(self._auth.phone, self)  # type: ignore[union-attr]
                self._connected = False
                self._events.emit(Disconnected(reason="replaced by a newer connection of this device", replaced=True))
            return
        if isinstance(envelope, SimAck):
            chat = chat_id_of(envelope.reader)
            self._events.emit(MessageAck(id=outbound_id(chat, envelope.key), chat_id=chat, status=envelope.status))
            return
        if not self._remember(envelope.key):
            return  # a resend after a failover: delivered once
        chat = chat_id_of(envelope.sender)
        text = envelope.text[: self._max_text]
        self._events.emit(InboundMessage(id=inbound_id(chat, envelope.key), chat_id=chat, text=text, timestamp=envelope.timestamp))
        self._spawn(self._report_read(envelope))

    def _remember(self, key: str) -> bool:
        """False if ``key`` was seen lately (the worker also checks the stored history)."""
        if self._seen is None:
            self._seen = OrderedDict()
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > _SEEN_LIMIT:
            self._seen.popitem(last=False)
        return True

    async def _report_read(self, envelope: SimText) -> None:
        await asyncio.sleep(self._ack_delay)
        if self._auth is None:
            return
        ack = SimAck(key=envelope.key, reader=self._auth.phone, status="read")
        await self._nc.publish(phone_subject(envelope.sender), json_encoder.encode(ack))

    async def _deliver(self, message_id: str, chat_id: str, phone: str, envelope: SimText) -> None:
        try:
            await self._nc.request(phone_subject(phone), json_encoder.encode(envelope), timeout=_DELIVERY_TIMEOUT)
        except (NoRespondersError, NatsTimeoutError, TimeoutError):
            # Nobody answered for the number: an outside contact, always online, reads at once.
            await asyncio.sleep(self._ack_delay)
            self._events.emit(MessageAck(id=message_id, chat_id=chat_id, status="delivered"))
            await asyncio.sleep(self._ack_delay)
            self._events.emit(MessageAck(id=message_id, chat_id=chat_id, status="read"))
            return
        self._events.emit(MessageAck(id=message_id, chat_id=chat_id, status="delivered"))

    def _inbound(self, inbound: SimInbound) -> None:
        if not self._connected:
            raise EngineError("not connected")
        if not PHONE_RE.match(inbound.sender):
            raise ValidationFailedError("from must be 5-20 digits")
        if not 1 <= len(inbound.text) <= self._max_text:
            raise ValidationFailedError(f"text must be 1-{self._max_text} characters")
        key = _message_key()
        chat = chat_id_of(inbound.sender)
        self._remember(key)
        self._events.emit(InboundMessage(id=inbound_id(chat, key), chat_id=chat, text=inbound.text, timestamp=time.time()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _qr_payload() -> str:
    """The shape of a WhatsApp Web QR: ref, noise key, identity key, adv secret (base64)."""
    parts = [b64encode(secrets.token_bytes(n)).decode() for n in (24, 32, 32, 32)]
    return "2@" + ",".join(parts)


def _message_key() -> str:
    return "3EB0" + secrets.token_hex(8).upper()
