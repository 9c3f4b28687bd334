"""nats.conf's ``sessions.*.>`` mapping lands on the shard the gateway computes, bit for bit.

A real nats-server (started with nats.conf) maps ``sessions.<sid>.<op>`` to
``sm.shard.{{partition(64,1)}}.<sid>.<op>``; the gateway computes the same subject with
``hashing.shard_for``. If the two ever disagree, CLI requests reach a worker that does not own
the session. No worker is needed: a plain subscriber sees what the server produced.
"""

from __future__ import annotations

import asyncio
import secrets
import string

from nats.aio.msg import Msg

from sessionmgr.common import subjects
from sessionmgr.common.hashing import shard_for
from tests.support.cluster import Servers, nats_client

SHARD_COUNT = 64  # the partition count in nats.conf (tests/unit/test_compose.py checks they agree)
TIMEOUT = 10.0


async def _publish_and_collect(servers: Servers, published: list[str]) -> list[str]:
    """Publish each ``sessions.*`` subject once; return the mapped subjects as delivered."""
    received: list[str] = []
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        received.append(msg.subject)
        if len(received) >= len(published):
            done.set()

    async with nats_client(servers.nats_url) as nc:
        sub = await nc.subscribe(f"{subjects.SHARD_PREFIX}.>", cb=on_msg)
        await nc.flush()  # the interest is registered before the first publish
        for subject in published:
            await nc.publish(subject, b"{}")
        await nc.flush()
        try:
            await asyncio.wait_for(done.wait(), timeout=TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"only {len(received)} of {len(published)} mapped messages arrived") from None
        finally:
            await sub.unsubscribe()
    return received


def _by_session(received: list[str]) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    for subject in received:
        shard, sid, op = subjects.parse_shard_subject(subject)
        out[sid] = (shard, op)
    return out


async def test_cli_subjects_map_to_the_gateways_shard(servers: Servers) -> None:
    sids = {secrets.token_urlsafe(12) for _ in range(500)}
    while len(sids) < 500:
        sids.add(secrets.token_urlsafe(12))
    received = await _publish_and_collect(servers, [f"{subjects.CLI_PREFIX}.{sid}.{subjects.OP_GET}" for sid in sorted(sids)])
    got = _by_session(received)
    assert set(got) == sids, "a session ID did not survive the mapping"
    wrong = {sid: (shard, shard_for(sid, SHARD_COUNT)) for sid, (shard, _) in got.items() if shard != shard_for(sid, SHARD_COUNT)}
    assert not wrong, f"server shard != shard_for for {len(wrong)} IDs, e.g. {next(iter(wrong.items()))}"
    assert all(op == subjects.OP_GET for _, op in got.values())
    # ...and it is exactly the subject the gateway would have sent to.
    assert sorted(received) == sorted(subjects.session_subject(sid, subjects.OP_GET, SHARD_COUNT) for sid in sids)
    assert len({shard for shard, _ in got.values()}) > 32  # 500 IDs spread over most shards


async def test_ids_of_every_length_and_character(servers: Servers) -> None:
    alphabet = string.ascii_letters + string.digits + "-_"
    sids = {"".join(secrets.choice(alphabet) for _ in range(length)) for length in range(1, 65) for _ in range(3)}
    sids |= {"-", "_", "0", "x" * 64}
    received = await _publish_and_collect(servers, [f"sessions.{sid}.session.get" for sid in sorted(sids)])
    got = _by_session(received)
    assert set(got) == sids
    assert all(shard == shard_for(sid, SHARD_COUNT) for sid, (shard, _) in got.items())


async def test_dotted_ops_keep_every_token(servers: Servers) -> None:
    sids = [secrets.token_urlsafe(12) for _ in range(20)]
    ops = ["context.incr", "context.get", "session.create", "a.b.c.d"]
    published = [f"sessions.{sid}.{op}" for sid in sids for op in ops]
    received = await _publish_and_collect(servers, published)
    expected = sorted(f"sm.shard.{shard_for(sid, SHARD_COUNT)}.{sid}.{op}" for sid in sids for op in ops)
    assert sorted(received) == expected
    for subject in received:
        shard, sid, op = subjects.parse_shard_subject(subject)
        assert op in ops and shard == shard_for(sid, SHARD_COUNT)
