"""The per-session lock every request takes: one holder per key, FIFO, nothing left behind."""

from __future__ import annotations

import asyncio

import pytest

from sessionmgr.worker.keyed_lock import KeyedLock


async def test_holders_of_one_key_run_one_at_a_time_in_arrival_order() -> None:
    locks = KeyedLock()
    order: list[str] = []
    inside = 0

    async def hold(name: str) -> None:
        nonlocal inside
        async with locks.hold("s1"):
            inside += 1
            assert inside == 1
            order.append(name)
            await asyncio.sleep(0)  # give the others a chance to barge in
            inside -= 1

    await asyncio.gather(*(hold(f"r{i}") for i in range(5)))
    assert order == ["r0", "r1", "r2", "r3", "r4"]
    assert len(locks) == 0


async def test_different_keys_do_not_wait_for_each_other() -> None:
    locks = KeyedLock()
    release = asyncio.Event()

    async def hold_until_released() -> None:
        async with locks.hold("a"):
            await release.wait()

    holder = asyncio.create_task(hold_until_released())
    await asyncio.sleep(0)
    async with asyncio.timeout(1):
        async with locks.hold("b"):
            assert len(locks) == 2
    release.set()
    await holder
    assert len(locks) == 0


async def test_an_error_inside_releases_the_key() -> None:
    locks = KeyedLock()
    with pytest.raises(RuntimeError):
        async with locks.hold("s1"):
            raise RuntimeError("boom")
    assert len(locks) == 0
    async with asyncio.timeout(1):
        async with locks.hold("s1"):
            pass


async def test_a_waiter_cancelled_before_its_turn_leaves_no_trace() -> None:
    locks = KeyedLock()
    release = asyncio.Event()
    ran: list[str] = []

    async def hold(name: str, wait: bool) -> None:
        async with locks.hold("s1"):
            ran.append(name)
            if wait:
                await release.wait()

    first = asyncio.create_task(hold("first", True))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold("cancelled", False))
    last = asyncio.create_task(hold("last", False))
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    await asyncio.gather(first, last)
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert ran == ["first", "last"]
    assert len(locks) == 0
