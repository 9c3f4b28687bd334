"""Bot handlers: called for each inbound message of a session whose config names a bot.

A bot gets the message and a private copy of the session's context, returns the texts to
reply, and may change the context. The worker writes the inbound message, the context and the
replies (as pending outbound messages) in one fenced write, then sends the replies, so a crash
never leaves a half-applied bot turn and a failover resends what was not sent yet.
Bots come from the ``sessionmgr.bots`` entry-point group; ``echo`` and ``menu`` ship here.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

from sessionmgr.common.errors import ValidationFailedError
from sessionmgr.common.models import ChatMessage

BOT_GROUP = "sessionmgr.bots"


class Bot(Protocol):
    def on_message(self, message: ChatMessage, context: dict[str, Any]) -> list[str]: ...


class EchoBot:
    """Replies with the text it got."""

    def on_message(self, message: ChatMessage, context: dict[str, Any]) -> list[str]:
        return [message.text]


class MenuBot:
    """A numbered menu; each chat's place in it is kept in the session context (``menu``)."""

    CONTEXT_KEY: ClassVar[str] = "menu"
    MAX_CHATS: ClassVar[int] = 100  # bounded: the oldest chat's place is forgotten first
    PAGES: ClassVar[dict[str, tuple[str, dict[str, str]]]] = {
        "main": ("Welcome! Reply with a number:\n1. Opening hours\n2. Prices\n3. Talk to a person", {"1": "hours", "2": "prices", "3": "human"}),
        "hours": ("We are open Monday to Friday, 9:00-18:00.\n0. Back", {"0": "main"}),
        "prices": ("1. Basic plan\n2. Pro plan\n0. Back", {"1": "basic", "2": "pro", "0": "main"}),
        "basic": ("Basic: 10 EUR a month, one number.\n0. Back", {"0": "prices"}),
        "pro": ("Pro: 25 EUR a month, five numbers.\n0. Back", {"0": "prices"}),
        "human": ("A person will answer you here soon.\n0. Back", {"0": "main"}),
    }

    def on_message(self, message: ChatMessage, context: dict[str, Any]) -> list[str]:
        places = context.get(self.CONTEXT_KEY)
        if not isinstance(places, dict):
            places = {}
        place = places.pop(message.chat_id, None)  # popped and re-added: most recent chat last
        if place not in self.PAGES:
            place = "main"
            reply = self.PAGES[place][0]
        else:
            target = self.PAGES[place][1].get(message.text.strip())
            if target is None:
                reply = "Sorry, I did not understand that.\n" + self.PAGES[place][0]
            else:
                place = target
                reply = self.PAGES[place][0]
        places[message.chat_id] = place
        while len(places) > self.MAX_CHATS:
            places.pop(next(iter(places)))
        context[self.CONTEXT_KEY] = places
        return [reply]


class BotRegistry:
    def __init__(self) -> None:
        self._bots: dict[str, Bot] = {"echo": EchoBot(), "menu": MenuBot()}

    def load_entry_points(self) -> None:
        for point in entry_points(group=BOT_GROUP):
            if point.name not in self._bots:
                self._bots[point.name] = point.load()()

    def names(self) -> list[str]:
        return sorted(self._bots)

    def check(self, name: str | None) -> None:
        if name is not None and name not in self._bots:
            raise ValidationFailedError(f"unknown bot {name!r}; bots: {', '.join(self.names())}")

    def get(self, name: str) -> Bot:
        self.check(name)
        return self._bots[name]
