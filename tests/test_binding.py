"""RequestBinding: one thread per request, taken lazily, ended by its last job; late calls.

Every request runs inside a real `ThreadSensitiveContext(executor=binding)`
with asgiref's thread-sensitive `sync_to_async`, as the ASGI wrapper runs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished, request_started
from django.db import connection, transaction
from pytest_django.fixtures import Settings as SettingsWrapper

from async_dbbridge import DBExecutor, _lending
from async_dbbridge._binding import BindingState, RequestBinding, current_request_state
from async_dbbridge._lending import end_of_request
from async_dbbridge._request_threads import RequestThreads
from async_dbbridge.asgi import ASGIApp
from tests.conftest import eventually, off_loop
from tests.e2e_project.driver import call_http
from tests.e2e_project.settings import OVERRIDES
from tests.test_request_threads import (
    WAIT,
    MakeThreads,
    make_threads,
    pytestmark,
    query_thread,
    run_request,
    thread_name,
)
from tests.testapp.models import Item

__all__ = ("make_threads", "pytestmark")


def state_of(binding: RequestBinding) -> BindingState:
    # A call, not the property: mypy would narrow the property across awaits.
    return binding.state


@pytest.fixture
def bridge() -> Iterator[DBExecutor]:
    executor = DBExecutor(max_workers=2, thread_name_prefix="fallback")
    yield executor
    executor.shutdown(wait=True)


async def test_a_request_without_sync_calls_takes_no_thread(make_threads: MakeThreads) -> None:
    threads = make_threads()
    results, leftovers, binding = await run_request(threads)
    assert (results, leftovers) == ([], [])
    assert state_of(binding) is BindingState.DONE
    assert binding.thread_name is None
    assert threads.stats().started == 0


async def test_all_calls_of_a_request_run_on_its_thread_in_order_across_awaits(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads()
    binding = RequestBinding(threads)
    order: list[tuple[int, str]] = []
    elsewhere = asyncio.Event()

    def record(i: int) -> None:
        Item.objects.create(name="ordered", value=i)
        order.append((i, thread_name()))

    async def other_task() -> None:
        await sync_to_async(record)(1)
        elsewhere.set()

    assert state_of(binding) is BindingState.UNBOUND
    async with ThreadSensitiveContext(executor=binding):
        await sync_to_async(record)(0)
        assert state_of(binding) is BindingState.BOUND
        # A task of the request, awaited through an event: still its thread.
        task = asyncio.create_task(other_task())
        await elsewhere.wait()
        await task
        await asyncio.sleep(0)
        # Concurrent calls of one request queue on its one thread, in order.
        await asyncio.gather(*(sync_to_async(record)(i) for i in range(2, 12)))
    ended = binding.end()
    assert state_of(binding) in (BindingState.ENDING, BindingState.DONE)
    assert await asyncio.wrap_future(ended) == []
    assert state_of(binding) is BindingState.DONE
    assert [i for i, _ in order] == list(range(12))
    assert {name for _, name in order} == {binding.thread_name}
    (values,), _, _ = await run_request(
        threads, lambda: list(Item.objects.order_by("id").values_list("value", flat=True))
    )
    assert values == list(range(12))
    assert threads.stats().started == 1


async def test_thread_locals_stay_request_scoped_under_concurrency(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads()
    n = 64
    local = threading.local()
    arrived: list[int] = []
    gate = asyncio.Event()

    def remember(i: int) -> str:
        local.value = i
        arrived.append(i)
        return thread_name()

    def recall() -> tuple[int, str]:
        return local.value, thread_name()

    async def request(i: int) -> tuple[str, int, str]:
        binding = RequestBinding(threads)
        async with ThreadSensitiveContext(executor=binding):
            first = await sync_to_async(remember)(i)
            # Every request has set its value before any reads it back.
            await gate.wait()
            value, second = await sync_to_async(recall)()
        await asyncio.wrap_future(binding.end())
        assert first == second == binding.thread_name
        return first, value, second

    tasks = [asyncio.create_task(request(i)) for i in range(n)]
    await eventually(lambda: len(arrived) == n)
    assert threads.stats().busy == n
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [value for _, value, _ in results] == list(range(n))
    assert len({name for name, _, _ in results}) == n
    stats = threads.stats()
    assert (stats.busy, stats.idle, stats.started) == (0, n, n)


@pytest.fixture
def end_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Records (event, thread, alias) of every end_of_request() call, with the calls."""
    log: list[tuple[str, str, str]] = []

    def spy(conn: Any) -> str | None:
        log.append(("end_of_request", thread_name(), conn.alias))
        return end_of_request(conn)

    monkeypatch.setattr(_lending, "end_of_request", spy)
    return log


