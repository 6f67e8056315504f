"""db_sync_to_async has the surface of asgiref's sync_to_async(fn, thread_sensitive=False).

Each test puts the two side by side where asgiref defines the behaviour, so a
change in either shows up here.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import threading
import types
from collections.abc import Callable, Coroutine, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asgiref
import pytest
from asgiref.sync import (
    SyncToAsync,
    async_to_sync,
    iscoroutinefunction,
    markcoroutinefunction,
    sync_to_async,
)

from async_dbbridge import (
    DBExecutor,
    _call,
    db_call,
    db_sync_to_async,
    get_bridge_executor,
    install_default_executor,
)
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

ASGIREF_NOT_SYNC = "sync_to_async can only be applied to sync functions."


def count_items(prefix: str = "") -> int:
    """Count the items whose name starts with ``prefix``."""
    return Item.objects.filter(name__startswith=prefix).count()


count_items.marker = "kept"  # type: ignore[attr-defined]  # copied by functools.wraps


class Shelf:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def add(self, name: str) -> tuple[str, str]:
        """Create an item named with this shelf's prefix."""
        item = Item.objects.create(name=f"{self.prefix}{name}")
        return item.name, threading.current_thread().name

    @db_sync_to_async
    def add_async(self, name: str) -> tuple[str, str]:
        return self.add(name)


@pytest.fixture
def pinned() -> Iterator[DBExecutor]:
    executor = DBExecutor(max_workers=1, thread_name_prefix="pinned")
    yield executor
    executor.shutdown(wait=True)


# -- the wrapper: __self__, metadata, coroutine-function marking -------------------------


async def test_a_bound_method_keeps_self_and_runs_on_the_bridge() -> None:
    shelf = Shelf("shelf-")
    wrapped = db_sync_to_async(shelf.add)
    # asgiref's test_sync_to_async_method_self_attribute, for both.
    reference = sync_to_async(shelf.add, thread_sensitive=False)
    assert reference.__self__ is shelf  # type: ignore[attr-defined]  # set by asgiref
    assert wrapped.__self__ is shelf  # type: ignore[attr-defined]  # as asgiref sets it
    name, thread = await wrapped("a")
    assert (name, thread[:9]) == ("shelf-a", "dbbridge-")
    assert get_bridge_executor().stats().connections_opened["default"] >= 1
    assert await db_call(count_items, "shelf-") == 1
    # A plain function has no __self__, with either.
    assert not hasattr(sync_to_async(count_items, thread_sensitive=False), "__self__")
    assert not hasattr(db_sync_to_async(count_items), "__self__")


def _function_form(fn: Callable[..., Any], executor: DBExecutor) -> Callable[..., Any]:
    return db_sync_to_async(fn)


def _bare_decorator_form(fn: Callable[..., Any], executor: DBExecutor) -> Callable[..., Any]:
    return db_sync_to_async()(fn)


def _executor_form(fn: Callable[..., Any], executor: DBExecutor) -> Callable[..., Any]:
    return db_sync_to_async(executor=executor)(fn)


def _keyword_form(fn: Callable[..., Any], executor: DBExecutor) -> Callable[..., Any]:
    # asgiref's func is not positional-only: sync_to_async(func=fn) works.
    return db_sync_to_async(func=fn)


@pytest.mark.parametrize(
    "wrap", [_function_form, _bare_decorator_form, _executor_form, _keyword_form]
)
async def test_every_form_carries_the_same_attributes_as_sync_to_async(
    wrap: Callable[[Callable[..., Any], DBExecutor], Callable[..., Any]], pinned: DBExecutor
) -> None:
    reference = sync_to_async(count_items, thread_sensitive=False)
    wrapped = wrap(count_items, pinned)
    for attribute in (
        "__name__",
        "__qualname__",
        "__doc__",
        "__module__",
        "__wrapped__",
        "marker",
        "func",
    ):
        assert getattr(wrapped, attribute) == getattr(reference, attribute), attribute
    # asgiref < 3.11 has no context (nor context=): ours is None there.
    assert wrapped.context is getattr(reference, "context", None) is None  # type: ignore[attr-defined]  # as asgiref >= 3.11 keeps it
    # Detected as a coroutine function, by asgiref (as Django asks) and by inspect.
    assert iscoroutinefunction(wrapped) is iscoroutinefunction(reference) is True
    assert inspect.iscoroutinefunction(wrapped) is inspect.iscoroutinefunction(reference)
    # asgiref's test_nested_sync_to_async_retains_wrapped_function_attributes:
    # an outer decorator can set attributes on the result.
    wrapped.attr_name = "outer"  # type: ignore[attr-defined]  # as an outer decorator would
    assert wrapped.attr_name == "outer"  # type: ignore[attr-defined]
    assert await wrapped() == 0


