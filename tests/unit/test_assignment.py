"""Supervisor logic without processes: shard reassignment and heartbeat-based membership."""

from __future__ import annotations

import msgspec

from sessionmgr.common.hashing import rendezvous_owner
from sessionmgr.common.models import Heartbeat, ShardMap, ShardOwner, shard_map_decoder
from sessionmgr.supervisor.assignment import initial_map, reassign
from sessionmgr.supervisor.membership import Membership

SHARDS = 64


def _reassign(current: ShardMap, eligible: list[str], alive: set[str] | None = None, *, term: int = 1, now: float = 0.0):  # type: ignore[no-untyped-def]
    """``alive`` defaults to the eligible workers (nobody draining)."""
    return reassign(current, eligible, set(eligible) if alive is None else alive, term=term, now=now)


def _map_for(workers: list[str], *, term: int = 1, now: float = 0.0) -> ShardMap:
    new, moved = _reassign(initial_map(SHARDS, term=term, first_epoch=1, now=now), workers, term=term, now=now)
    assert moved == list(range(SHARDS))
    return new


# ---- assignment ------------------------------------------------------------------------------


def test_initial_map_is_unowned() -> None:
    m = initial_map(SHARDS, term=3, first_epoch=5, now=12.5)
    assert m.term == 3 and m.updated_at == 12.5
    assert len(m.shards) == SHARDS
    assert all(s.owner is None and s.epoch == 5 for s in m.shards)


def test_first_assignment_gives_every_shard_an_owner_and_bumps_every_epoch() -> None:
    workers = ["w1", "w2", "w3"]
    m = _map_for(workers, term=2, now=1.0)
    assert m.term == 2 and m.updated_at == 1.0
    for index, entry in enumerate(m.shards):
        assert entry.owner == rendezvous_owner(index, sorted(workers))
        assert entry.epoch == 2


def test_reassign_moves_only_changed_shards_and_bumps_only_their_epochs() -> None:
    before = _map_for(["w1", "w2", "w3", "w4"])
    after, moved = _reassign(before, ["w1", "w2", "w4"], term=1, now=2.0)
    expected_moved = [i for i, s in enumerate(before.shards) if s.owner == "w3"]
    assert moved == expected_moved and moved
    for index, (old, new) in enumerate(zip(before.shards, after.shards, strict=True)):
        if index in moved:
            assert new.owner in ("w1", "w2", "w4")
            assert new.epoch == old.epoch + 1
        else:
            assert new == old
    assert after.updated_at == 2.0


def test_join_moves_shards_only_to_the_new_worker() -> None:
    before = _map_for(["w1", "w2", "w3"])
    after, moved = _reassign(before, ["w1", "w2", "w3", "w4"], term=1, now=3.0)
    assert moved
    assert all(after.shards[i].owner == "w4" for i in moved)
    assert all(after.shards[i].epoch == before.shards[i].epoch + 1 for i in moved)
    assert all(after.shards[i] == before.shards[i] for i in range(SHARDS) if i not in moved)


def test_reassign_is_independent_of_live_list_order() -> None:
    base = initial_map(SHARDS, term=1, first_epoch=1, now=0.0)
    a, _ = _reassign(base, ["w3", "w1", "w2"], term=1, now=0.0)
    b, _ = _reassign(base, ["w1", "w2", "w3"], term=1, now=0.0)
    assert a.shards == b.shards


def test_nothing_changes_when_owners_are_already_right() -> None:
    before = _map_for(["w1", "w2"])
    after, moved = _reassign(before, ["w2", "w1"], term=9, now=99.0)
    assert moved == []
    assert after is before  # no new term, no new write


def test_no_live_workers_moves_nothing() -> None:
    before = _map_for(["w1", "w2"])
    after, moved = _reassign(before, [], term=2, now=5.0)
    assert moved == []
    assert after is before
    assert all(s.owner in ("w1", "w2") for s in after.shards)


def test_no_live_workers_on_an_empty_map() -> None:
    empty = initial_map(SHARDS, term=1, first_epoch=1, now=0.0)
    after, moved = _reassign(empty, [], term=1, now=1.0)
    assert moved == [] and after is empty


def test_epochs_never_go_backwards_across_many_changes() -> None:
    m = _map_for(["w1", "w2", "w3"])
    history = [["w1", "w2"], ["w1", "w2", "w5"], ["w5"], ["w1", "w5", "w6"], ["w1", "w2", "w3"]]
    for term, live in enumerate(history, start=2):
        new, moved = _reassign(m, live, term=term, now=float(term))
        for i in range(SHARDS):
            assert new.shards[i].epoch == m.shards[i].epoch + (1 if i in moved else 0)
            assert new.shards[i].owner in live
        m = new


def test_shard_map_round_trips_and_reads_the_older_two_field_owner_form() -> None:
    m = ShardMap(term=1, shards=[ShardOwner(owner="w1", epoch=3), ShardOwner(owner=None, epoch=1)], updated_at=0.0)
    assert shard_map_decoder.decode(msgspec.json.encode(m)) == m
    old = shard_map_decoder.decode(b'{"term":1,"shards":[["w1",3],[null,1]],"updated_at":0.0}')
    assert [(s.owner, s.epoch) for s in old.shards] == [("w1", 3), (None, 1)]