async def test_end_cleans_up_on_the_request_thread_after_its_last_call(
    make_threads: MakeThreads, bridge: DBExecutor, end_log: list[tuple[str, str, str]]
) -> None:
    threads = make_threads()
    binding = RequestBinding(threads, fallback=bridge)
    block = transaction.atomic()
    started, gate = threading.Event(), threading.Event()

    def create() -> None:
        Item.objects.create(name="left open")
        assert connection.connection is not None

    def last_call() -> str:
        started.set()
        assert gate.wait(WAIT)
        end_log.append(("last call returns", thread_name(), ""))
        return thread_name()

    async with ThreadSensitiveContext(executor=binding):
        await sync_to_async(block.__enter__)()
        await sync_to_async(create)()
        last = asyncio.create_task(sync_to_async(last_call)())
        await eventually(started.is_set)
        ended = binding.end()
        assert state_of(binding) is BindingState.ENDING
        assert not ended.done()
        # A call now cannot queue behind the cleanup: it runs on the
        # fallback, at once, while the request's thread is still busy.
        assert (await sync_to_async(thread_name)()).startswith("fallback")
        assert not ended.done()
        gate.set()
        assert await last == binding.thread_name
    assert await asyncio.wrap_future(ended) == ["default"]
    assert state_of(binding) is BindingState.DONE
    assert end_log[0] == ("last call returns", binding.thread_name, "")
    assert {(event, name) for event, name, _ in end_log[1:]} == {
        ("end_of_request", binding.thread_name)
    }
    # Rolled back, and the thread, back in the set, serves the next request
    # with its connection's state reset.
    results, leftovers, _ = await run_request(
        threads,
        lambda: (connection.connection, connection.in_atomic_block),
        Item.objects.filter(name="left open").count,
        thread_name,
    )
    assert results == [(None, False), 0, binding.thread_name]
    assert leftovers == []
    assert threads.stats().started == 1


async def test_calls_after_the_end_go_to_the_fallback(
    make_threads: MakeThreads, bridge: DBExecutor
) -> None:
    threads = make_threads()
    binding = RequestBinding(threads, fallback=bridge)
    late = asyncio.Event()

    async def background() -> tuple[str, int]:
        # Spawned by the request, not awaited by it: its call comes after end().
        await late.wait()
        return await sync_to_async(lambda: (thread_name(), Item.objects.count()))()

    async with ThreadSensitiveContext(executor=binding):
        assert await sync_to_async(query_thread)() == binding.thread_name
        spawned = asyncio.create_task(background())
        await asyncio.wrap_future(binding.end())
        assert state_of(binding) is BindingState.DONE
        late.set()
        name, count = await spawned
    assert name.startswith("fallback")
    assert count == 0
    # Without a fallback, a clear error.
    orphan = RequestBinding(threads)
    await asyncio.wrap_future(orphan.end())
    with pytest.raises(RuntimeError, match=r"this request has ended.*no fallback executor"):
        orphan.submit(thread_name)
    # end() again: the same future, nothing queued twice.
    assert binding.end() is binding.end()
    assert threads.stats().started == 1