async def test_a_decorated_method_binds_like_sync_to_async() -> None:
    class Reference:
        @sync_to_async(thread_sensitive=False)
        def add_async(self, name: str) -> None:
            return None

    shelf = Shelf("method-")
    bound, reference = shelf.add_async, Reference().add_async
    assert iscoroutinefunction(bound) is iscoroutinefunction(reference) is True
    assert bound.__name__ == reference.__name__ == "add_async"
    name, thread = await bound("b")
    assert (name, thread[:9]) == ("method-b", "dbbridge-")
    # Read on the class it is the wrapper itself, called with the instance
    # first (asgiref's binds None as self there, and the call fails).
    name, thread = await Shelf.add_async(shelf, "c")
    assert (name, thread[:9]) == ("method-c", "dbbridge-")
    assert await db_call(count_items, "method-") == 2


async def test_each_call_is_asgiref_s_own_so_async_to_sync_inside_uses_the_callers_loop(
    pinned: DBExecutor,
) -> None:
    # What SyncToAsync does on the worker thread (and a plain executor call
    # does not): async_to_sync() inside runs on the caller's loop.
    async def running_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def loop_seen_from_the_thread() -> tuple[asyncio.AbstractEventLoop, str]:
        count_items()
        return async_to_sync(running_loop)(), threading.current_thread().name

    caller = asyncio.get_running_loop()
    for wrapped in (
        db_sync_to_async(loop_seen_from_the_thread),
        db_sync_to_async(loop_seen_from_the_thread, executor=pinned),
    ):
        # The design rule: asgiref's SyncToAsync through its public executor=,
        # not a subclass of it.
        assert not isinstance(wrapped, SyncToAsync)
        assert "loop_seen_from_the_thread" in repr(wrapped)
        loop, thread = await wrapped()
        assert loop is caller
        assert thread.startswith(("dbbridge-", "pinned-"))


# -- thread_sensitive=, executor=, context= ---------------------------------------------


def where() -> str:
    count_items()
    return threading.current_thread().name


async def test_thread_sensitive_false_is_accepted_so_a_rename_is_enough() -> None:
    for wrapped in (
        db_sync_to_async(where, thread_sensitive=False),
        db_sync_to_async(thread_sensitive=False)(where),
    ):
        assert (await wrapped()).startswith("dbbridge-")


def test_thread_sensitive_true_is_refused_as_asgiref_refuses_it_with_an_executor(
    pinned: DBExecutor,
) -> None:
    rule = "executor must not be set when thread_sensitive is True"
    with pytest.raises(TypeError, match=rule):
        sync_to_async(count_items, thread_sensitive=True, executor=pinned)
    with pytest.raises(TypeError, match=rule):
        db_sync_to_async(count_items, thread_sensitive=True)  # type: ignore[call-overload]  # the misuse under test
    with pytest.raises(TypeError, match=rule):
        db_sync_to_async(thread_sensitive=True)  # type: ignore[call-overload]  # the misuse under test


def test_an_executor_must_be_a_dbexecutor() -> None:
    plain = ThreadPoolExecutor(max_workers=1)
    try:
        with pytest.raises(TypeError, match="takes a DBExecutor, not ThreadPoolExecutor"):
            db_sync_to_async(count_items, executor=plain)  # type: ignore[call-overload]  # the misuse under test
    finally:
        plain.shutdown()


@pytest.mark.skipif(
    not _call._SYNC_TO_ASYNC_TAKES_CONTEXT, reason="the installed asgiref has no context="
)
async def test_context_keeps_the_functions_changes_out_of_the_callers_context(
    pinned: DBExecutor,
) -> None:
    # asgiref's test_sync_to_async_contextvars_with_custom_context, on the bridge.
    def swap() -> tuple[str, str]:
        seen = request_id.get()
        request_id.set("set-in-thread")
        Item.objects.create(name=seen)
        return seen, threading.current_thread().name

    request_id.set("outer")
    for wrapped in (
        db_sync_to_async(swap, context=contextvars.copy_context()),
        db_sync_to_async(context=contextvars.copy_context(), executor=pinned)(swap),
    ):
        context = wrapped.context  # type: ignore[attr-defined]  # as asgiref keeps it
        seen, thread = await wrapped()
        assert seen == "outer"
        assert thread.startswith(("dbbridge-", "pinned-"))
        assert request_id.get() == "outer"  # the caller's context is untouched
        assert context.get(request_id) == "set-in-thread"  # the given one has the change
    assert await db_call(count_items, "outer") == 2


def test_context_is_detected_by_signature_and_refused_where_asgiref_lacks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The detection agrees with the installed asgiref itself...
    try:
        SyncToAsync(count_items, thread_sensitive=False, context=contextvars.Context())
        accepts = True
    except TypeError:
        accepts = False
    assert _call._SYNC_TO_ASYNC_TAKES_CONTEXT is accepts
    # ...and where it says no, context= is a clear error naming the version.
    monkeypatch.setattr(_call, "_SYNC_TO_ASYNC_TAKES_CONTEXT", False)
    with pytest.raises(TypeError, match=r"needs asgiref >= 3\.11") as excinfo:
        db_sync_to_async(count_items, context=contextvars.copy_context())
    assert f"asgiref {asgiref.__version__} is installed" in str(excinfo.value)
    # Without context= nothing changes.
    assert db_sync_to_async(count_items).context is None  # type: ignore[attr-defined]


