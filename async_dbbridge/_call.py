"""db_call and db_sync_to_async: the async entry points onto the bridge."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from types import FunctionType, GeneratorType
from typing import Any, Final, Generic, Literal, ParamSpec, TypeVar, overload

import asgiref
from asgiref.sync import SyncToAsync, iscoroutinefunction, markcoroutinefunction

from ._executor import DBExecutor
from ._install import executor_for_loop

__all__ = ("db_call", "db_sync_to_async")

_P = ParamSpec("_P")
_R = TypeVar("_R")


_ASYNC_CODE_FLAGS: Final = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE

# The exact text asgiref's SyncToAsync raises for anything but a sync callable
# (unchanged from asgiref 3.8.0 to 3.13.0). db_sync_to_async raises it too, so
# code and tests that compare against sync_to_async's error see the same one.
_ASGIREF_NOT_SYNC: Final = "sync_to_async can only be applied to sync functions."

# Results that are never coroutines. An exact type() lookup in this set is the
# whole result check for nearly every call, so it costs next to nothing next
# to the thread hand-off; anything else gets the (still cheap) full check.
_PLAIN_RESULTS: Final[frozenset[type]] = frozenset(
    {type(None), bool, int, float, str, bytes, tuple, list, dict, set}
)


# -- asgiref version differences ------------------------------------------------


def _sync_to_async_takes_context() -> bool:
    """Whether asgiref's `SyncToAsync` takes `context=`.

    The only asgiref difference db_sync_to_async depends on, detected by
    signature rather than by version. Checked on the sources of asgiref 3.8.0,
    3.8.1, 3.9.0 and 3.10.0 (no `context` parameter) and 3.11.0, 3.12.1 and
    3.13.0 (`context: contextvars.Context | None = None`, used as given instead
    of a copy of the caller's context).
    """
    return "context" in inspect.signature(SyncToAsync).parameters


_SYNC_TO_ASYNC_TAKES_CONTEXT: Final = _sync_to_async_takes_context()


# -- checks -------------------------------------------------------------------------


def _not_sync_reason(fn: object) -> str | None:
    """Why `fn` cannot run on a thread, or None if it is a sync callable."""
    # Fast path for the common case, a plain function: its code flags say it all
    # (the markers are how asgiref/inspect flag sync functions as coroutine ones).
    if (
        type(fn) is FunctionType
        and not fn.__code__.co_flags & _ASYNC_CODE_FLAGS
        and not hasattr(fn, "_is_coroutine_marker")
        and not hasattr(fn, "_is_coroutine")
    ):
        return None
    if inspect.iscoroutine(fn) or inspect.isawaitable(fn):
        return f"not the coroutine {fn!r}; await the coroutine directly instead"
    if not callable(fn):
        return f"not {fn!r}, which is not callable"
    # asgiref's iscoroutinefunction, as SyncToAsync uses, so both refuse the same
    # things: before Python 3.12 it also sees functions marked with asgiref's
    # markcoroutinefunction, which inspect's does not. A callable object whose
    # __call__ is async counts too.
    if iscoroutinefunction(fn) or iscoroutinefunction(type(fn).__call__):
        return f"but {fn!r} is a coroutine function; call and await it directly instead"
    return None


def _check_sync_callable(fn: object, what: str) -> None:
    # db_call's own texts: it stands for asyncio.to_thread(), which has no
    # check at all, so there is no text to match, and these name the object.
    reason = _not_sync_reason(fn)
    if reason is not None:
        raise TypeError(f"{what} takes a sync function, {reason}")


def _check_sync_callable_like_asgiref(fn: object) -> None:
    # asgiref's text exactly, as args[0]: db_sync_to_async replaces
    # sync_to_async(fn, thread_sensitive=False), and whoever compares the errors
    # (a test, an except clause matching the text) must see no difference. The
    # specifics go in a note, shown with the traceback (Python >= 3.11).
    reason = _not_sync_reason(fn)
    if reason is not None:
        error = TypeError(_ASGIREF_NOT_SYNC)
        error.add_note(f"db_sync_to_async() takes a sync function, {reason}")
        raise error


def _reject_coroutine_result(result: object, fn: object, what: str) -> None:
    """Raise if a call returned a coroutine: `fn` called an async function and
    did not await it, so that function never ran.

    The coroutine is closed, not left to the garbage collector: the mistake is
    reported here, once, not again as a "coroutine ... was never awaited"
    warning. Coroutines of every kind count (`async def`, `@types.coroutine`
    generators, compiled ones registered as `collections.abc.Coroutine`). Other
    awaitables, such as a future, do pass: a sync function may hand one back on
    purpose for the caller to await, and only a coroutine means lost work.
    """
    is_coroutine = isinstance(result, Coroutine) or (  # async def, compiled ones
        isinstance(result, GeneratorType)  # @types.coroutine
        and bool(result.gi_code.co_flags & inspect.CO_ITERABLE_COROUTINE)
    )
    if not is_coroutine:
        return
    result.close()  # type: ignore[attr-defined]  # a coroutine or a generator, by the test above
    raise TypeError(
        f"{what} takes a sync function, but {fn!r} returned the coroutine {result!r}: "
        "it called an async function without awaiting it; call and await that "
        "function directly instead"
    )


def _running_loop(what: str) -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"{what} must be awaited in a running event loop; from sync code call the "
            "function directly, or use DBExecutor.submit()"
        ) from None


# -- db_call --------------------------------------------------------------------------


async def db_call(fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """Run a sync function that uses the Django ORM on the bridge, and await it.

    These two lines are equivalent, except that the second never leaks the
    thread's database connection:

    ```python
    # Not runnable: fn and its arguments stand for yours, in an async function.
    await asyncio.to_thread(fn, *args, **kwargs)
    await db_call(fn, *args, **kwargs)
    ```

    The call runs on the executor installed on the running loop with
    [`install_default_executor`][async_dbbridge.install_default_executor] (or
    set as its default), else on the process-wide bridge built from
    `settings.ASYNC_DBBRIDGE`. Its connections are prepared and cleaned up like
    a request's (see [`Policy`][async_dbbridge.Policy]). Context variables are
    copied into the call, as `asyncio.to_thread` does.

    **Cancellation:** a call that has not started when the awaiting task is
    cancelled never runs. A call that is already running cannot be interrupted:
    it finishes in its thread and its connections are cleaned up, but its result
    is dropped, and the awaiting task sees `asyncio.CancelledError` at once,
    without waiting for it.

    Args:
        fn: A sync callable.
        *args: Positional arguments for `fn`.
        **kwargs: Keyword arguments for `fn`.

    Returns:
        What `fn` returned.

    Raises:
        TypeError: `fn` is a coroutine function or a coroutine, or it returned
            a coroutine (it called an async function without awaiting it; the
            coroutine is closed).
        RuntimeError: There is no running event loop, or the executor is shut down.
        Exception: Whatever `fn` raised, unchanged.
    """
    _check_sync_callable(fn, "db_call()")
    loop = _running_loop("db_call()")
    result = await executor_for_loop(loop)._submit_to_loop(loop, fn, args, kwargs)
    # Checked on the loop, after the hand-back: a check in the worker would need
    # a wrapper around every call. (If the awaiting task was cancelled, the
    # result is dropped unseen; a coroutine then warns when collected.)
    if type(result) not in _PLAIN_RESULTS:
        _reject_coroutine_result(result, fn, "db_call()")
    return result


# -- db_sync_to_async -------------------------------------------------------------------


class _BridgedSyncToAsync(Generic[_P, _R]):
    """What `db_sync_to_async` returns: `SyncToAsync`'s surface, on the bridge.

    The same attributes as asgiref's `SyncToAsync` (the wrapped function's
    metadata, `func`, `context`, `__self__` for a bound method, marked as a
    coroutine function, binds as a method), and each call is a call of
    asgiref's own `SyncToAsync` with its public `executor=` argument. Not a
    subclass: `SyncToAsync` fixes its executor when built, while this one looks
    the executor up at call time, so it must not inherit the call machinery.
    """

    func: Callable[_P, _R]
    context: contextvars.Context | None

    def __init__(
        self,
        func: Callable[_P, _R],
        executor: DBExecutor | None,
        context: contextvars.Context | None,
    ) -> None:
        # The wrapped function's metadata (and __dict__) first, our attributes
        # after, as asgiref >= 3.12 does: a callable object with a `context` or
        # `func` attribute of its own must not overwrite ours.
        functools.update_wrapper(self, func)
        self.func = func
        self.context = context
        self._executor = executor
        # The SyncToAsync last built, with the executor it was built for:
        # rebuilt only when the executor found at call time changes. One tuple,
        # replaced whole, so loops in other threads never see a mixed pair.
        self._bridged: tuple[DBExecutor, Callable[_P, Awaitable[_R]]] | None = None
        markcoroutinefunction(self)
        bound_to = getattr(func, "__self__", _UNBOUND)
        if bound_to is not _UNBOUND:
            self.__self__ = bound_to

    async def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        # As in SyncToAsync.__call__: Django's debug page leaves this frame out.
        __traceback_hide__ = True
        executor = self._executor
        if executor is None:
            # Looked up per call, not when decorated: a module-level function
            # serves every loop, each with its own installed executor.
            executor = executor_for_loop(_running_loop("db_sync_to_async()"))
        bridged = self._bridged
        if bridged is None or bridged[0] is not executor:
            bridged = self._bridged = (executor, _sync_to_async(self.func, executor, self.context))
        # Awaited in the caller's task: asgiref's SyncToAsync copies the
        # caller's context in and its changes back out (unless context= was given).
        result = await bridged[1](*args, **kwargs)
        if type(result) not in _PLAIN_RESULTS:
            _reject_coroutine_result(result, self.func, "db_sync_to_async()")
        return result

    def __get__(self, instance: object, owner: type | None = None) -> Callable[..., Any]:
        # As SyncToAsync.__get__ does, so a decorated method gets its instance.
        # Read on the class it is itself (asgiref would bind None as `self`).
        if instance is None:
            return self
        bound: functools.partial[Any] = functools.partial(self.__call__, instance)  # type: ignore[arg-type]  # the instance is the method's first argument
        return functools.update_wrapper(bound, self.func)

    def __repr__(self) -> str:
        return f"<db_sync_to_async {self.func!r}>"


_UNBOUND: Final = object()


def _sync_to_async(
    func: Callable[_P, _R], executor: DBExecutor, context: contextvars.Context | None
) -> Callable[_P, Awaitable[_R]]:
    # context= only when given: asgiref < 3.11 has no such parameter (and
    # db_sync_to_async refused a context there already).
    if context is None:
        return SyncToAsync(func, thread_sensitive=False, executor=executor)
    return SyncToAsync(func, thread_sensitive=False, executor=executor, context=context)


@overload
def db_sync_to_async(
    func: Callable[_P, _R],
    *,
    thread_sensitive: Literal[False] = False,
    executor: DBExecutor | None = None,
    context: contextvars.Context | None = None,
) -> Callable[_P, Coroutine[Any, Any, _R]]: ...


@overload
def db_sync_to_async(
    func: None = None,
    *,
    thread_sensitive: Literal[False] = False,
    executor: DBExecutor | None = None,
    context: contextvars.Context | None = None,
) -> Callable[[Callable[_P, _R]], Callable[_P, Coroutine[Any, Any, _R]]]: ...


def db_sync_to_async(
    func: Callable[_P, _R] | None = None,
    *,
    thread_sensitive: Literal[False] = False,
    executor: DBExecutor | None = None,
    context: contextvars.Context | None = None,
) -> (
    Callable[_P, Coroutine[Any, Any, _R]]
    | Callable[[Callable[_P, _R]], Callable[_P, Coroutine[Any, Any, _R]]]
):
    """asgiref's `sync_to_async` on the bridge: the same semantics, no leaks.

    These are equivalent, except that the second cleans up the connection:

    ```python
    # Not runnable: fn and its arguments stand for yours, in an async function.
    await sync_to_async(fn, thread_sensitive=False)(*args)
    await db_sync_to_async(fn)(*args)
    ```

    Works as a function and as a decorator (`@db_sync_to_async`,
    `@db_sync_to_async()` or `@db_sync_to_async(executor=...)`), on functions,
    bound methods and methods. The result looks like asgiref's: it carries the
    function's name and docstring (`functools.wraps`), `__self__` for a bound
    method, and `asgiref.sync.iscoroutinefunction()` is true for it. Context
    variables travel both ways, as with asgiref: values the function sets are
    visible to the caller afterwards.

    Each call is a call of asgiref's own `SyncToAsync` with its public
    `executor=` argument: the executor installed on the running loop, else the
    process-wide bridge, looked up when called, unless `executor` is given.

    Args:
        func: A sync callable. Leave it out to get a decorator.
        thread_sensitive: Only `False`, accepted so that
            `sync_to_async(fn, thread_sensitive=False)` becomes
            `db_sync_to_async(fn, thread_sensitive=False)` by a rename.
            Thread-sensitive code runs on the request's thread, which is not
            the bridge's: use asgiref's `sync_to_async(fn)` for it.
        executor: A [`DBExecutor`][async_dbbridge.DBExecutor] to run on, instead
            of the one found at call time.
        context: A `contextvars.Context` to run the function in, as asgiref's
            `context=`: its changes stay in that context instead of coming back
            to the caller. Needs asgiref >= 3.11.

    Returns:
        An async callable, or with no `func` a decorator that makes one.

    Raises:
        TypeError: `func` is not a sync callable (asgiref's own message, with a
            note naming the problem); `thread_sensitive` is true; `executor` is
            not a `DBExecutor`; `context` is not a `contextvars.Context`, or is
            given with asgiref < 3.11. When awaited, also if the function
            returned a coroutine (it called an async function without awaiting
            it; the coroutine is closed).
    """
    if thread_sensitive:
        # asgiref's rule for sync_to_async(): "executor must not be set when
        # thread_sensitive is True". db_sync_to_async always has an executor.
        raise TypeError(
            "db_sync_to_async() runs on the bridge's executor, and an executor must "
            "not be set when thread_sensitive is True; leave thread_sensitive=False, "
            "or use asgiref's sync_to_async(fn) for thread-sensitive code"
        )
    if executor is not None and not isinstance(executor, DBExecutor):
        raise TypeError(
            f"db_sync_to_async(executor=...) takes a DBExecutor, not "
            f"{type(executor).__name__}: only its threads clean up their connections"
        )
    if context is not None:
        if not isinstance(context, contextvars.Context):
            raise TypeError(
                f"db_sync_to_async(context=...) takes a contextvars.Context, not "
                f"{type(context).__name__}"
            )
        if not _SYNC_TO_ASYNC_TAKES_CONTEXT:
            raise TypeError(
                "db_sync_to_async(context=...) needs asgiref >= 3.11, whose "
                f"sync_to_async() takes context=; asgiref {asgiref.__version__} is installed"
            )

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        _check_sync_callable_like_asgiref(fn)
        return _BridgedSyncToAsync(fn, executor, context)

    if func is None:
        return decorate
    return decorate(func)
