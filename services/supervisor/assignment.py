"""Pure shard-assignment logic: who should own each shard given the live workers."""

from __future__ import annotations

from sessionmgr.common.hashing import rendezvous_owner
from sessionmgr.common.models import ShardMap, ShardOwner


def initial_map(shard_count: int, *, term: int, first_epoch: int, now: float) -> ShardMap:
    return ShardMap(term=term, shards=[ShardOwner(owner=None, epoch=first_epoch) for _ in range(shard_count)], updated_at=now)


def reassign(current: ShardMap, live: list[str], *, term: int, now: float) -> tuple[ShardMap, list[int]]:
    """Move only the shards whose rendezvous owner changed; each moved shard gets ``epoch + 1``.

    With no live worker nothing moves: shards keep their last owner until someone can take them,
    and the next owner still fences the old one with a higher epoch.
    """
    if not live:
        return current, []
    ranked = sorted(live)
    shards: list[ShardOwner] = []
    moved: list[int] = []
    for index, entry in enumerate(current.shards):
        target = rendezvous_owner(index, ranked)
        if target != entry.owner:
            shards.append(ShardOwner(owner=target, epoch=entry.epoch + 1))
            moved.append(index)
        else:
            shards.append(entry)
    if not moved:
        return current, []
    return ShardMap(term=term, shards=shards, updated_at=now), moved
