"""RequestThreads: reuse (LIFO), never waiting, idle retirement, close, fork, hold modes.

Requests are driven as the ASGI wrapper drives them: a `RequestBinding` as the
executor of a real `ThreadSensitiveContext`, thread-sensitive `sync_to_async`
calls inside it, `end()` after the app returned.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, transaction

from async_dbbridge import _request_threads
from async_dbbridge._binding import RequestBinding, current_request_state
from async_dbbridge._lending import make_pooled
from async_dbbridge._request_threads import RequestThread, RequestThreads
from tests.conftest import backend_id, eventually, off_loop
from tests.test_fork import run_forked
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
    pytest.mark.skipif(
        "executor" not in inspect.signature(ThreadSensitiveContext.__init__).parameters,
        reason="ThreadSensitiveContext(executor=...) needs asgiref >= 3.13",
    ),
]

PREFIX = "reqtest"
# Bounded waits for gates: a hang becomes a failure, never a stuck run.
WAIT = 10.0

MakeThreads = Callable[..., RequestThreads]


@pytest.fixture
def make_threads() -> Iterator[MakeThreads]:
    made: list[RequestThreads] = []

    def make(*, hold: str = "transaction", idle_timeout: float | None = None) -> RequestThreads:
        threads = RequestThreads(
            hold=hold,  # type: ignore[arg-type]  # tests pass the literals
            idle_timeout=idle_timeout,
            thread_name_prefix=PREFIX,
        )
        made.append(threads)
        return threads

    yield make
    for threads in made:
        assert threads.close(WAIT), f"{threads!r}: threads still running after close"


def thread_name() -> str:
    return threading.current_thread().name


def query_thread() -> str:
    Item.objects.count()
    return thread_name()


def live_request_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"{PREFIX}-request-")]


async def run_request(
    threads: RequestThreads, *calls: Callable[[], Any]
) -> tuple[list[Any], list[str], RequestBinding]:
    """One request as the ASGI wrapper runs it: calls in its context, then end()."""
    binding = RequestBinding(threads)
    token = current_request_state.set(binding.request_state)
    try:
        async with ThreadSensitiveContext(executor=binding):
            results = [await sync_to_async(call)() for call in calls]
    finally:
        current_request_state.reset(token)
        ended = binding.end()
    return results, await asyncio.wrap_future(ended), binding


async def hold_threads(threads: RequestThreads, n: int) -> tuple[list[asyncio.Task[Any]], Any]:
    """``n`` concurrent requests, each inside a call until the returned gate opens.

    A barrier of ``n`` inside the calls proves the ``n`` calls run at the same
    time, so on ``n`` different threads, none waiting for another.
    """
    inside = threading.Barrier(n, timeout=WAIT)
    gate = threading.Event()
    passed: list[str] = []

    def hold() -> str:
        inside.wait()
        passed.append(thread_name())
        assert gate.wait(WAIT)
        return thread_name()

    tasks = [asyncio.create_task(run_request(threads, hold)) for _ in range(n)]
    await eventually(lambda: len(passed) == n)
    return tasks, gate


async def test_sequential_requests_reuse_one_thread(make_threads: MakeThreads) -> None:
    threads = make_threads()
    names = [(await run_request(threads, query_thread))[0][0] for _ in range(3)]
    assert len(set(names)) == 1
    assert names[0].startswith(f"{PREFIX}-request-")
    stats = threads.stats()
    assert (stats.started, stats.busy, stats.idle, stats.retired) == (1, 0, 1, 0)


async def test_the_most_recently_idle_thread_is_taken_first(make_threads: MakeThreads) -> None:
    threads = make_threads()
    gates = {"a": threading.Event(), "b": threading.Event()}
    inside = threading.Barrier(2, timeout=WAIT)

    def hold(key: str) -> str:
        inside.wait()
        assert gates[key].wait(WAIT)
        return thread_name()

    first = asyncio.create_task(run_request(threads, lambda: hold("a")))
    second = asyncio.create_task(run_request(threads, lambda: hold("b")))
    await eventually(lambda: threads.stats().busy == 2)
    # "a" goes back first, "b" last: "b" is on top of the idle stack.
    gates["a"].set()
    (a,), _, _ = await first
    gates["b"].set()
    (b,), _, _ = await second
    assert a != b
    assert (await run_request(threads, thread_name))[0] == [b]
    assert threads.stats().started == 2


async def test_acquire_never_waits_for_a_busy_thread(make_threads: MakeThreads) -> None:
    threads = make_threads()
    tasks, gate = await hold_threads(threads, 3)
    gate.set()
    first_names = {r[0][0] for r in await asyncio.gather(*tasks)}
    assert threads.stats().idle == 3
    # Four requests at once with three idle threads: the barrier of four
    # inside their calls only opens if none of them waits for a thread.
    tasks, gate = await hold_threads(threads, 4)
    assert threads.stats().busy == 4
    gate.set()
    names = {r[0][0] for r in await asyncio.gather(*tasks)}
    assert len(names) == 4
    assert first_names < names
    assert threads.stats().started == 4


async def test_idle_threads_retire_and_the_set_starts_afresh(make_threads: MakeThreads) -> None:
    threads = make_threads(idle_timeout=0.05)
    tasks, gate = await hold_threads(threads, 3)
    gate.set()
    burst = {r[0][0] for r in await asyncio.gather(*tasks)}
    assert len(burst) == 3
    # Bounded polling: every idle thread ends on its own, no reaper needed.
    await eventually(lambda: threads.stats().retired == 3)
    stats = threads.stats()
    assert (stats.busy, stats.idle, stats.started) == (0, 0, 3)
    await eventually(lambda: not set(live_request_threads()) & burst)
    # The next request starts a new thread.
    (name,), _, _ = await run_request(threads, query_thread)
    assert name not in burst
    assert threads.stats().started == 4


async def test_a_thread_serving_a_request_never_retires(make_threads: MakeThreads) -> None:
    threads = make_threads(idle_timeout=0.02)
    between = asyncio.Event()
    names: list[str] = []

    async def long_request() -> None:
        binding = RequestBinding(threads)
        async with ThreadSensitiveContext(executor=binding):
            names.append(await sync_to_async(query_thread)())
            # The thread waits on its queue here, longer than idle_timeout.
            await between.wait()
            names.append(await sync_to_async(query_thread)())
        await asyncio.wrap_future(binding.end())

    held = asyncio.create_task(long_request())
    await eventually(lambda: len(names) == 1)
    # Another request's thread goes idle after the held one went quiet, and
    # retires: the held thread has now waited longer than idle_timeout too.
    (other,), _, _ = await run_request(threads, thread_name)
    assert other != names[0]
    await eventually(lambda: threads.stats().retired == 1)
    assert threads.stats().busy == 1
    between.set()
    await held
    assert names[1] == names[0]
    assert threads.stats().started == 2


async def test_close_ends_idle_threads_at_once_and_busy_ones_after_their_request(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads()
    tasks, gate = await hold_threads(threads, 2)
    gate.set()
    first_names = {r[0][0] for r in await asyncio.gather(*tasks)}
    between = asyncio.Event()
    names: list[str] = []

    async def held_request() -> None:
        binding = RequestBinding(threads)
        async with ThreadSensitiveContext(executor=binding):
            names.append(await sync_to_async(query_thread)())
            await between.wait()
            names.append(await sync_to_async(query_thread)())
        await asyncio.wrap_future(binding.end())

    held = asyncio.create_task(held_request())
    await eventually(lambda: len(names) == 1)
    busy_name = names[0]
    (idle_name,) = first_names - {busy_name}
    # timeout=0 only starts closing; a request still holds its thread.
    assert threads.close(0) is False
    await eventually(lambda: threads.stats().retired == 1)
    assert idle_name not in live_request_threads()
    assert threads.stats().closing
    # A request arriving now still runs, on a thread that ends with it.
    (late,), _, _ = await run_request(threads, query_thread)
    assert late not in (idle_name, busy_name)
    await eventually(lambda: threads.stats().retired == 2)
    # close() waits in a thread while the loop goes on serving the request.
    closing = asyncio.create_task(off_loop(threads.close, WAIT))
    between.set()
    await held
    assert await closing is True
    assert names == [busy_name, busy_name]
    stats = threads.stats()
    assert (stats.busy, stats.idle, stats.started, stats.retired) == (0, 0, 3, 3)
    await eventually(lambda: live_request_threads() == [])


Spy = Callable[..., None]


@pytest.fixture
def pooled_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """Records (thread, alias, is that thread's wrapper) for every make_pooled() call."""
    log: list[tuple[str, str, bool]] = []

    def spy(conn: Any) -> None:
        log.append((thread_name(), conn.alias, conn is connections[conn.alias]))
        make_pooled(conn)

    monkeypatch.setattr(_request_threads, "make_pooled", spy)
    return log


async def test_every_thread_makes_its_wrappers_pooled_before_its_first_call(
    make_threads: MakeThreads, pooled_log: list[tuple[str, str, bool]]
) -> None:
    threads = make_threads()
    seen: list[tuple[str, int]] = []

    def first_call() -> str:
        # How many wrappers of this thread were already made pooled.
        seen.append((thread_name(), sum(1 for t, _, _ in pooled_log if t == thread_name())))
        return thread_name()

    tasks, gate = await hold_threads(threads, 2)
    gate.set()
    names = {r[0][0] for r in await asyncio.gather(*tasks)}
    await run_request(threads, first_call)
    aliases = sorted(connections)
    assert sorted(pooled_log) == sorted((name, alias, True) for name in names for alias in aliases)
    # The reused thread did not do it again, and had done it before any call.
    assert len(pooled_log) == 2 * len(aliases)
    assert seen[0][0] in names
    assert seen[0][1] == len(aliases)


async def test_a_thread_that_cannot_pool_fails_its_calls_and_is_replaced(
    make_threads: MakeThreads, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = make_threads()
    broken: list[str] = []

    def fail_first_thread(conn: Any) -> None:
        if not broken or broken[0] == thread_name():
            broken[:1] = [thread_name()]
            raise ImproperlyConfigured("no pool for you")
        make_pooled(conn)

    monkeypatch.setattr(_request_threads, "make_pooled", fail_first_thread)
    with pytest.raises(
        RuntimeError, match="could not make its database connections pooled"
    ) as info:
        await run_request(threads, query_thread)
    assert isinstance(info.value.__cause__, ImproperlyConfigured)
    # It leaves instead of going idle; the next request gets a sound thread.
    await eventually(lambda: threads.stats().retired == 1)
    assert threads.stats().idle == 0
    (name,), _, _ = await run_request(threads, query_thread)
    assert name != broken[0]
    assert threads.stats().started == 2


def opened_here() -> int:
    """Query, then prove this thread's wrapper really holds a connection now."""
    ident = backend_id()
    assert connection.connection is not None
    return ident


def holding() -> tuple[bool, bool]:
    """At a call's start: (still holds a connection, inside an atomic block)."""
    return connection.connection is not None, connection.in_atomic_block


async def test_transaction_hold_gives_connections_back_after_each_call(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads(hold="transaction")
    results, _, _ = await run_request(threads, opened_here, holding, thread_name)
    assert results[1] == (False, False)


async def test_transaction_hold_keeps_the_connection_through_an_open_transaction(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads(hold="transaction")
    block = transaction.atomic()

    def create() -> int:
        Item.objects.create(name="spanning")
        return opened_here()

    results, leftovers, _ = await run_request(
        threads,
        block.__enter__,
        create,
        holding,
        opened_here,
        lambda: block.__exit__(None, None, None),
        holding,
    )
    # Same session throughout the transaction, given back once it committed.
    assert results[2] == (True, True)
    assert results[3] == results[1]
    assert results[5] == (False, False)
    assert leftovers == []
    assert (await run_request(threads, Item.objects.filter(name="spanning").count))[0] == [1]


async def test_request_hold_keeps_connections_until_the_request_ends(
    make_threads: MakeThreads,
) -> None:
    threads = make_threads(hold="request")
    results, _, _ = await run_request(threads, opened_here, holding, opened_here, thread_name)
    assert results[1] == (True, False)
    assert results[2] == results[0]
    # Given back at the end: the next request on this thread starts with none.
    after, _, _ = await run_request(threads, holding, thread_name)
    assert after == [(False, False), results[3]]


def test_hold_and_idle_timeout_are_validated() -> None:
    with pytest.raises(ValueError, match="hold must be 'transaction' or 'request', not 'always'"):
        RequestThreads(hold="always", idle_timeout=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idle_timeout must be a number of seconds > 0"):
        RequestThreads(hold="request", idle_timeout=0)
    assert RequestThreads(hold="request", idle_timeout=None).close(0) is True


def test_stats_as_dict_has_stable_names() -> None:
    threads = RequestThreads(hold="transaction", idle_timeout=None)
    assert threads.stats().as_dict() == {
        "busy": 0,
        "idle": 0,
        "started": 0,
        "retired": 0,
        "closing": False,
    }
    assert threads.close(0)


async def test_a_thread_that_cannot_start_is_forgotten(
    make_threads: MakeThreads, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = make_threads()

    def cannot_start(self: RequestThread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(RequestThread, "start", cannot_start)
    binding = RequestBinding(threads)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        binding.submit(thread_name)
    stats = threads.stats()
    assert (stats.busy, stats.started) == (0, 0)
    monkeypatch.undo()
    # The binding stayed unbound: its next call takes a thread.
    assert (await asyncio.wrap_future(binding.submit(query_thread))).startswith(PREFIX)
    assert await asyncio.wrap_future(binding.end()) == []


async def test_a_forked_child_has_none_of_the_parents_threads(make_threads: MakeThreads) -> None:
    threads = make_threads(hold="request")
    tasks, gate = await hold_threads(threads, 2)
    gate.set()
    await asyncio.gather(*tasks)
    between = asyncio.Event()
    ids: list[int] = []

    async def held_request() -> None:
        binding = RequestBinding(threads)
        async with ThreadSensitiveContext(executor=binding):
            ids.append(await sync_to_async(opened_here)())
            await between.wait()
            ids.append(await sync_to_async(opened_here)())
        await asyncio.wrap_future(binding.end())

    held = asyncio.create_task(held_request())
    await eventually(lambda: len(ids) == 1)
    assert threads.stats().as_dict() == {
        "busy": 1,
        "idle": 1,
        "started": 2,
        "retired": 0,
        "closing": False,
    }

    def child() -> dict[str, Any]:
        inherited = threads.stats().as_dict()

        async def one_request() -> str:
            results, _, _ = await run_request(threads, query_thread)
            return str(results[0])

        name = asyncio.run(one_request())
        return {"inherited": inherited, "name": name, "after": threads.stats().as_dict()}

    # Forked from a thread off the loop, which keeps running the held request.
    report = await off_loop(run_forked, "os.fork", child)
    assert report["inherited"] == {
        "busy": 0,
        "idle": 0,
        "started": 0,
        "retired": 0,
        "closing": False,
    }
    # The child's request ran on a thread started in the child.
    assert report["name"].startswith(f"{PREFIX}-request-")
    assert report["after"]["started"] == 1
    assert report["after"]["idle"] == 1
    # The parent's held session survived the child (discarded there without I/O).
    between.set()
    await held
    assert ids[1] == ids[0]
    assert threads.stats().started == 2