async def test_submit_on_a_loop_returns_the_loops_own_future(make_threads: MakeThreads) -> None:
    threads = make_threads()
    binding = RequestBinding(threads)
    loop = asyncio.get_running_loop()
    future: Any = binding.submit(query_thread)
    assert isinstance(future, asyncio.Future)
    assert future.get_loop() is loop
    # What run_in_executor() relies on to return it unchanged (Python 3.11/3.13).
    assert asyncio.wrap_future(future) is future
    on_loop = await future
    via_executor = await loop.run_in_executor(binding, query_thread)
    # From a thread with no loop: a concurrent future, the same thread.
    from_thread = await off_loop(lambda: binding.submit(query_thread).result(WAIT))
    assert isinstance(binding.submit(thread_name), asyncio.Future)
    assert on_loop == via_executor == from_thread == binding.thread_name
    off = await off_loop(binding.submit, thread_name)
    assert isinstance(off, concurrent.futures.Future)
    assert off.result(WAIT) == binding.thread_name
    assert await asyncio.wrap_future(binding.end()) == []


async def test_the_request_state_is_shared_with_its_sync_calls(make_threads: MakeThreads) -> None:
    threads = make_threads()
    binding = RequestBinding(threads)

    def mark() -> bool:
        state = current_request_state.get()
        assert state is binding.request_state
        state.pool_timed_out = True
        return True

    token = current_request_state.set(binding.request_state)
    try:
        async with ThreadSensitiveContext(executor=binding):
            assert await sync_to_async(mark)()
            # A job outside asgiref's context copying runs in the thread's
            # own, fresh context: no request's state lives on in it.
            assert await asyncio.wrap_future(binding.submit(current_request_state.get)) is None
    finally:
        current_request_state.reset(token)
    assert binding.request_state.pool_timed_out is True
    await asyncio.wrap_future(binding.end())


