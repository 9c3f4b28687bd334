"""The engine interface: what a WhatsApp Web client must do for a session to run on it.

An engine is one linked device's connection. The worker that owns the session creates it,
starts it with the auth state stored in Redis, and hears back through :class:`EngineEvents`
(a QR to show, paired, connected, disconnected, a message, an ack). The engine never writes
session state itself: every event becomes a fenced, versioned write made by the worker, so an
engine on a worker that lost its shard cannot change anything (its writes are fenced and the
worker stops it). Engines come from the ``sessionmgr.engines`` entry-point group; the
built-in ``simulated`` engine is registered in this package's own metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

import msgspec
from nats.aio.client import Client as NATS

from sessionmgr.common.errors import ValidationFailedError
from sessionmgr.common.models import LinkedAccount
from sessionmgr.common.settings import Settings

ENGINE_GROUP = "sessionmgr.engines"


# ---- what an engine reports ---------------------------------------------------------------------


class QrCode(msgspec.Struct, tag="qr"):
    """A new QR payload to scan (it rotates until scanned)."""

    qr: str


class PairingTimedOut(msgspec.Struct, tag="pairing_timeout"):
    """Nobody scanned any of the QR codes in time: the session cannot connect without a person."""


class Paired(msgspec.Struct, tag="paired"):
    """A phone linked this device; ``auth`` is the state to store and restart from."""

    me: LinkedAccount
    auth: bytes


class AuthUpdated(msgspec.Struct, tag="auth"):
    """The credentials changed (key rotation in a real client): store them before going on."""

    auth: bytes


class Connected(msgspec.Struct, tag="connected"):
    me: LinkedAccount


class Disconnected(msgspec.Struct, tag="disconnected"):
    """The connection dropped. ``logged_out``: the phone unlinked this device (auth is void);
    ``replaced``: another client connected with the same credentials (WhatsApp's conflict)."""

    reason: str
    logged_out: bool = False
    replaced: bool = False


class InboundMessage(msgspec.Struct, tag="message"):
    id: str
    chat_id: str
    text: str
    timestamp: float


class MessageAck(msgspec.Struct, tag="ack"):
    id: str
    chat_id: str
    status: str  # sent | delivered | read


EngineEvent = QrCode | PairingTimedOut | Paired | AuthUpdated | Connected | Disconnected | InboundMessage | MessageAck


class EngineEvents(Protocol):
    """The worker side: events are queued per session and applied in order, never inline."""

    def emit(self, event: EngineEvent) -> None: ...


class EngineError(Exception):
    """The engine could not do what was asked (not connected, network, rejected)."""


class Engine(Protocol):
    async def start(self, auth: bytes | None) -> None:
        """Connect: with ``auth`` resume the linked device, without it begin pairing (QR codes)."""

    async def send_text(self, message_id: str, chat_id: str, text: str) -> None:
        """Hand a message to WhatsApp under our id; returns once the server accepted it (``sent``)."""

    async def request_pairing_code(self, phone: str) -> str:
        """Pair by phone number instead of QR: the 8-character code the user types on the phone."""

    async def logout(self) -> None:
        """Unlink the device at WhatsApp; the stored auth state is void afterwards."""

    async def stop(self) -> None:
        """Disconnect and release everything, keeping the auth state valid."""

    def command(self, name: str, payload: dict[str, object]) -> None:
        """Engine-specific operator commands (the simulated engine's ``simulate.*``)."""


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What the worker hands an engine factory for one session."""

    session_id: str
    worker_id: str
    settings: Settings
    nc: NATS  # the worker's connection, for engines that talk over NATS (the simulated one does)


EngineFactory = Callable[[EngineSpec, EngineEvents], Engine]


class EngineRegistry:
    """Engine factories by name: the entry points of ``sessionmgr.engines`` plus any registered here."""

    def __init__(self) -> None:
        self._factories: dict[str, EngineFactory] = {}

    def register(self, name: str, factory: EngineFactory) -> None:
        self._factories[name] = factory

    def load_entry_points(self) -> None:
        for point in entry_points(group=ENGINE_GROUP):
            if point.name not in self._factories:
                self._factories[point.name] = point.load()

    def names(self) -> list[str]:
        return sorted(self._factories)

    def check(self, name: str) -> None:
        if name not in self._factories:
            raise ValidationFailedError(f"unknown engine {name!r}; engines: {', '.join(self.names()) or 'none'}")

    def create(self, name: str, spec: EngineSpec, events: EngineEvents) -> Engine:
        self.check(name)
        return self._factories[name](spec, events)
