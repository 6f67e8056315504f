"""Completions: results handed from worker threads to a loop, one wake-up for many."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from typing import Any

import pytest

from async_dbbridge._completions import Completions, completions_for


async def test_results_posted_while_the_loop_is_busy_take_one_wake_up_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    completions = completions_for(loop)
    assert completions_for(loop) is completions
    wake_ups = 0
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal wake_ups
        wake_ups += 1
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    futures = [loop.create_future() for _ in range(100)]
    error = ValueError("the 7th call failed")
    futures[50].cancel()  # its awaiter went away: its result is dropped

    def post_all() -> None:
        for i, future in enumerate(futures):
            completions.post(future, i, error if i == 7 else None)

    # The loop is blocked (joined here, on it) while a worker posts every result.
    worker = threading.Thread(target=post_all)
    worker.start()
    worker.join(10)
    assert wake_ups == 1
    assert not any(f.done() for i, f in enumerate(futures) if i != 50)
    await asyncio.sleep(0)  # the one drain
    assert [f.result() for i, f in enumerate(futures) if i not in (7, 50)] == [
        i for i in range(100) if i not in (7, 50)
    ]
    assert futures[7].exception() is error
    # Drained: the next result schedules a new drain.
    late = loop.create_future()
    poster = threading.Thread(target=completions.post, args=(late, "late", None))
    poster.start()
    assert await asyncio.wait_for(late, 10) == "late"
    poster.join(10)
    assert wake_ups == 2


def test_a_result_for_a_closed_loop_is_dropped_quietly() -> None:
    loop = asyncio.new_event_loop()
    completions = Completions(loop)
    future = loop.create_future()
    loop.close()
    completions.post(future, 1, None)  # no error: nobody is left to tell
    assert not future.done()
    assert "pending=0" in repr(completions)


def test_the_registry_keeps_no_loop_alive() -> None:
    loop = asyncio.new_event_loop()
    completions = completions_for(loop)
    ref = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert ref() is None
    assert completions.loop is None
    # Its late result goes nowhere, without an error.
    other = asyncio.new_event_loop()
    try:
        completions.post(other.create_future(), 1, None)
    finally:
        other.close()
