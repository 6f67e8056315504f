"""Django Channels on the bridge: `database_sync_to_async` and sync consumers, drop-in.

Change the imports, nothing else:

```python
# Not runnable: the two versions of a consumers.py import line.
from channels.generic.websocket import WebsocketConsumer
from async_dbbridge.integrations.channels import WebsocketConsumer
```

Channels 4.3 runs every `database_sync_to_async` call, and every handler of
its sync consumers (`SyncConsumer.dispatch` is wrapped in it), on asgiref's
one process-wide thread, with `close_old_connections()` around each call: one
handler at a time for the whole process. Here the same calls run on the
bridge's workers: handlers of different consumers run at the same time, their
connections come from the alias's bounded pool (`ASYNC_DBBRIDGE["POOL_SIZE"]`)
and go back after each call, reused under `CONN_MAX_AGE` and checked under
`CONN_HEALTH_CHECKS`; a database error closes the connection, and a
transaction left open at the end of a call is rolled back with a
[`TransactionLeftOpenWarning`][async_dbbridge.TransactionLeftOpenWarning].

This module imports Channels (the `channels` extra) and patches nothing:
only code that imports these names gets them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Coroutine
from typing import Any, Final, Generic, ParamSpec, TypeVar, overload

from asgiref.sync import SyncToAsync, markcoroutinefunction
from channels import consumer as _consumer
from channels.generic import websocket as _websocket

from .. import DBExecutor, _compat, db_sync_to_async

__all__ = (
    "JsonWebsocketConsumer",
    "SyncConsumer",
    "WebsocketConsumer",
    "database_sync_to_async",
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


class _DatabaseSyncToAsync(Generic[_P, _R]):
    """What `database_sync_to_async` returns: Channels' wrapper's surface, on the bridge.

    Like asgiref's `SyncToAsync` (which Channels' wrapper is): the wrapped
    function's metadata, `func`, `__self__` for a bound method, marked as a
    coroutine function, binds as a method.
    """

    func: Callable[_P, _R]

    def __init__(
        self,
        func: Callable[_P, _R],
        *,
        thread_sensitive: bool,
        executor: DBExecutor | None,
        context: contextvars.Context | None,
    ) -> None:
        # Built first: it checks `func` (asgiref's TypeError for anything but
        # a sync callable), `executor` and `context`.
        self._bridged = db_sync_to_async(func, executor=executor, context=context)
        functools.update_wrapper(self, func)
        self.func = func
        self.thread_sensitive = thread_sensitive
        # asgiref's own thread-sensitive call, for the cases where asgiref has
        # a thread for it other than its process-wide one (see __call__).
        self._in_place: Callable[_P, Coroutine[Any, Any, _R]] | None = None
        if thread_sensitive:
            self._in_place = (
                SyncToAsync(func, thread_sensitive=True)
                if context is None
                else SyncToAsync(func, thread_sensitive=True, context=context)
            )
        markcoroutinefunction(self)
        bound_to = getattr(func, "__self__", _UNBOUND)
        if bound_to is not _UNBOUND:
            self.__self__ = bound_to

    async def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        # As in SyncToAsync.__call__: Django's debug page leaves this frame out.
        __traceback_hide__ = True
        in_place = self._in_place
        # A thread-sensitive call goes where asgiref would send it when that
        # place is a thread someone manages: the thread of a sync frame waiting
        # on this code (a handler that called async_to_sync: its connection,
        # its transaction, and no second pool slot that could deadlock), or a
        # ThreadSensitiveContext's (an HTTP request's thread). Only asgiref's
        # last resort, the process-wide thread, is replaced by the bridge.
        if in_place is not None and not _compat.thread_sensitive_call_would_use_the_process_thread(
            asyncio.get_running_loop()
        ):
            return await in_place(*args, **kwargs)
        return await self._bridged(*args, **kwargs)

    def __get__(self, instance: object, owner: type | None = None) -> Callable[..., Any]:
        # As SyncToAsync.__get__ does, so a decorated method gets its instance.
        if instance is None:
            return self
        bound: functools.partial[Any] = functools.partial(self.__call__, instance)  # type: ignore[arg-type]  # the instance is the method's first argument
        return functools.update_wrapper(bound, self.func)

    def __repr__(self) -> str:
        return f"<database_sync_to_async {self.func!r} thread_sensitive={self.thread_sensitive}>"


_UNBOUND: Final = object()


@overload
def database_sync_to_async(
    func: Callable[_P, _R],
    thread_sensitive: bool = True,
    *,
    executor: DBExecutor | None = None,
    context: contextvars.Context | None = None,
) -> Callable[_P, Coroutine[Any, Any, _R]]: ...


@overload
def database_sync_to_async(
    func: None = None,
    thread_sensitive: bool = True,
    *,
    executor: DBExecutor | None = None,
    context: contextvars.Context | None = None,
) -> Callable[[Callable[_P, _R]], Callable[_P, Coroutine[Any, Any, _R]]]: ...


def database_sync_to_async(
    func: Callable[_P, _R] | None = None,
    thread_sensitive: bool = True,
    *,
    executor: DBExecutor | None = None,
    context: contextvars.Context | None = None,
) -> (
    Callable[_P, Coroutine[Any, Any, _R]]
    | Callable[[Callable[_P, _R]], Callable[_P, Coroutine[Any, Any, _R]]]
):
    """Channels' `database_sync_to_async`, on the bridge: the same calls, run concurrently.

    These are equivalent, except that the second runs on the bridge instead of
    Channels' one thread per process, with pooled connections:

    ```python
    # Not runnable: get_user stands for yours, in an async consumer.
    from channels.db import database_sync_to_async
    from async_dbbridge.integrations.channels import database_sync_to_async

    user = await database_sync_to_async(get_user)(user_id)
    ```

    Works as Channels' does: `database_sync_to_async(fn)`,
    `database_sync_to_async(fn, thread_sensitive=False)`, `@database_sync_to_async`
    on functions and methods; also `@database_sync_to_async(thread_sensitive=False)`.
    Each call is prepared and cleaned up as a request would be: a connection
    from the alias's pool, given back after the call (reused under
    `CONN_MAX_AGE`), closed after a database error; a transaction left open
    is rolled back with a
    [`TransactionLeftOpenWarning`][async_dbbridge.TransactionLeftOpenWarning].

    **`thread_sensitive=True`** (the default, as in Channels) keeps asgiref's
    rule for where thread-sensitive code runs, except its last resort. Called
    from code that a sync function is waiting on (a sync handler that called
    `async_to_sync(...)`, which then awaits this), the call runs on that
    function's thread, inside its call: it sees the handler's connection and
    open `atomic()` block, and needs no second connection. Inside a
    `ThreadSensitiveContext` (an HTTP request under Django or the ASGI
    wrapper) it runs on the request's thread. Anywhere else, where asgiref
    would use its one thread for the whole process, it runs on a bridge
    worker, so calls of different consumers overlap. The thread is lent per
    call, not per consumer: a `threading.local` set in one call is not seen
    in the next (under Channels, that thread was shared by every consumer of
    the process). One consumer's calls still run one at a time and in order
    when it awaits each, as Channels' consumers do with their handlers.

    **`thread_sensitive=False`** runs on a bridge worker in every case, like
    [`db_sync_to_async`][async_dbbridge.db_sync_to_async]; nested inside a
    handler, that is a second connection while the handler holds its own.

    **Transactions** end with the call: `atomic()` inside a handler works as
    usual, but one left open when the call returns (`set_autocommit(False)`
    without a commit) is rolled back with a warning. A transaction cannot
    span several handlers of one websocket, under Channels either (its
    `close_old_connections()` closes such a connection, which rolls it back
    silently).

    Args:
        func: A sync callable. Leave it out to get a decorator.
        thread_sensitive: See above.
        executor: A [`DBExecutor`][async_dbbridge.DBExecutor] to run on instead
            of the bridge, with `thread_sensitive=False` only (asgiref's rule).
            Channels' takes any executor; this one takes only executors whose
            threads clean up their connections.
        context: A `contextvars.Context` to run the function in, as asgiref's
            `context=`. Needs asgiref >= 3.11.

    Returns:
        An async callable, or with no `func` a decorator that makes one.

    Raises:
        TypeError: `func` is not a sync callable (asgiref's message);
            `executor` is given with `thread_sensitive=True`, or is not a
            `DBExecutor`; `context` is not a `contextvars.Context`.
    """
    if thread_sensitive and executor is not None:
        # asgiref's own rule and text, as Channels' wrapper (a SyncToAsync) raises it.
        raise TypeError("executor must not be set when thread_sensitive is True")

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        return _DatabaseSyncToAsync(
            fn, thread_sensitive=bool(thread_sensitive), executor=executor, context=context
        )

    if func is None:
        return decorate
    return decorate(func)


# -- consumers ------------------------------------------------------------------------


def _channels_dispatch() -> Callable[..., None]:
    """Channels' `SyncConsumer.dispatch` as written, without the wrapper it got at definition.

    Channels decorates it with its `database_sync_to_async` when the class is
    defined, so patching `channels.db` later never reaches it: the consumers
    below wrap the undecorated function again, on the bridge. Checked on
    Channels 4.3.2: the class attribute is a `DatabaseSyncToAsync` (a
    `SyncToAsync`), which keeps the function in `func`.
    """
    wrapped = _consumer.SyncConsumer.__dict__.get("dispatch")
    func = getattr(wrapped, "func", None)
    if not isinstance(wrapped, SyncToAsync) or not callable(func):
        raise ImportError(
            "async_dbbridge.integrations.channels expects Channels' SyncConsumer.dispatch "
            f"to be wrapped in database_sync_to_async (Channels 4.3), not {wrapped!r}; "
            "please report this with your Channels version"
        )
    return func  # type: ignore[no-any-return]  # SyncToAsync.func, Any for the type checker


class SyncConsumer(_consumer.SyncConsumer):
    """Channels' `SyncConsumer`, whose handlers run on the bridge.

    A subclass of `channels.consumer.SyncConsumer` (`isinstance` checks and
    everything else work as before); only `dispatch`, which runs each
    message's handler, is the same function wrapped in this module's
    [`database_sync_to_async`][async_dbbridge.integrations.channels.database_sync_to_async]
    instead of Channels'. Each handler call is one bridge call: handlers of
    different consumers run at the same time; one consumer's run one after
    another, in order, as under Channels.
    """

    dispatch = database_sync_to_async(_channels_dispatch())


class WebsocketConsumer(SyncConsumer, _websocket.WebsocketConsumer):
    """Channels' `WebsocketConsumer`, whose handlers run on the bridge.

    A subclass of both `channels.generic.websocket.WebsocketConsumer` and this
    module's [`SyncConsumer`][async_dbbridge.integrations.channels.SyncConsumer],
    whose `dispatch` comes first in the method resolution order: `connect`,
    `receive`, `disconnect` and your own handlers run on bridge workers.
    """


class JsonWebsocketConsumer(WebsocketConsumer, _websocket.JsonWebsocketConsumer):
    """Channels' `JsonWebsocketConsumer`, whose handlers run on the bridge.

    A subclass of both `channels.generic.websocket.JsonWebsocketConsumer` and
    this module's
    [`WebsocketConsumer`][async_dbbridge.integrations.channels.WebsocketConsumer]:
    `receive_json` and `send_json` are Channels', `dispatch` is this module's.
    """
