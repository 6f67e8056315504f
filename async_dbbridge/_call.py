"""db_call and db_sync_to_async: the async entry points onto the bridge."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from types import FunctionType
from typing import Any, Final, ParamSpec, TypeVar, overload

from asgiref.sync import SyncToAsync

from ._executor import DBExecutor
from ._install import executor_for_loop

__all__ = ("db_call", "db_sync_to_async")

_P = ParamSpec("_P")
_R = TypeVar("_R")


_ASYNC_CODE_FLAGS: Final = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE


def _check_sync_callable(fn: object, what: str) -> None:
    # Fast path for the common case, a plain function: its code flags say it all
    # (the markers are how asgiref/inspect flag sync functions as coroutine ones).
    if (
        type(fn) is FunctionType
        and not fn.__code__.co_flags & _ASYNC_CODE_FLAGS
        and not hasattr(fn, "_is_coroutine_marker")
        and not hasattr(fn, "_is_coroutine")
    ):
        return
    if inspect.iscoroutine(fn) or inspect.isawaitable(fn):
        raise TypeError(
            f"{what} takes a sync function, not the coroutine {fn!r}; "
            "await the coroutine directly instead"
        )
    if not callable(fn):
        raise TypeError(f"{what} takes a callable, not {fn!r}")
    # A callable object whose __call__ is async counts too (as in asgiref).
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
        raise TypeError(
            f"{what} takes a sync function, but {fn!r} is a coroutine function; "
            "call and await it directly instead"
        )


def _running_loop(what: str) -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"{what} must be awaited in a running event loop; from sync code call the "
            "function directly, or use DBExecutor.submit()"
        ) from None


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
    [`install_default_executor`][async_dbbridge.install_default_executor] (or set
    as its default), else on the process-wide bridge built from
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
        TypeError: `fn` is a coroutine function or a coroutine.
        RuntimeError: There is no running event loop, or the executor is shut down.
        Exception: Whatever `fn` raised, unchanged.
    """
    _check_sync_callable(fn, "db_call()")
    loop = _running_loop("db_call()")
    return await executor_for_loop(loop)._submit_to_loop(loop, fn, args, kwargs)


@overload
def db_sync_to_async(
    fn: Callable[_P, _R], /, *, executor: DBExecutor | None = None
) -> Callable[_P, Coroutine[Any, Any, _R]]: ...


@overload
def db_sync_to_async(
    fn: None = None, /, *, executor: DBExecutor | None = None
) -> Callable[[Callable[_P, _R]], Callable[_P, Coroutine[Any, Any, _R]]]: ...


def db_sync_to_async(
    fn: Callable[_P, _R] | None = None, /, *, executor: DBExecutor | None = None
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

    Works as a function and as a decorator (`@db_sync_to_async` or
    `@db_sync_to_async(executor=...)`), on functions and methods. Context
    variables travel both ways, as with asgiref: values the function sets are
    visible to the caller afterwards. It is asgiref's own `SyncToAsync` with
    its public `executor=` argument; the executor is looked up when called
    (the loop's installed bridge, else the process-wide one) unless given.

    Args:
        fn: The sync function to wrap; omitted in the
            `@db_sync_to_async(executor=...)` form.
        executor: The [`DBExecutor`][async_dbbridge.DBExecutor] to run on;
            by default the one [`db_call`][async_dbbridge.db_call] would use.

    Returns:
        An async function with `fn`'s signature; without `fn`, a decorator
            that makes one.

    Raises:
        TypeError: `fn` is a coroutine function or a coroutine.
    """

    def decorate(func: Callable[_P, _R]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        _check_sync_callable(func, "db_sync_to_async()")

        if executor is not None:
            return SyncToAsync(func, thread_sensitive=False, executor=executor)

        @functools.wraps(func)
        async def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            loop = _running_loop("db_sync_to_async()")
            bridged: Callable[_P, Awaitable[_R]] = SyncToAsync(
                func, thread_sensitive=False, executor=executor_for_loop(loop)
            )
            return await bridged(*args, **kwargs)

        return call

    if fn is None:
        return decorate
    return decorate(fn)