def test_context_must_be_a_context() -> None:
    with pytest.raises(TypeError, match=r"takes a contextvars\.Context, not dict"):
        db_sync_to_async(count_items, context={})  # type: ignore[call-overload]  # the misuse under test


# -- misuse: asgiref's TypeError, with a note that names the problem --------------------


async def _async_function() -> None:
    return None


class _AsyncCallable:
    async def __call__(self) -> None:
        return None


def _marked_sync() -> None:
    return None


markcoroutinefunction(_marked_sync)

NOT_SYNC = [
    pytest.param(lambda: _async_function, "is a coroutine function", id="async-function"),
    pytest.param(
        lambda: functools.partial(_async_function), "is a coroutine function", id="async-partial"
    ),
    pytest.param(_AsyncCallable, "is a coroutine function", id="async-callable-object"),
    pytest.param(lambda: _marked_sync, "is a coroutine function", id="marked-coroutine"),
    pytest.param(lambda: 42, "is not callable", id="not-callable"),
    pytest.param(_async_function, "not the coroutine", id="coroutine"),
]


@pytest.mark.parametrize(("make", "note"), NOT_SYNC)
def test_misuse_raises_asgiref_typeerror_with_a_note(make: Callable[[], object], note: str) -> None:
    bad = make()
    try:
        with pytest.raises(TypeError) as reference:
            sync_to_async(bad, thread_sensitive=False)  # type: ignore[call-overload]  # the misuse under test
        wraps: list[Callable[[Any], object]] = [db_sync_to_async, db_sync_to_async()]
        for wrap in wraps:
            with pytest.raises(TypeError) as excinfo:
                wrap(bad)
            # The same exception as asgiref's: code and tests comparing see no difference...
            assert excinfo.value.args == reference.value.args == (ASGIREF_NOT_SYNC,)
            # ...and the note says what was wrong with what.
            (added,) = excinfo.value.__notes__
            assert added.startswith("db_sync_to_async() takes a sync function")
            assert note in added
            assert repr(bad) in added
    finally:
        if inspect.iscoroutine(bad):
            bad.close()


# -- a coroutine as the result ------------------------------------------------------------


async def test_a_returned_coroutine_is_a_typeerror_and_is_closed(pinned: DBExecutor) -> None:
    ran: list[str] = []
    returned: list[Coroutine[Any, Any, None]] = []

    async def forgotten() -> None:
        ran.append("body")

    def creates_then_forgets_to_await(name: str) -> object:
        Item.objects.create(name=name)
        coroutine = forgotten()
        returned.append(coroutine)
        return coroutine

    for wrapped in (
        db_sync_to_async(creates_then_forgets_to_await),
        db_sync_to_async(creates_then_forgets_to_await, executor=pinned),
    ):
        with pytest.raises(TypeError, match="returned the coroutine") as excinfo:
            await wrapped("forgot")
        assert str(excinfo.value).startswith("db_sync_to_async() takes a sync function")
        # Closed, so no "never awaited" warning follows (warnings are errors here).
        assert inspect.getcoroutinestate(returned.pop()) == inspect.CORO_CLOSED
    assert ran == []
    # The sync part did run, on the bridge, like any call.
    assert await db_call(count_items, "forgot") == 2


async def test_a_returned_generator_based_coroutine_is_a_typeerror_too() -> None:
    returned: list[Generator[None, None, None]] = []

    @types.coroutine
    def old_style() -> Generator[None, None, None]:
        yield

    def forgets() -> Generator[None, None, None]:
        count_items()
        returned.append(old_style())
        return returned[-1]

    with pytest.raises(TypeError, match="returned the coroutine"):
        await db_sync_to_async(forgets)()
    assert inspect.getgeneratorstate(returned[0]) == inspect.GEN_CLOSED


# -- the executor is found when called ----------------------------------------------------


@db_sync_to_async
def thread_name() -> str:
    count_items()
    return threading.current_thread().name


def test_the_executor_is_looked_up_on_each_loop_at_call_time() -> None:
    names: list[str] = []

    async def on_an_installed(prefix: str) -> None:
        install_default_executor(DBExecutor(max_workers=1, thread_name_prefix=prefix))
        names.append(await thread_name())
        names.append(await thread_name())

    # Two loops, one after the other, each with its own executor, then none:
    # one module-level function follows each.
    asyncio.run(on_an_installed("first"))
    asyncio.run(on_an_installed("second"))
    names.append(asyncio.run(thread_name()))
    assert [name.split("-")[0] for name in names] == [
        "first",
        "first",
        "second",
        "second",
        "dbbridge",
    ]
