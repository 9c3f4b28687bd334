"""A WORKING WhatsApp session survives the death or pause of its worker without a new pairing.

Real worker processes run the ``simulated`` engine. The tests watch two things besides the REST
API: the simulated phone number's network subject (``sm.sim.phone.<number>``), where every device
that connects with the number's credentials announces itself with a claim, and the session's
``session.status`` events. A claim after the kill is the new owner linking the device again from
the stored auth state; no ``simulate.scan`` is ever sent after the first pairing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS

from sessionmgr.common import subjects
from sessionmgr.common.hashing import shard_for
from sessionmgr.common.models import event_decoder
from sessionmgr.common.settings import Settings
from sessionmgr.gateway.app import create_app
from sessionmgr.worker.sim_engine import SimClaim, SimEnvelope, phone_subject
from tests.conftest import auth
from tests.integration.test_whatsapp import eventually, messages, new_session, ok, phone, status_of, wait_status, working_session
from tests.support.cluster import HeartbeatWatch, read_shard_map

pytestmark = pytest.mark.slow
HEADERS = auth("whatsapp-chaos-user")
_envelope_decoder = msgspec.json.Decoder(SimEnvelope)


class DeviceClaims:
    """Devices connecting with one phone number's credentials, in the order they announced themselves."""

    def __init__(self) -> None:
        self.devices: list[str] = []

    async def on_network(self, msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            envelope = _envelope_decoder.decode(msg.data)
            if isinstance(envelope, SimClaim):
                self.devices.append(envelope.device)

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[str]:
        async def enough() -> list[str] | None:
            return self.devices if len(self.devices) >= count else None

        return await eventually(enough, timeout=timeout, what=f"{count} device claim(s)")  # type: ignore[no-any-return]


class StatusEvents:
    """The session's ``session.status`` events as NATS delivers them."""

    def __init__(self) -> None:
        self.statuses: list[tuple[int, str]] = []  # (version, status)

    async def on_event(self, msg: Any) -> None:
        event = event_decoder.decode(msg.data)
        self.statuses.append((event.version, event.data["status"]))


@contextlib.asynccontextmanager
async def watching(nc: NATS, number: str, session_id: str) -> AsyncIterator[tuple[DeviceClaims, StatusEvents]]:
    claims, events = DeviceClaims(), StatusEvents()
    subs = [
        await nc.subscribe(phone_subject(number), cb=claims.on_network),
        await nc.subscribe(subjects.event_subject(session_id, "session.status"), cb=events.on_event),
    ]
    await nc.flush()  # both in place before anything happens
    try:
        yield claims, events
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def owner_of(nc: NATS, settings: Settings, session_id: str) -> tuple[int, str | None, int]:
    """(shard, owner, epoch) of the session's shard in the current map."""
    shard = shard_for(session_id, settings.shard_count)
    entry = (await read_shard_map(nc)).shards[shard]
    return shard, entry.owner, entry.epoch


async def working_session_away_from(api: httpx.AsyncClient, nc: NATS, settings: Settings, worker: str, number: str) -> str:
    """A WORKING session whose shard another worker than ``worker`` owns (ids are random: try a few)."""
    for _ in range(40):
        sid = await new_session(api, HEADERS)
        if (await owner_of(nc, settings, sid))[1] != worker:
            await ok(api, HEADERS, sid, "connection.start")
            await wait_status(api, HEADERS, sid, "SCAN_QR_CODE")
            await ok(api, HEADERS, sid, "simulate.scan", {"phone": number})
            await wait_status(api, HEADERS, sid, "WORKING")
            return sid
    raise AssertionError(f"every new session landed on {worker}")


async def echo_round_trip(api: httpx.AsyncClient, person: str, bot_number: str, text: str) -> None:
    """``person`` writes to the echo bot's number and waits for the echo to come back."""
    chat = f"{bot_number}@c.us"
    await ok(api, HEADERS, person, "message.send_text", {"chat_id": chat, "text": text})

    async def echoed() -> bool:
        return any(not m["from_me"] and m["text"] == text for m in await messages(api, HEADERS, person, chat_id=chat))

    await eventually(echoed, timeout=10, what=f"the echo of {text!r}")


async def echo_bot_and_person(api: httpx.AsyncClient, nc: NATS, settings: Settings) -> tuple[str, str, str, int, str, int]:
    """A WORKING echo-bot session and a WORKING person session on the other worker:
    (bot number, bot session, person session, the bot's shard, its owner, the shard's epoch)."""
    bot_number, person_number = phone(), phone()
    bot = await working_session(api, HEADERS, bot_number, bot="echo")
    shard, victim, epoch = await owner_of(nc, settings, bot)
    assert victim is not None
    person = await working_session_away_from(api, nc, settings, victim, person_number)
    return bot_number, bot, person, shard, victim, epoch


def texts(history: list[dict[str, Any]], *, from_me: bool) -> list[str]:
    return [m["text"] for m in history if m["from_me"] is from_me]


async def test_killed_owner_session_is_working_on_another_worker_without_pairing(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=2)
    settings = cluster.settings
    async with AsyncTestClient(app=create_app(settings), base_url="http://gateway.local") as api:
        bot_number, bot, person, shard, victim, epoch = await echo_bot_and_person(api, nc, settings)
        for text in ("one", "two"):
            await echo_round_trip(api, person, bot_number, text)
        history = await messages(api, HEADERS, bot)
        assert texts(history, from_me=False) == ["two", "one"] and texts(history, from_me=True) == ["two", "one"]
        me = (await status_of(api, HEADERS, bot))["me"]
        assert me["id"] == f"{bot_number}@c.us"

        async with watching(nc, bot_number, bot) as (claims, events):
            cluster.workers[victim].kill()
            survivors = set(cluster.workers) - {victim}
            await watch.wait_covered(settings.shard_count, survivors)
            _, new_owner, new_epoch = await owner_of(nc, settings, bot)
            assert new_owner in survivors and new_epoch == epoch + 1
            # The new owner links the device again from the stored auth state: one claim, no QR.
            await claims.wait_for(1)
            connection = await wait_status(api, HEADERS, bot, "WORKING")
            assert connection["me"] == me and connection["last_error"] is None
            after = await messages(api, HEADERS, bot)
            assert [(m["id"], m["text"], m["from_me"]) for m in after] == [(m["id"], m["text"], m["from_me"]) for m in history]
            # The device is really connected on the new owner: a message reaches the bot, which answers.
            await echo_round_trip(api, person, bot_number, "three")
            bot_history = await messages(api, HEADERS, bot)
            assert texts(bot_history, from_me=False) == ["three", "two", "one"]
            assert texts(bot_history, from_me=True) == ["three", "two", "one"]
            assert len(claims.devices) == 1, claims.devices
            # Never back through pairing or a reconnect: no status change was written at all.
            assert events.statuses == [], events.statuses


async def _caught_up(nc: NATS, watch: HeartbeatWatch, worker: str, after_seq: int, shard: int) -> None:
    """``worker`` heartbeats again (newer than ``after_seq``) serving ``shard`` and exactly the shards the map gives it."""

    async def check() -> bool:
        beat = watch.live().get(worker)
        if beat is None or beat.seq <= after_seq or shard not in beat.shards:
            return False
        shard_map = await read_shard_map(nc)
        return sorted(beat.shards) == [i for i, e in enumerate(shard_map.shards) if e.owner == worker]

    await eventually(check, timeout=20, what=f"{worker} caught up with the shard map")


async def test_paused_owner_does_not_keep_or_take_back_the_device(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, watch, nc = await make_cluster(workers=2)
    settings = cluster.settings
    async with AsyncTestClient(app=create_app(settings), base_url="http://gateway.local") as api:
        bot_number, bot, person, shard, victim, epoch = await echo_bot_and_person(api, nc, settings)
        await echo_round_trip(api, person, bot_number, "before")
        me = (await status_of(api, HEADERS, bot))["me"]

        async with watching(nc, bot_number, bot) as (claims, events):
            paused_at_seq = watch.latest[victim][0].seq
            cluster.workers[victim].pause()
            try:
                survivors = set(cluster.workers) - {victim}
                await watch.wait_covered(settings.shard_count, survivors)  # past the failure window: moved
                _, new_owner, new_epoch = await owner_of(nc, settings, bot)
                assert new_owner in survivors and new_epoch == epoch + 1
                await claims.wait_for(1)  # the new owner holds the device while the old one sleeps
                paused_at_seq = max(paused_at_seq, watch.latest[victim][0].seq)
            finally:
                cluster.workers[victim].resume()
            # Awake, the old worker hears the newer device's claim and the new map: it lost the shard.
            # Rendezvous hashing then gives the shard straight back to it (the same workers are live
            # again), as a handoff with a newer epoch: the interim owner lets go of the device first,
            # and the old worker links it again from the stored auth state instead of keeping the
            # engine it had before the pause. Every take is exactly one device claim.
            await _caught_up(nc, watch, victim, paused_at_seq, shard)
            _, final_owner, final_epoch = await owner_of(nc, settings, bot)
            assert (final_owner, final_epoch) == (victim, epoch + 2)
            await claims.wait_for(2)

            await echo_round_trip(api, person, bot_number, "after")
            bot_history = await messages(api, HEADERS, bot)
            assert texts(bot_history, from_me=False).count("after") == 1, bot_history
            assert texts(bot_history, from_me=True).count("after") == 1, bot_history
            echoes = [m for m in await messages(api, HEADERS, person, chat_id=f"{bot_number}@c.us") if not m["from_me"]]
            assert [m["text"] for m in echoes].count("after") == 1, echoes

            connection = await status_of(api, HEADERS, bot)
            assert connection["status"] == "WORKING" and connection["me"] == me, connection
            assert connection["last_error"] is None, connection
            # No owner was ever kicked off as "replaced": no FAILED (or any other) status was written.
            assert all(status == "WORKING" for _, status in events.statuses), events.statuses
            assert len(claims.devices) == 2 and len(set(claims.devices)) == 2, claims.devices
