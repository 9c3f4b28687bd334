"""Webhook delivery (issue 7): placeholder until the dispatcher lands; the interface is fixed.

``enqueue`` is called after every persisted change's event with that session's webhooks;
``run`` delivers until cancelled.
"""

from __future__ import annotations

from collections.abc import Sequence

from nats.aio.client import Client as NATS

from sessionmgr.common.models import SessionEvent, WebhookConfig
from sessionmgr.common.settings import Settings


class WebhookService:
    def __init__(self, *, nc: NATS, settings: Settings) -> None:
        self._nc = nc
        self._settings = settings

    async def start(self) -> None:
        """Create the streams and subscribe the operator subjects."""

    async def enqueue(self, event: SessionEvent, session_webhooks: Sequence[WebhookConfig]) -> None:
        """Record one delivery per matching webhook (session and global); never raises."""

    async def run(self) -> None:
        """Deliver until cancelled."""
