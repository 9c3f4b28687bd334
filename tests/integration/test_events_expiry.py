"""Session events in JetStream (a consumer that restarts misses nothing) and session expiry."""

from __future__ import annotations

from datetime import datetime

from litestar.testing import AsyncTestClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from sessionmgr.common.models import event_decoder
from sessionmgr.common.streams import EVENTS_STREAM
from sessionmgr.gateway.app import create_app
from tests.conftest import auth


async def _pull(nc, sid: str, durable: str):  # type: ignore[no-untyped-def]
    return await nc.jetstream().pull_subscribe(
        f"sm.events.{sid}.>",
        durable=durable,
        stream=EVENTS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
    )


async def _take(sub, count: int):  # type: ignore[no-untyped-def]
    events = []
    while len(events) < count:
        for msg in await sub.fetch(count - len(events), timeout=5):
            events.append((msg.subject, event_decoder.decode(msg.data)))
            await msg.ack()
    return events


async def test_events_consumer_that_restarts_resumes_where_it_stopped(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=1)
    headers = auth("events-user")
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        sid = (await api.post("/sessions", headers=headers)).json()["session_id"]
        await api.post(f"/sessions/{sid}/request", json={"action": "context.incr", "payload": {"key": "n"}}, headers=headers)
        await api.put(f"/sessions/{sid}", json={"state": "idle"}, headers=headers)

        consumer = await _pull(nc, sid, "svc-a")
        first = await _take(consumer, 2)
        await consumer.unsubscribe()  # the consumer goes away; its durable position stays

        await api.post(f"/sessions/{sid}/request", json={"action": "echo", "payload": {}}, headers=headers)  # no change, no event
        await api.post(f"/sessions/{sid}/request", json={"action": "context.set", "payload": {"k": "v"}}, headers=headers)
        await api.delete(f"/sessions/{sid}", headers=headers)

        resumed = await _pull(nc, sid, "svc-a")
        rest = await _take(resumed, 3)
        await resumed.unsubscribe()

    events = first + rest
    assert [e.type for _, e in events] == ["created", "request.applied", "updated", "request.applied", "terminated"]
    assert [subject.rsplit(".", 2)[-2:] for subject, _ in events][0] == [sid, "created"]
    assert [e.version for _, e in events] == [1, 2, 3, 4, 5]
    assert len({e.id for _, e in events}) == 5
    assert all(e.session_id == sid and e.user_id == "events-user" for _, e in events)
    assert all(isinstance(e.timestamp, datetime) for _, e in events)


async def test_untouched_session_expires_404s_leaves_the_listing_and_emits_expired(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=1, session_ttl=2, expiry_sweep_interval=0.1)
    headers = auth("expiring-user")
    async with AsyncTestClient(app=create_app(cluster.settings), base_url="http://gateway.local") as api:
        created = (await api.post("/sessions", headers=headers)).json()
        sid = created["session_id"]
        keeper = (await api.post("/sessions", headers=headers)).json()
        consumer = await _pull(nc, sid, "expiry-watch")

        # A change renews the expiry: SESSION_TTL after the change, later than before it.
        changed = (await api.post(f"/sessions/{keeper['session_id']}/request", json={"action": "context.set", "payload": {"a": 1}}, headers=headers)).json()
        renewed = (await api.get(f"/sessions/{keeper['session_id']}", headers=headers)).json()
        assert changed["version"] == 2 and renewed["version"] == 2
        assert renewed["expires_at"] > keeper["expires_at"]
        last_updated = datetime.fromisoformat(renewed["last_updated"])
        assert (datetime.fromisoformat(renewed["expires_at"]) - last_updated).total_seconds() == cluster.settings.session_ttl

        events = await _take(consumer, 2)  # created, then expired once the TTL passes
        assert [e.type for _, e in events] == ["created", "expired"]
        assert events[1][1].session_id == sid and events[1][1].user_id == "expiring-user"
        assert (await api.get(f"/sessions/{sid}", headers=headers)).status_code == 404
        listed = (await api.get("/sessions", headers=headers)).json()["items"]
        assert sid not in [s["session_id"] for s in listed]
        await consumer.unsubscribe()