async def test_a_cancelled_request_still_gives_its_thread_back(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads()
    started, gate = threading.Event(), threading.Event()
    ran: list[str] = []

    def slow() -> None:
        started.set()
        assert gate.wait(WAIT)
        Item.objects.create(name="finished anyway")
        ran.append(thread_name())

    request = asyncio.create_task(run_request(threads, slow))
    await eventually(started.is_set)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    # The end job is queued behind the running call; the thread comes back
    # once both are done, with nobody waiting for it.
    assert threads.stats().busy == 1
    gate.set()
    await eventually(lambda: threads.stats().idle == 1)
    results, _, _ = await run_request(threads, thread_name)
    assert results == ran
    assert threads.stats().started == 1


async def test_shutdown_ends_the_request(make_threads: MakeThreads) -> None:
    threads = make_threads()
    binding = RequestBinding(threads)
    await asyncio.wrap_future(binding.submit(query_thread))
    with pytest.raises(RuntimeError, match="would block the event loop"):
        binding.shutdown(wait=True)
    assert state_of(binding) is BindingState.BOUND
    await off_loop(binding.shutdown, wait=True)
    assert state_of(binding) is BindingState.DONE
    assert threads.stats().idle == 1


@pytest.fixture
def project(settings: SettingsWrapper) -> SettingsWrapper:
    for key, value in OVERRIDES.items():
        setattr(settings, key, value)
    return settings


def served_by(threads: RequestThreads, bindings: list[RequestBinding]) -> ASGIApp:
    """Django's handler, run the way the ASGI wrapper runs it on request threads."""
    handler = ASGIHandler()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        binding = RequestBinding(threads)
        bindings.append(binding)
        token = current_request_state.set(binding.request_state)
        try:
            async with ThreadSensitiveContext(executor=binding):
                await handler(scope, receive, send)
        finally:
            current_request_state.reset(token)
            leftovers = await asyncio.wrap_future(binding.end())
        app.leftovers.append(leftovers)  # type: ignore[attr-defined]

    app.leftovers = []  # type: ignore[attr-defined]
    return app


async def test_a_django_request_runs_on_one_request_thread_signals_included(
    make_threads: MakeThreads, project: SettingsWrapper
) -> None:
    threads = make_threads()
    bindings: list[RequestBinding] = []
    app = served_by(threads, bindings)
    seen: list[tuple[str, str]] = []

    def started(**kwargs: Any) -> None:
        seen.append(("request_started", thread_name()))

    def finished(**kwargs: Any) -> None:
        # Django's own close_old_connections runs here too, unpatched.
        seen.append(("request_finished", thread_name()))

    request_started.connect(started)
    request_finished.connect(finished)
    try:
        first = await call_http(app, "/sync-query/")
        second = await call_http(app, "/leave-atomic/")
        assert second.status == 200
    finally:
        request_started.disconnect(started)
        request_finished.disconnect(finished)
    name = bindings[0].thread_name
    assert name is not None
    assert first.status == 200
    assert first.json()["thread"] == name
    assert first.headers[b"x-middleware-thread"] == name.encode()
    # Signals, middleware, view, response.close(): one thread, reused by the
    # next request, which left a transaction open: rolled back at its end.
    assert seen == [("request_started", name), ("request_finished", name)] * 2
    assert bindings[1].thread_name == name
    assert app.leftovers == [[], ["default"]]  # type: ignore[attr-defined]
    (count,), _, _ = await run_request(threads, Item.objects.count)
    assert count == 0
    assert threads.stats().started == 1


# -- the end of a request with nothing left to do on its thread ----------------------------


async def test_end_with_every_call_done_and_no_connection_gives_the_thread_back_at_once(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads()
    binding = RequestBinding(threads)
    async with ThreadSensitiveContext(executor=binding):
        # A query: the connection was really taken, and given back after the call.
        assert await sync_to_async(lambda: Item.objects.count())() == 0
    thread = next(iter(threads._busy))
    assert thread.wrappers[0].connection is None
    ended = binding.end()
    # No job queued on the thread and no round trip: done before any await.
    assert ended.done()
    assert ended.result() == []
    assert state_of(binding) is BindingState.DONE
    assert (threads.stats().busy, threads.stats().idle) == (0, 1)
    # The thread serves the next request as usual.
    (name,), leftovers, second = await run_request(threads, thread_name)
    assert (name, leftovers, second.thread_name) == (binding.thread_name, [], binding.thread_name)
    assert threads.stats().started == 1


async def test_end_with_a_call_still_queued_ends_on_the_thread_after_it(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads()
    binding = RequestBinding(threads)
    gate = threading.Event()
    ran: list[str] = []

    def slow() -> None:
        assert gate.wait(WAIT)
        ran.append(thread_name())

    async with ThreadSensitiveContext(executor=binding):
        await sync_to_async(thread_name)()
        # Spawned and not awaited: still queued (running) when the request ends.
        orphan = asyncio.create_task(sync_to_async(slow)())
        await asyncio.sleep(0)
        await eventually(lambda: next(iter(threads._busy)).submitted == 2)
        ended = binding.end()
        assert not ended.done()
        assert state_of(binding) is BindingState.ENDING
        gate.set()
        await orphan
    assert await asyncio.wrap_future(ended) == []
    assert state_of(binding) is BindingState.DONE
    assert ran == [binding.thread_name]
    assert (threads.stats().busy, threads.stats().idle) == (0, 1)


async def test_end_with_a_transaction_left_open_still_rolls_back_on_the_thread(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads()
    binding = RequestBinding(threads)

    def begin_and_insert() -> None:
        transaction.atomic().__enter__()  # never exited: the request leaves it open
        Item.objects.create(name="left open", value=1)

    async with ThreadSensitiveContext(executor=binding):
        await sync_to_async(begin_and_insert)()
    ended = binding.end()
    assert not ended.done()  # the thread must roll back: a job, not the quick path
    assert await asyncio.wrap_future(ended) == ["default"]
    (count,), _, _ = await run_request(threads, lambda: Item.objects.count())
    assert count == 0


async def test_a_busy_thread_waiting_longer_than_idle_timeout_is_not_retired(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads(idle_timeout=0.05)
    binding = RequestBinding(threads)
    async with ThreadSensitiveContext(executor=binding):
        first = await sync_to_async(thread_name)()
        # Several idle timeouts between two calls of one request (an await on I/O).
        thread = next(iter(threads._busy))
        await eventually(lambda: thread.waits_timed_out >= 3)
        second = await sync_to_async(thread_name)()
    await asyncio.wrap_future(binding.end())
    assert first == second
    assert threads.stats().retired == 0
    # Back in the idle stack, it retires after the idle timeout.
    await eventually(lambda: threads.stats().retired == 1)
