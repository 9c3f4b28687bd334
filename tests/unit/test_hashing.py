"""The shard hash (must equal nats-server's partition()) and rendezvous ownership."""

from __future__ import annotations

import secrets

import pytest

from sessionmgr.common.hashing import fnv1a32, rendezvous_owner, shard_for

SHARDS = 1024


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x811C9DC5),
        (b"a", 0xE40C292C),
        (b"foobar", 0xBF9CF968),
    ],
)
def test_fnv1a32_known_vectors(data: bytes, expected: int) -> None:
    assert fnv1a32(data) == expected


def test_fnv1a32_is_32_bit() -> None:
    for _ in range(200):
        assert 0 <= fnv1a32(secrets.token_bytes(40)) <= 0xFFFFFFFF


@pytest.mark.parametrize("shard_count", [1, 7, 64, 4096])
def test_shard_for_is_in_range(shard_count: int) -> None:
    for _ in range(500):
        sid = secrets.token_urlsafe(12)
        shard = shard_for(sid, shard_count)
        assert 0 <= shard < shard_count
        assert shard == fnv1a32(sid.encode()) % shard_count


def test_shard_for_spreads_sessions() -> None:
    hits = {shard_for(secrets.token_urlsafe(12), 64) for _ in range(2000)}
    assert len(hits) == 64


def _owners(workers: list[str]) -> list[str | None]:
    return [rendezvous_owner(shard, workers) for shard in range(SHARDS)]


def test_rendezvous_is_deterministic_and_order_independent() -> None:
    workers = ["w-a", "w-b", "w-c", "w-d"]
    first = _owners(workers)
    assert first == _owners(list(workers))
    assert first == _owners(list(reversed(workers)))
    assert set(first) == set(workers)


def test_rendezvous_no_workers() -> None:
    assert rendezvous_owner(0, []) is None


def test_rendezvous_is_roughly_balanced() -> None:
    workers = ["w-a", "w-b", "w-c", "w-d"]
    counts = {w: 0 for w in workers}
    for owner in _owners(workers):
        counts[owner] += 1  # type: ignore[index]
    assert all(SHARDS / 4 * 0.6 <= c <= SHARDS / 4 * 1.4 for c in counts.values()), counts


def test_removing_a_worker_moves_only_its_shards() -> None:
    workers = ["w-a", "w-b", "w-c", "w-d"]
    before = _owners(workers)
    after = _owners([w for w in workers if w != "w-c"])
    for shard in range(SHARDS):
        if before[shard] == "w-c":
            assert after[shard] != "w-c"
        else:
            assert after[shard] == before[shard], f"shard {shard} moved from {before[shard]} to {after[shard]}"
    assert "w-c" not in after


def test_adding_a_worker_moves_about_one_fifth_and_only_to_it() -> None:
    workers = ["w-a", "w-b", "w-c", "w-d"]
    before = _owners(workers)
    after = _owners([*workers, "w-e"])
    moved = [shard for shard in range(SHARDS) if before[shard] != after[shard]]
    assert all(after[shard] == "w-e" for shard in moved)
    assert 0.10 * SHARDS <= len(moved) <= 0.30 * SHARDS, len(moved)
