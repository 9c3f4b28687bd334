"""Bot handlers and the plug-in registries (pure logic: no servers)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from sessionmgr.common.errors import ValidationFailedError
from sessionmgr.common.models import ChatMessage
from sessionmgr.worker.bots import BotRegistry, EchoBot, MenuBot
from sessionmgr.worker.engine import EngineRegistry


def inbound(text: str, chat: str = "4911@c.us") -> ChatMessage:
    return ChatMessage(id=f"false_{chat}_K", chat_id=chat, from_me=False, text=text, timestamp=datetime.now(UTC), status="received")


def test_echo_replies_with_the_text() -> None:
    assert EchoBot().on_message(inbound("hello"), {}) == ["hello"]


def test_menu_walks_pages_per_chat_and_remembers_the_place_in_the_context() -> None:
    bot, context = MenuBot(), {}  # type: ignore[var-annotated]
    assert "Reply with a number" in bot.on_message(inbound("hi"), context)[0]
    assert "Basic plan" in bot.on_message(inbound("2"), context)[0]
    assert "did not understand" in bot.on_message(inbound("7"), context)[0]
    assert context["menu"] == {"4911@c.us": "prices"}
    # Another chat starts at the top and does not move the first one.
    assert "Reply with a number" in bot.on_message(inbound("2", chat="4922@c.us"), context)[0]
    assert context["menu"] == {"4911@c.us": "prices", "4922@c.us": "main"}


def test_menu_forgets_the_oldest_chats_past_its_bound() -> None:
    bot, context = MenuBot(), {}  # type: ignore[var-annotated]
    for i in range(MenuBot.MAX_CHATS + 5):
        bot.on_message(inbound("hi", chat=f"49{i:05d}@c.us"), context)
    places: dict[str, Any] = context["menu"]
    assert len(places) == MenuBot.MAX_CHATS
    assert "4900000@c.us" not in places and f"49{MenuBot.MAX_CHATS + 4:05d}@c.us" in places


def test_registries_name_the_known_plugins_when_refusing_an_unknown_one() -> None:
    bots = BotRegistry()
    bots.check(None)
    bots.check("menu")
    with pytest.raises(ValidationFailedError, match="echo, menu"):
        bots.check("nope")
    engines = EngineRegistry()
    engines.load_entry_points()
    assert "simulated" in engines.names()
    with pytest.raises(ValidationFailedError, match="simulated"):
        engines.check("baileys")
