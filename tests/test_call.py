"""db_call, db_sync_to_async and install_default_executor on a real database."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import types
from collections.abc import Callable, Coroutine, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

import async_dbbridge
from async_dbbridge import (
    DBExecutor,
    _compat,
    db_call,
    db_sync_to_async,
    get_bridge_executor,
    install_default_executor,
)
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import LOOP, SetSetting
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def query_and_report() -> tuple[str, bool]:
    """One query; report the thread and whether the connection is open after it."""
    Item.objects.count()
    return threading.current_thread().name, connection.connection is not None


async def wait_for(event: threading.Event, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a polling deadline, not a cancel scope
    """Bounded polling from the loop: the installed executor may be the busy one."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not event.is_set():
        assert asyncio.get_running_loop().time() < deadline, "event not set in time"
        await asyncio.sleep(0.001)


@pytest.fixture
def persistent(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60)


# -- installed as the loop's default -------------------------------------------------


def test_installed_default_cleans_up_every_offload_path_and_asyncio_run_leaves_none(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60)
    baseline = server_session_count()
    seen: dict[str, tuple[str, bool]] = {}
    during: list[int] = []

    async def main() -> DBExecutor:
        executor = install_default_executor(DBExecutor(max_workers=4))
        loop = asyncio.get_running_loop()
        seen["run_in_executor"] = await loop.run_in_executor(None, query_and_report)
        seen["to_thread"] = await asyncio.to_thread(query_and_report)
        seen["sync_to_async"] = await sync_to_async(query_and_report, thread_sensitive=False)()
        during.append(await asyncio.to_thread(server_session_count))
        return executor

    executor = asyncio.run(main())
    for path, (thread_name, still_open) in seen.items():
        assert thread_name.startswith("dbbridge-"), path
        assert still_open, path  # CONN_MAX_AGE=60: kept for reuse, so a leak would show
    assert during[0] > baseline  # the connections really were open on the server
    # asyncio.run() shuts the default executor down: nothing is left.
    assert executor.stats().shutdown
    assert executor.stats().open_connections == 0
    wait_for_server_sessions("default", baseline)


async def test_install_is_idempotent_and_retires_the_previous_default() -> None:
    loop = asyncio.get_running_loop()
    # Make the loop create its own default pool first, as any to_thread() would.
    await asyncio.to_thread(lambda: None)
    # asyncio's own pool; uvloop keeps its default where Python cannot see it
    # (documented: there the library knows only the defaults it installed).
    previous = _compat.loop_default_executor(loop)
    assert (previous is None) == (LOOP == "uvloop")
    executor = DBExecutor(max_workers=2)
    try:
        assert install_default_executor(executor) is executor
        assert install_default_executor(executor) is executor
        if isinstance(previous, ThreadPoolExecutor):
            assert previous._shutdown  # not leaked
        name = await asyncio.to_thread(lambda: threading.current_thread().name)
        assert name.startswith("dbbridge-")
        # With no argument, the process-wide bridge replaces it.
        bridge = install_default_executor()
        assert bridge is get_bridge_executor()
        assert executor.stats().shutdown
    finally:
        await asyncio.to_thread(executor.shutdown, True)


def test_install_needs_a_loop_and_a_dbexecutor() -> None:
    with pytest.raises(RuntimeError, match="running event loop"):
        install_default_executor()
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(TypeError, match="DBExecutor"):
            install_default_executor(object(), loop=loop)  # type: ignore[arg-type]
        executor = DBExecutor(max_workers=1)
        assert install_default_executor(executor, loop=loop) is executor
        assert loop.run_until_complete(db_call(lambda: threading.current_thread().name))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    assert executor.stats().shutdown


# -- db_call ---------------------------------------------------------------------


@pytest.mark.usefixtures("persistent")
async def test_db_call_runs_on_the_bridge_and_copies_context() -> None:
    request_id.set("req-1")

    def read_context() -> str:
        Item.objects.create(name=request_id.get())
        return request_id.get()

    assert await db_call(read_context) == "req-1"
    # Django 6.1's MySQL backend may open (and close) a temporary connection to
    # read the server's version first: compare counts, don't assume one.
    opened = get_bridge_executor().stats().connections_opened["default"]
    assert await db_call(Item.objects.filter(name="req-1").count) == 1
    stats = get_bridge_executor().stats()
    assert stats.calls == 2
    assert stats.connections_opened["default"] == opened  # reused
    assert stats.connections_open == {"default": 1}
    # The bridge's connections are the pool's: given back after each call,
    # kept open under CONN_MAX_AGE=60.
    assert stats.pooled
    pool = async_dbbridge.stats().pools["default"]
    assert (pool.in_use, pool.idle, pool.opened) == (0, 1, opened)