def test_a_move_away_from_a_live_worker_names_it_as_previous() -> None:
    before = _map_for(["w1", "w2", "w3"])
    # w3 is draining: still alive (answers until it hands over) but no longer eligible.
    after, moved = _reassign(before, ["w1", "w2"], {"w1", "w2", "w3"})
    assert moved == [i for i, s in enumerate(before.shards) if s.owner == "w3"]
    assert all(after.shards[i].previous == "w3" for i in moved)


def test_a_move_away_from_a_dead_worker_has_no_previous() -> None:
    before = _map_for(["w1", "w2", "w3"])
    after, moved = _reassign(before, ["w1", "w2"], {"w1", "w2"})
    assert moved
    assert all(after.shards[i].previous is None for i in moved)


def test_drained_workers_get_no_shards() -> None:
    before = msgspec.structs.replace(_map_for(["w1", "w2", "w3"]), drained=["w2"])
    after, moved = _reassign(before, ["w1", "w2", "w3"])
    assert moved == [i for i, s in enumerate(before.shards) if s.owner == "w2"]
    assert {s.owner for s in after.shards} == {"w1", "w3"}
    assert after.drained == ["w2"]


def test_pinned_shard_is_honoured_while_its_worker_is_eligible() -> None:
    before = _map_for(["w1", "w2", "w3"])
    shard = next(i for i, s in enumerate(before.shards) if s.owner != "w1")
    pinned = msgspec.structs.replace(before, pinned={shard: "w1"})
    after, moved = _reassign(pinned, ["w1", "w2", "w3"])
    assert moved == [shard]
    assert after.shards[shard].owner == "w1"
    assert after.shards[shard].epoch == before.shards[shard].epoch + 1
    # When the pinned worker is gone the shard falls back to its rendezvous owner.
    again, moved_again = _reassign(after, ["w2", "w3"])
    assert again.shards[shard].owner == rendezvous_owner(shard, ["w2", "w3"])


# ---- membership ------------------------------------------------------------------------------


def _beat(worker_id: str, *, draining: bool = False, seq: int = 1) -> Heartbeat:
    return Heartbeat(
        worker_id=worker_id, pid=1, host="h", started_at=0.0, seq=seq, sessions=0, in_flight=0, shards=[], draining=draining
    )


def test_first_beat_is_fresh_then_not() -> None:
    m = Membership(failure_timeout=1.5)
    assert m.beat(_beat("w1"), now=100.0) is True
    assert m.beat(_beat("w1", seq=2), now=100.5) is False
    assert m.live(now=100.5) == ["w1"]


def test_live_and_dead_by_time() -> None:
    m = Membership(failure_timeout=1.5)
    m.beat(_beat("w1"), now=100.0)
    m.beat(_beat("w2"), now=101.0)
    assert m.live(now=101.0) == ["w1", "w2"]
    assert m.live(now=101.5) == ["w1", "w2"]  # exactly at the window is still alive
    assert m.live(now=101.6) == ["w2"]
    assert m.live(now=102.6) == []


def test_a_worker_back_after_silence_is_fresh_again() -> None:
    m = Membership(failure_timeout=1.0)
    m.beat(_beat("w1"), now=0.0)
    assert m.live(now=2.0) == []
    assert m.beat(_beat("w1", seq=2), now=2.0) is True
    assert m.live(now=2.0) == ["w1"]


def test_draining_workers_are_not_live() -> None:
    m = Membership(failure_timeout=1.0)
    m.beat(_beat("w1"), now=0.0)
    m.beat(_beat("w2"), now=0.0)
    m.beat(_beat("w2", draining=True, seq=2), now=0.1)
    assert m.live(now=0.2) == ["w1"]
    assert "w2" in m.snapshot()
    # Draining workers are still alive: they answer until their shards are handed over.
    assert m.alive(now=0.2) == {"w1", "w2"}
    assert m.alive(now=1.2) == set()


def test_leave_removes_at_once() -> None:
    m = Membership(failure_timeout=10.0)
    m.beat(_beat("w1"), now=0.0)
    m.beat(_beat("w2"), now=0.0)
    m.leave("w1")
    assert m.live(now=0.0) == ["w2"]
    m.leave("never-seen")  # harmless
    assert m.beat(_beat("w1", seq=2), now=0.1) is True


def test_live_is_sorted() -> None:
    m = Membership(failure_timeout=1.0)
    for wid in ["w9", "w1", "w5"]:
        m.beat(_beat(wid), now=0.0)
    assert m.live(now=0.0) == ["w1", "w5", "w9"]


def test_forget_dead_after_ten_windows() -> None:
    m = Membership(failure_timeout=1.0)
    m.beat(_beat("old"), now=0.0)
    m.beat(_beat("new"), now=9.0)
    assert m.forget_dead(now=9.5) == []
    assert m.forget_dead(now=10.5) == ["old"]
    assert set(m.snapshot()) == {"new"}


def test_membership_feeds_reassign() -> None:
    members = Membership(failure_timeout=1.0)
    for wid in ["w1", "w2", "w3"]:
        members.beat(_beat(wid), now=0.0)
    current = _map_for(members.live(now=0.0))
    members.beat(_beat("w1", seq=2), now=1.5)
    members.beat(_beat("w2", seq=2), now=1.5)  # w3 falls silent
    after, moved = _reassign(current, members.live(now=1.8), members.alive(now=1.8), term=1, now=1.8)
    assert moved == [i for i, s in enumerate(current.shards) if s.owner == "w3"]
    assert {after.shards[i].owner for i in range(SHARDS)} == {"w1", "w2"}
