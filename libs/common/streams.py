"""JetStream streams and buckets the services share, created idempotently by whoever starts first.

``SM_EVENTS`` carries session events (``sm.events.<sid>.<type>``) so a consumer that was down
resumes from its last sequence. ``SM_QUEUE`` holds changes accepted while Redis was unreachable
(``sm.queue.<shard>``), applied in arrival order by the shard's owner once Redis is back.
``sm-requests`` records the status of each queued request for clients to poll.
Both streams use file storage; nats.conf sets ``sync_interval: 1s`` (see README: a crash of the
NATS process loses nothing, losing the machine can lose the last second, like Redis everysec).
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue

EVENTS_STREAM = "SM_EVENTS"
QUEUE_STREAM = "SM_QUEUE"
QUEUE_PREFIX = "sm.queue"
REQUESTS_BUCKET = "sm-requests"
REQUEST_STATUS_TTL_S = 24 * 3600


def queue_subject(shard: int) -> str:
    return f"{QUEUE_PREFIX}.{shard}"


def queue_consumer(shard: int) -> str:
    return f"queue-{shard}"


async def ensure_streams(js: JetStreamContext) -> None:
    configs = [
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=["sm.events.>"],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_age=7 * 24 * 3600,
            max_bytes=256 * 1024**2,
            discard=DiscardPolicy.OLD,
            duplicate_window=120,
        ),
        StreamConfig(
            name=QUEUE_STREAM,
            subjects=[f"{QUEUE_PREFIX}.>"],
            storage=StorageType.FILE,
            # Work-queue: an applied (acked) request leaves the stream, so per-subject counts are backlogs.
            retention=RetentionPolicy.WORK_QUEUE,
            max_bytes=256 * 1024**2,
            # Full means refuse new work (clients get 503), never drop accepted work.
            discard=DiscardPolicy.NEW,
            duplicate_window=120,
        ),
    ]
    await ensure_stream_configs(js, configs)


async def ensure_stream_configs(js: JetStreamContext, configs: list[StreamConfig]) -> None:
    """Create each stream, or bring an existing one to ``config`` (idempotent, any order of starts)."""
    for config in configs:
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)


async def request_status_bucket(js: JetStreamContext) -> KeyValue:
    try:
        return await js.key_value(REQUESTS_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=REQUESTS_BUCKET, history=1, ttl=REQUEST_STATUS_TTL_S, storage=StorageType.FILE)
        )