async def test_db_call_passes_args_and_kwargs() -> None:
    def make(name: str, *, value: int) -> int:
        return Item.objects.create(name=name, value=value).value

    assert await db_call(make, "x", value=7) == 7


async def test_db_call_rejects_coroutines_and_coroutine_functions() -> None:
    async def coro_fn() -> None:
        return None

    with pytest.raises(TypeError, match="coroutine function"):
        await db_call(coro_fn)  # type: ignore[unused-coroutine]  # the misuse under test
    coro = coro_fn()
    try:
        with pytest.raises(TypeError, match="coroutine"):
            await db_call(coro)  # type: ignore[arg-type]
    finally:
        coro.close()
    with pytest.raises(TypeError, match="callable"):
        await db_call(42)  # type: ignore[arg-type]


async def test_db_call_rejects_a_returned_coroutine_and_closes_it() -> None:
    ran: list[str] = []
    returned: list[Coroutine[Any, Any, None]] = []

    async def forgotten() -> None:
        ran.append("body")

    def creates_then_forgets_to_await() -> object:
        Item.objects.create(name="forgot")
        returned.append(forgotten())
        return returned[-1]

    # Both shapes of the mistake: a function, and a lambda around the call.
    for fn in (creates_then_forgets_to_await, lambda: creates_then_forgets_to_await()):
        with pytest.raises(TypeError, match="returned the coroutine") as excinfo:
            await db_call(fn)
        assert str(excinfo.value).startswith(f"db_call() takes a sync function, but {fn!r}")
        # Closed, so no "never awaited" warning follows (warnings are errors here).
        assert inspect.getcoroutinestate(returned.pop()) == inspect.CORO_CLOSED
    assert ran == []
    # The sync part did run, on the bridge, and was cleaned up like any call.
    assert await db_call(Item.objects.filter(name="forgot").count) == 2
    stats = get_bridge_executor().stats()
    assert stats.connections_opened["default"] >= 1
    assert stats.errors == 0  # the call itself succeeded; the mistake is the caller's


async def test_db_call_rejects_a_returned_generator_based_coroutine() -> None:
    returned: list[Generator[None, None, None]] = []

    @types.coroutine
    def old_style() -> Generator[None, None, None]:
        yield

    def forgets() -> object:
        returned.append(old_style())
        return returned[-1]

    with pytest.raises(TypeError, match="returned the coroutine"):
        await db_call(forgets)
    assert inspect.getgeneratorstate(returned[0]) == inspect.GEN_CLOSED


class Later:
    """An awaitable that is not a coroutine: handing one back can be deliberate."""

    def __await__(self) -> Generator[None, None, str]:
        yield from ()
        return "awaited"


def plain_generator() -> Iterator[int]:
    """A generator, not a coroutine: returned like any other object."""
    yield 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: None,
        lambda: 0,
        lambda: 1.5,
        lambda: True,
        lambda: "",
        lambda: b"",
        lambda: (),
        lambda: [],
        lambda: {},
        lambda: set(),
        lambda: Item(name="unsaved"),
        lambda: Item.objects.none(),
        Later,
        plain_generator,
    ],
)
async def test_db_call_returns_other_results_unchanged(make: Callable[[], object]) -> None:
    value = make()
    assert await db_call(lambda: value) is value
    if isinstance(value, Later):
        assert await value == "awaited"


async def test_db_call_lets_a_future_through() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    assert await db_call(lambda: future) is future
    future.set_result("done")
    assert await future == "done"


def test_db_call_without_a_running_loop_is_a_runtime_error() -> None:
    coro = db_call(Item.objects.count)
    try:
        with pytest.raises(RuntimeError, match="running event loop"):
            coro.send(None)
    finally:
        coro.close()


