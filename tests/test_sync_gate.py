"""`SyncGate`: how many sync requests run at once; the others wait on the loop, in arrival order."""

from __future__ import annotations

import asyncio

import pytest

from async_dbbridge._gate import SyncGate, SyncRequestsBusy


async def _settle() -> None:
    """Let every task that can run do so (no timing: a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_limit_goes_in_and_the_rest_waits_in_arrival_order() -> None:
    gate = SyncGate(2, timeout=60, max_waiting=10)
    await gate.enter()
    await gate.enter()
    assert (gate.running, gate.waiting) == (2, 0)
    entered: list[int] = []

    async def request(n: int) -> None:
        await gate.enter()
        entered.append(n)

    waiting = [asyncio.create_task(request(n)) for n in range(3)]
    await _settle()
    assert entered == []
    assert gate.waiting == 3
    gate.leave()
    await _settle()
    assert entered == [0]
    gate.leave()
    gate.leave()
    await _settle()
    assert entered == [0, 1, 2]
    await asyncio.gather(*waiting)
    assert (gate.running, gate.waiting) == (2, 0)
    gate.leave()
    gate.leave()
    assert (gate.running, gate.waiting) == (0, 0)


async def test_a_request_waits_at_most_the_timeout() -> None:
    gate = SyncGate(1, timeout=0.05, max_waiting=10)
    await gate.enter()
    with pytest.raises(SyncRequestsBusy, match=r"all 1 sync requests stayed running for 0.05s"):
        await gate.enter()
    assert (gate.running, gate.waiting) == (1, 0)
    gate.leave()
    await gate.enter()  # the turn is free again, nothing was lost
    assert gate.running == 1


async def test_beyond_max_waiting_a_request_is_turned_away_at_once() -> None:
    gate = SyncGate(1, timeout=60, max_waiting=1)
    await gate.enter()
    queued = asyncio.create_task(gate.enter())
    await _settle()
    with pytest.raises(SyncRequestsBusy, match=r"1 were already waiting") as caught:
        await gate.enter()
    assert caught.value.max_waiting == 1
    assert caught.value.timeout is None
    gate.leave()
    await queued
    assert (gate.running, gate.waiting) == (1, 0)


async def test_a_cancelled_waiter_leaves_the_line_and_a_granted_one_passes_its_turn_on() -> None:
    gate = SyncGate(1, timeout=60, max_waiting=10)
    await gate.enter()
    cancelled = asyncio.create_task(gate.enter())
    second = asyncio.create_task(gate.enter())
    await _settle()
    cancelled.cancel()
    await _settle()
    assert gate.waiting == 1
    gate.leave()
    await second  # the cancelled one took no turn
    # Granted and cancelled in the same loop turn: the turn goes to the next in line.
    granted_then_cancelled = asyncio.create_task(gate.enter())
    third = asyncio.create_task(gate.enter())
    await _settle()
    gate.leave()  # grants granted_then_cancelled's future...
    granted_then_cancelled.cancel()  # ...which is cancelled before it runs
    await _settle()
    assert granted_then_cancelled.cancelled()
    # A lost turn would leave this one waiting for good: fail, not hang.
    await asyncio.wait_for(third, timeout=30)
    assert (gate.running, gate.waiting) == (1, 0)


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit must be >= 1"):
        SyncGate(0, timeout=1, max_waiting=1)
