"""The JSON log sink: the lines of one event-loop pass in one write, none lost or reordered; and
the timestamps the lines carry."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

from sessionmgr.common.logging import LoopBatchedBytesLogger, _UtcTimestamper


class RecordingFile:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.writes.append(data)
        return len(data)

    def flush(self) -> None:
        pass


async def test_lines_of_one_loop_pass_go_out_in_one_write_after_the_pass() -> None:
    file = RecordingFile()
    sink = LoopBatchedBytesLogger(file)  # type: ignore[arg-type]
    sink.info(b'{"n":1}')
    sink.info(b'{"n":2}')
    assert file.writes == [], "nothing is written before the pass ends"
    await asyncio.sleep(0)
    assert file.writes == [b'{"n":1}\n{"n":2}\n']
    sink.error(b'{"n":3}')
    await asyncio.sleep(0)
    assert file.writes[1:] == [b'{"n":3}\n']


def test_outside_a_running_loop_a_line_is_written_at_once() -> None:
    file = RecordingFile()
    LoopBatchedBytesLogger(file).info(b"start-up")  # type: ignore[arg-type]
    assert file.writes == [b"start-up\n"]


def test_lines_queued_on_a_loop_that_stopped_are_written_with_the_next_ones() -> None:
    """A loop that ends before its callback runs must not keep the sink from writing again."""
    file = RecordingFile()
    sink = LoopBatchedBytesLogger(file)  # type: ignore[arg-type]

    loop = asyncio.new_event_loop()
    loop.call_soon(sink.info, b"first")
    loop.call_soon(loop.stop)  # the loop ends with the pass that queued the line
    loop.run_forever()
    loop.close()
    assert file.writes == [], "the flush scheduled on that loop never ran"

    async def log_again() -> None:
        sink.info(b"second")

    asyncio.run(log_again())
    assert file.writes == [b"first\nsecond\n"]


def test_timestamps_are_iso_8601_utc_with_microseconds_and_follow_the_clock() -> None:
    stamp = _UtcTimestamper()
    before = datetime.now(UTC)
    first = stamp(None, "info", {})["timestamp"]
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first)
    assert before <= datetime.fromisoformat(first) <= after
    # Formatted once a second, but every line gets its own time.
    stamps = [stamp(None, "info", {})["timestamp"] for _ in range(1000)]
    assert stamps == sorted(stamps) and len(set(stamps)) > 1
