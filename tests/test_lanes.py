"""LaneSet and RequestLane: borrowing, full-lane modes, release, retirement, close."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connection, connections, transaction

from async_dbbridge._lanes import LANES_SUPPORTED, LaneSet, RequestLane
from async_dbbridge.testing import server_session_count
from tests.conftest import SetSetting, eventually, off_loop, sessions_become
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
    pytest.mark.skipif(not LANES_SUPPORTED, reason="request lanes need asgiref >= 3.13"),
]

_T = TypeVar("_T")

MakeLanes = Callable[..., LaneSet]


@pytest.fixture
def make_lanes() -> Iterator[MakeLanes]:
    made: list[LaneSet] = []

    def make(size: int = 2, **kwargs: Any) -> LaneSet:
        lanes = LaneSet(size, **kwargs)
        made.append(lanes)
        return lanes

    yield make
    for lanes in made:
        lanes.close()
        assert lanes.join(10), f"{lanes!r} did not exit"


def thread_name() -> str:
    return threading.current_thread().name


def query_thread() -> str:
    Item.objects.count()
    return thread_name()


async def run_request(
    lanes: LaneSet, *calls: Callable[[], Any]
) -> tuple[list[Any], list[str] | None]:
    """One request: its calls in a ThreadSensitiveContext on a lane, then the release."""
    lane = lanes.request_lane()
    try:
        async with ThreadSensitiveContext(executor=lane):
            results = [await sync_to_async(call)() for call in calls]
    finally:
        # As the ASGI wrapper does: always, even when the request is cancelled.
        released = lane.release()
    leftovers: list[str] | None = None
    if released is not None:
        leftovers = await asyncio.wrap_future(released)
    return results, leftovers


RequestTask = asyncio.Task[tuple[list[Any], list[str] | None]]


async def hold_a_lane(lanes: LaneSet) -> tuple[RequestTask, threading.Event]:
    """Start a request that queries on its lane, then keeps the lane until the gate opens."""
    gate, started = threading.Event(), threading.Event()

    def hold() -> str:
        Item.objects.count()
        started.set()
        gate.wait(10)
        return thread_name()

    request = asyncio.create_task(run_request(lanes, hold))
    await eventually(started.is_set)
    return request, gate


async def test_a_request_without_sync_work_takes_no_lane(make_lanes: MakeLanes) -> None:
    lanes = make_lanes()
    results, leftovers = await run_request(lanes)
    assert (results, leftovers) == ([], None)
    stats = lanes.stats()
    assert (stats.lanes, stats.in_use, stats.requests) == (0, 0, 0)


async def test_all_calls_of_a_request_run_on_one_lane_in_order(make_lanes: MakeLanes) -> None:
    lanes = make_lanes(2)
    order: list[int] = []

    def record(i: int) -> str:
        order.append(i)
        return thread_name()

    lane = lanes.request_lane()
    async with ThreadSensitiveContext(executor=lane):
        # Concurrent tasks of one request still share its one thread.
        names = await asyncio.gather(
            *(sync_to_async(functools.partial(record, i))() for i in range(10))
        )
    assert len(set(names)) == 1
    assert names[0] == lane.thread_name
    assert order == list(range(10))
    released = lane.release()
    assert released is not None
    assert await asyncio.wrap_future(released) == []
    with pytest.raises(RuntimeError, match="has ended"):
        lane.submit(thread_name)


async def test_concurrent_requests_get_different_lanes_and_lanes_are_reused(
    make_lanes: MakeLanes,
) -> None:
    lanes = make_lanes(2)
    gate = threading.Event()
    inside = threading.Barrier(2, timeout=10)

    def wait_for_both() -> str:
        inside.wait()
        gate.wait(10)
        return thread_name()

    first = asyncio.create_task(run_request(lanes, wait_for_both))
    second = asyncio.create_task(run_request(lanes, wait_for_both))
    await eventually(lambda: lanes.counts() == (2, 2))
    gate.set()
    (a, _), (b, _) = await asyncio.gather(first, second)
    assert a[0] != b[0]
    # Sequential requests reuse the most recently released lane.
    (c, _), _ = await run_request(lanes, thread_name), None
    assert c[0] in (a[0], b[0])
    assert lanes.stats().lanes == 2


async def test_a_transaction_may_span_calls_of_one_request(make_lanes: MakeLanes) -> None:
    # Lanes do no per-call cleanup: an atomic block opened by one call and
    # closed by a later one of the same request must survive in between.
    lanes = make_lanes(1)
    block = transaction.atomic()

    def create() -> bool:
        Item.objects.create(name="spanning")
        return connection.in_atomic_block

    results, leftovers = await run_request(
        lanes, block.__enter__, create, lambda: block.__exit__(None, None, None)
    )
    assert results[1] is True
    assert leftovers == []
    assert (await run_request(lanes, Item.objects.filter(name="spanning").count))[0] == [1]


async def test_transaction_left_open_at_release_is_rolled_back(
    make_lanes: MakeLanes, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    lanes = make_lanes(1)
    block = transaction.atomic()

    def create() -> None:
        Item.objects.create(name="leftover")

    _, leftovers = await run_request(lanes, block.__enter__, create)
    assert leftovers == ["default"]
    # Rolled back, and the lane's connection (which was open) is closed.
    await sessions_become(0)
    results, leftovers = await run_request(
        lanes, lambda: (connection.in_atomic_block, Item.objects.filter(name="leftover").count())
    )
    assert results == [(False, 0)]
    assert leftovers == []
    assert lanes.stats().connections_opened == {"default": 2}


async def test_wait_mode_hands_the_lane_to_the_waiting_request(
    make_lanes: MakeLanes, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    lanes = make_lanes(1, full="wait")
    first, gate = await hold_a_lane(lanes)
    # submit() returns at once, without a lane: the loop is not blocked.
    second = asyncio.create_task(run_request(lanes, query_thread, query_thread))
    await eventually(lambda: lanes.stats().waiting == 1)
    assert await off_loop(server_session_count) == 1
    gate.set()
    (a, _), (b, _) = await asyncio.gather(first, second)
    assert b == [a[0], a[0]]
    stats = lanes.stats()
    assert (stats.requests, stats.temporaries_started) == (2, 0)
    assert stats.connections_opened == {"default": 1}


async def test_wait_timeout_sends_a_long_waiting_request_to_a_temporary_thread(
    make_lanes: MakeLanes, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    lanes = make_lanes(1, full="wait", wait_timeout=0.05)
    first, gate = await hold_a_lane(lanes)
    # The only lane stays busy: after 50 ms the second request stops waiting.
    (names, _) = await asyncio.wait_for(run_request(lanes, query_thread), timeout=10)
    assert "-lane-tmp-" in names[0]
    stats = lanes.stats()
    assert (stats.waits_expired, stats.temporaries_started, stats.waiting) == (1, 1, 0)
    assert await sessions_become(1) == 1  # the temporary closed its connection
    gate.set()
    await first
    # A request served within the timeout still gets the lane.
    (names, _) = await run_request(lanes, query_thread)
    assert names[0].startswith("dbbridge-lane-")
    assert lanes.stats().waits_expired == 1


async def test_waits_expire_in_arrival_order_each_after_its_own_timeout(
    make_lanes: MakeLanes,
) -> None:
    lanes = make_lanes(1, full="wait", wait_timeout=0.2)
    first, gate = await hold_a_lane(lanes)
    try:
        loop = asyncio.get_running_loop()
        ended: list[tuple[int, float]] = []

        async def waiter(n: int) -> None:
            began = loop.time()
            (names, _) = await run_request(lanes, thread_name)
            assert "-lane-tmp-" in names[0]
            ended.append((n, loop.time() - began))

        # Staggered arrivals: one timer for the queue must still give each
        # request its full timeout, no more (and no less) than its own.
        tasks = []
        for n in range(3):
            tasks.append(asyncio.create_task(waiter(n)))
            await eventually(functools.partial(lambda n: lanes.stats().waiting == n + 1, n))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        assert [n for n, _ in ended] == [0, 1, 2]
        assert all(waited >= 0.2 for _, waited in ended), ended
        assert lanes.stats().waits_expired == 3
    finally:
        gate.set()
        await first


async def test_a_request_that_gives_up_waiting_leaves_no_trace(make_lanes: MakeLanes) -> None:
    lanes = make_lanes(1, full="wait")
    gate, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(10)

    first = asyncio.create_task(run_request(lanes, hold))
    await eventually(started.is_set)
    ran: list[str] = []
    waiting = asyncio.create_task(run_request(lanes, lambda: ran.append("ran")))
    await eventually(lambda: lanes.stats().waiting == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert lanes.stats().waiting == 0
    gate.set()
    await first
    # The lane went back to the set, not to the request that left.
    await eventually(lambda: lanes.stats().idle == 1)
    assert ran == []


async def test_temporary_mode_never_waits_and_closes_at_request_end(
    make_lanes: MakeLanes, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    lanes = make_lanes(1, full="temporary")
    first, gate = await hold_a_lane(lanes)
    (names, _) = await run_request(lanes, query_thread, query_thread)
    assert names[0] == names[1]
    assert "-lane-tmp-" in names[0]
    stats = lanes.stats()
    # Its thread closed its connection before the request heard back.
    assert (stats.temporary, stats.temporaries_started) == (0, 1)
    assert stats.connections_opened == {"default": 2}
    assert stats.connections_open == {"default": 1}
    assert await sessions_become(1) == 1
    gate.set()
    await first


async def test_idle_lanes_retire_and_close_their_connections(
    make_lanes: MakeLanes, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    lanes = make_lanes(2, idle_timeout=0.1)
    await run_request(lanes, query_thread)
    assert lanes.stats().connections_opened == {"default": 1}
    await eventually(lambda: lanes.counts() == (0, 0))
    await sessions_become(0)
    stats = lanes.stats()
    assert (stats.requests, stats.connections_open) == (1, {"default": 0})


async def test_close_lets_busy_requests_finish_then_everything_is_closed(
    make_lanes: MakeLanes, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    lanes = make_lanes(1, full="wait")
    await run_request(lanes, query_thread)  # an idle lane with a connection
    gate, started = threading.Event(), threading.Event()

    def hold() -> str:
        Item.objects.count()
        started.set()
        gate.wait(10)
        Item.objects.count()
        return thread_name()

    busy = asyncio.create_task(run_request(lanes, hold, query_thread))
    await eventually(started.is_set)
    waiting = asyncio.create_task(run_request(lanes, query_thread))
    await eventually(lambda: lanes.stats().waiting == 1)

    lanes.close()
    # The waiting request is served by a temporary thread; so is a new one.
    (late, _) = await run_request(lanes, query_thread)
    assert "-lane-tmp-" in late[0]
    (waited, _) = await waiting
    assert "-lane-tmp-" in waited[0]
    assert not await off_loop(lanes.join, 0.05)
    # The busy lane finishes its request (both calls), then exits.
    gate.set()
    (names, _) = await busy
    assert names[0] == names[1]
    assert await off_loop(lanes.join, 10)
    assert lanes.counts() == (0, 0)
    await sessions_become(0)


async def test_stats_and_counts(make_lanes: MakeLanes, db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60)
    lanes = make_lanes(3, full="wait")
    gate, started = threading.Event(), threading.Event()

    def hold() -> None:
        connections["other"].ensure_connection()
        Item.objects.count()
        started.set()
        gate.wait(10)

    task = asyncio.create_task(run_request(lanes, hold))
    await eventually(started.is_set)
    assert lanes.counts() == (1, 1)
    stats = lanes.stats()
    assert stats.connections_open == {"default": 1, "other": 1}
    assert (stats.size, stats.full, stats.in_use, stats.idle) == (3, "wait", 1, 0)
    assert stats.as_dict()["connections_opened"] == {"default": 1, "other": 1}
    assert stats.open_connections == 2
    gate.set()
    await task
    assert lanes.counts() == (1, 0)
    assert "size=3" in repr(lanes)


def test_lane_set_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        LaneSet(0)
    with pytest.raises(ValueError, match="size"):
        LaneSet(True)
    with pytest.raises(ValueError, match="full"):
        LaneSet(1, full="block")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idle_timeout"):
        LaneSet(1, idle_timeout=0)
    with pytest.raises(ValueError, match="wait_timeout"):
        LaneSet(1, full="wait", wait_timeout=0)
    with pytest.raises(ValueError, match="wait_timeout"):
        LaneSet(1, full="temporary", wait_timeout=1.0)


def test_request_lane_is_an_executor_that_owns_no_threads() -> None:
    lanes = LaneSet(1)
    lane = lanes.request_lane()
    assert isinstance(lane, RequestLane)
    lane.shutdown()  # a no-op: the lane set owns the threads
    future = lane.submit(thread_name)
    assert future.result(timeout=10).startswith("dbbridge-lane-")
    released = lane.release()
    assert released is not None
    assert released.result(timeout=10) == []
    lanes.close()
    assert lanes.join(10)


async def test_calls_with_no_lane_to_share_go_to_the_fallback(make_lanes: MakeLanes) -> None:
    lanes = make_lanes(1)
    fallback = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fallback")
    loop = asyncio.get_running_loop()
    try:
        # A request that never had a lane, once its response is complete.
        lane = lanes.request_lane(fallback=fallback)
        lane.response_complete()
        assert (await loop.run_in_executor(lane, thread_name)).startswith("fallback")
        assert lane.release() is None
        assert lanes.counts() == (0, 0)
        # A request whose lane was released: what comes after runs elsewhere.
        lane = lanes.request_lane(fallback=fallback)
        assert (await loop.run_in_executor(lane, thread_name)).startswith("dbbridge-lane-")
        lane.response_complete()  # bound already: its calls stay on the lane
        assert (await loop.run_in_executor(lane, thread_name)).startswith("dbbridge-lane-")
        released = lane.release()
        assert released is not None
        assert await asyncio.wrap_future(released) == []
        assert (await loop.run_in_executor(lane, thread_name)).startswith("fallback")
        assert lanes.stats().requests == 1
    finally:
        fallback.shutdown()


async def test_on_the_loop_submit_hands_back_the_loops_own_future(
    make_lanes: MakeLanes,
) -> None:
    # What run_in_executor() passes through unchanged (no concurrent future
    # and no chaining on the hot path); off the loop, a concurrent future.
    lane = make_lanes(1).request_lane()
    on_loop: object = lane.submit(thread_name)
    assert isinstance(on_loop, asyncio.Future)
    assert (await on_loop).startswith("dbbridge-lane-")
    off_loop_future: object = await off_loop(lane.submit, thread_name)
    assert isinstance(off_loop_future, concurrent.futures.Future)
    assert off_loop_future.result(timeout=10).startswith("dbbridge-lane-")
    released = lane.release()
    assert released is not None
    assert await asyncio.wrap_future(released) == []


def test_without_a_fallback_calls_after_release_are_refused(make_lanes: MakeLanes) -> None:
    lane = make_lanes(1).request_lane()
    assert lane.release() is None
    with pytest.raises(RuntimeError, match="this request has ended"):
        lane.submit(thread_name)


async def test_a_lane_that_cannot_start_fails_the_call_not_the_set(
    make_lanes: MakeLanes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from async_dbbridge import _lanes

    lanes = make_lanes(1)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_lanes._LaneThread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        await run_request(lanes, thread_name)
    assert lanes.counts() == (0, 0)
    monkeypatch.undo()
    (names, _) = await run_request(lanes, thread_name)
    assert names[0].startswith("dbbridge-lane-")
