"""The shard function, identical to nats-server's ``{{partition(n,k)}}`` subject mapping.

nats-server computes ``fnv1a32(token) % n`` over the mapped token; the gateway must agree
bit for bit so that ``sessions.<sid>.<op>`` (mapped by the server) and the gateway's own
``sm.shard.<p>...`` reach the same worker. ``tests/integration/test_subject_mapping.py``
checks both against a real server.
"""

from __future__ import annotations

import functools
import hashlib

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a32(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


@functools.lru_cache(maxsize=16_384)
def shard_for(session_id: str, shard_count: int) -> int:
    # Every request hashes its session ID, in the gateway and again in the worker; the hash is a
    # Python loop over the bytes (~2 µs), a cache hit for a hot session is a tenth of that.
    return fnv1a32(session_id.encode()) % shard_count


def rendezvous_owner(shard: int, workers: list[str]) -> str | None:
    """Highest-random-weight owner: a death moves only the dead worker's shards, a join ~1/n."""
    best: str | None = None
    best_weight = -1
    for worker in workers:
        digest = hashlib.blake2b(f"{worker}:{shard}".encode(), digest_size=8).digest()
        weight = int.from_bytes(digest, "big")
        if weight > best_weight or (weight == best_weight and best is not None and worker > best):
            best, best_weight = worker, weight
    return best
