"""Pure shard-assignment logic: who should own each shard given the live workers."""

from __future__ import annotations

from sessionmgr.common.hashing import rendezvous_owner
from sessionmgr.common.models import ShardMap, ShardOwner


def initial_map(shard_count: int, *, term: int, first_epoch: int, now: float) -> ShardMap:
    return ShardMap(term=term, shards=[ShardOwner(owner=None, epoch=first_epoch) for _ in range(shard_count)], updated_at=now)


def target_owner(shard: int, shard_map: ShardMap, eligible: list[str]) -> str | None:
    pinned = shard_map.pinned.get(shard)
    if pinned is not None and pinned in eligible:
        return pinned
    return rendezvous_owner(shard, eligible)


def reassign(current: ShardMap, eligible: list[str], alive: set[str], *, term: int, now: float) -> tuple[ShardMap, list[int]]:
    """Move only the shards whose owner should change; each moved shard gets ``epoch + 1``.

    ``eligible`` may take shards (alive, not draining, not drained); ``alive`` also holds
    draining workers, which still answer until they have handed their shards over. With no
    eligible worker nothing moves: shards keep their last owner until someone can take them,
    and the next owner still fences the old one with a higher epoch.
    """
    ranked = sorted(w for w in eligible if w not in current.drained)
    if not ranked:
        return current, []
    shards: list[ShardOwner] = []
    moved: list[int] = []
    for index, entry in enumerate(current.shards):
        target = target_owner(index, current, ranked)
        if target != entry.owner:
            previous = entry.owner if entry.owner in alive else None
            shards.append(ShardOwner(owner=target, epoch=entry.epoch + 1, previous=previous))
            moved.append(index)
        else:
            shards.append(entry)
    if not moved:
        return current, []
    return ShardMap(term=term, shards=shards, updated_at=now, drained=current.drained, pinned=current.pinned), moved