async def test_db_call_on_a_shut_down_executor_is_a_runtime_error() -> None:
    executor = install_default_executor(DBExecutor(max_workers=1))
    await asyncio.to_thread(executor.shutdown, True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        await db_call(Item.objects.count)


# -- cancellation ------------------------------------------------------------------


async def test_cancelled_queued_call_never_runs() -> None:
    executor = install_default_executor(DBExecutor(max_workers=1))
    release = threading.Event()
    started = threading.Event()
    ran: list[str] = []

    def blocker() -> None:
        started.set()
        release.wait(10)

    def queued() -> None:
        ran.append("queued")
        Item.objects.create(name="must-not-exist")

    first = asyncio.ensure_future(db_call(blocker))
    await wait_for(started)
    second = asyncio.ensure_future(db_call(queued))
    await asyncio.sleep(0)  # let it reach the queue
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    release.set()
    await first
    # FIFO: once a later call has run, the cancelled one has been skipped.
    assert await db_call(Item.objects.count) == 0
    assert ran == []
    assert executor.stats().queued == 0


async def test_cancelled_running_call_completes_is_cleaned_up_and_result_is_dropped(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=0)
    executor = install_default_executor(DBExecutor(max_workers=1))
    started = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def long_running() -> str:
        Item.objects.create(name="written-anyway")
        started.set()
        release.wait(10)
        finished.set()
        return "dropped"

    task = asyncio.ensure_future(db_call(long_running))
    await wait_for(started)
    task.cancel()
    # The awaiting task sees the cancellation at once, while the call still runs.
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not finished.is_set()
    release.set()
    # The call finishes in its thread and its connection is cleaned up.
    assert await db_call(Item.objects.filter(name="written-anyway").count) == 1
    assert finished.is_set()
    stats = executor.stats()
    assert stats.connections_opened["default"] >= 1
    assert stats.open_connections == 0


# -- db_sync_to_async ---------------------------------------------------------------


@db_sync_to_async
def create_item(name: str) -> int:
    return Item.objects.create(name=name).pk


class Repository:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @db_sync_to_async
    def create(self, name: str) -> str:
        return Item.objects.create(name=f"{self.prefix}{name}").name


@pytest.mark.usefixtures("persistent")
async def test_db_sync_to_async_decorator_function_and_method_forms() -> None:
    assert await create_item("a") > 0
    opened = get_bridge_executor().stats().connections_opened["default"]  # see above
    assert await db_sync_to_async(Item.objects.count)() == 1
    assert await Repository("repo-").create("b") == "repo-b"
    pinned = DBExecutor(max_workers=1, thread_name_prefix="pinned")
    try:

        @db_sync_to_async(executor=pinned)
        def where() -> str:
            return threading.current_thread().name

        assert (await where()).startswith("pinned-")
    finally:
        await asyncio.to_thread(pinned.shutdown, True)
    assert get_bridge_executor().stats().connections_opened["default"] == opened  # reused


async def test_db_sync_to_async_propagates_context_both_ways(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=0)
    request_id.set("outer")

    @db_sync_to_async
    def swap() -> str:
        seen = request_id.get()
        request_id.set("set-in-thread")
        Item.objects.count()
        return seen

    assert await swap() == "outer"
    # asgiref semantics: the function's changes come back to the caller.
    assert request_id.get() == "set-in-thread"
    assert get_bridge_executor().stats().open_connections == 0


def test_db_sync_to_async_rejects_async_functions() -> None:
    async def already_async() -> None:
        return None

    with pytest.raises(TypeError, match="coroutine function"):
        db_sync_to_async(already_async)


# -- load ------------------------------------------------------------------------


@pytest.fixture
def one_bridge_worker(settings: object) -> Iterator[None]:
    from django.conf import settings as django_settings

    saved = django_settings.ASYNC_DBBRIDGE
    django_settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 2}
    yield
    django_settings.ASYNC_DBBRIDGE = saved


@pytest.mark.usefixtures("persistent", "one_bridge_worker")
async def test_process_wide_bridge_follows_settings_and_bounds_connections() -> None:
    results = await asyncio.gather(*(db_call(query_and_report) for _ in range(50)))
    assert {name for name, _ in results} <= {"dbbridge-0", "dbbridge-1"}
    stats = get_bridge_executor().stats()
    assert stats.max_workers == 2
    assert stats.connections_opened["default"] <= 2
    assert stats.open_connections == await asyncio.to_thread(server_session_count)
