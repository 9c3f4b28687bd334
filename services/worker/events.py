"""Session events on ``sm.events.<session_id>.<type>``, captured by the SM_EVENTS stream.

Published after the change is persisted, on the worker's one NATS connection, so a session's
events keep their order. ``Nats-Msg-Id`` is the event id, so a duplicate publish is dropped by
the stream's duplicate window.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from nats.aio.client import Client as NATS

from sessionmgr.common import subjects
from sessionmgr.common.ids import new_request_id
from sessionmgr.common.models import SessionEvent, WebhookConfig, json_encoder

if TYPE_CHECKING:
    from sessionmgr.worker.webhooks import WebhookService

log = structlog.get_logger(__name__)


class EventPublisher:
    def __init__(self, nc: NATS, webhooks: WebhookService | None = None) -> None:
        self._nc = nc
        self._webhooks = webhooks

    async def publish(
        self,
        event_type: str,
        *,
        session_id: str,
        user_id: str,
        version: int,
        data: Any = None,
        webhooks: Sequence[WebhookConfig] = (),
    ) -> None:
        event = SessionEvent(
            id=new_request_id(),
            type=event_type,
            session_id=session_id,
            user_id=user_id,
            version=version,
            timestamp=datetime.now(UTC),
            data=data,
        )
        try:
            await self._nc.publish(subjects.event_subject(session_id, event_type), json_encoder.encode(event), headers={"Nats-Msg-Id": event.id})
        except Exception:  # noqa: BLE001 - the change is persisted; an event lost to a NATS outage is logged
            log.warning("event_publish_failed", event_type=event_type, session_id=session_id)
        if self._webhooks is not None:
            await self._webhooks.enqueue(event, webhooks)
