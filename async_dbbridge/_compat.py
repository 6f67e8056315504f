"""Every touch of a private Django / asgiref / asyncio internal, in one place.

Each entry names what it touches, the versions it was checked on, and comes
with a shape check that fails loudly, naming the change, if a version moves
the ground under it. tests/test_compat.py runs every shape check on the
running versions (CI runs it under each supported Django series).

Checked on: Django 5.2.19 and 6.1.3, asgiref 3.13.0, CPython 3.11 and 3.13.

Keep this module flat, one section per subject, so that other parts of the
library can add their entries without reshuffling.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ()

CHECKED_DJANGO: Final = ("5.2.19", "6.1.3")
CHECKED_ASGIREF: Final = ("3.13.0",)
CHECKED_PYTHON: Final = ("3.11", "3.13")


def _thread_sensitive_takes_executor() -> bool:
    from asgiref.sync import ThreadSensitiveContext

    return "executor" in inspect.signature(ThreadSensitiveContext.__init__).parameters


class IncompatibleVersionError(RuntimeError):
    """A private internal the library relies on is not shaped as expected."""


def _fail(what: str, detail: str) -> IncompatibleVersionError:
    import django

    return IncompatibleVersionError(
        f"async_dbbridge relies on {what}, which Django {django.__version__} changed: {detail}. "
        f"It was checked on Django {', '.join(CHECKED_DJANGO)}; please report this."
    )


# -- Django database wrappers: the pool's hooks ----------------------------------------------
#
# The connection pool (_pool.py) plugs into a wrapper exactly where Django's own
# psycopg pool does (django/db/backends/postgresql/base.py, Django 5.1+): the
# connection comes from `get_new_connection(conn_params)` and goes back in
# `_close()`. `get_new_connection` is documented backend API; `_close` is a
# private hook of `BaseDatabaseWrapper.close()`, which calls it only when there
# is a connection, then sets `connection = None` (outside an atomic block) —
# Django 5.2.19 and 6.1.3, every backend (SQLite overrides close() only to
# ignore it for in-memory databases).
#
# `connect()` resets the transaction bookkeeping and sets `close_at` and
# `health_check_done` BEFORE calling `get_new_connection()`, then calls
# `set_autocommit()`, `init_connection_state()` and sends `connection_created`
# (Django 5.2.19 and 6.1.3): the pool's override can therefore set `close_at`
# to a pooled connection's own deadline and have it stick.

#: Methods the pooled wrapper class overrides or calls; all exist on every
#: backend's `DatabaseWrapper` (SQLite, PostgreSQL, MySQL) in 5.2.19 and 6.1.3.
WRAPPER_HOOKS: Final = (
    "get_new_connection",
    "_close",
    "close",
    "connect",
    "chunked_cursor",
    "is_usable",
    "init_connection_state",
    "set_autocommit",
)

#: Instance attributes the pool reads and resets (set in `BaseDatabaseWrapper.__init__`
#: and `connect()`, Django 5.2.19 and 6.1.3).
WRAPPER_STATE: Final = (
    "connection",
    "autocommit",
    "in_atomic_block",
    "needs_rollback",
    "closed_in_transaction",
    "errors_occurred",
    "close_at",
    "health_check_done",
    "health_check_enabled",
    "savepoint_ids",
    "atomic_blocks",
    "run_on_commit",
)

#: Attributes a backend's `get_new_connection()` sets on the wrapper besides
#: returning the connection: PostgreSQL sets `isolation_level` (Django 5.2.19 and
#: 6.1.3). A pooled connection handed to another wrapper carries them along.
NEW_CONNECTION_SIDE_EFFECTS: Final = ("isolation_level",)


def check_wrapper_class(cls: type[BaseDatabaseWrapper]) -> None:
    """Raise `IncompatibleVersionError` unless `cls` has every hook the pool uses."""
    missing = [name for name in WRAPPER_HOOKS if not callable(getattr(cls, name, None))]
    if missing:
        raise _fail(
            f"{cls.__module__}.{cls.__qualname__}'s methods {', '.join(WRAPPER_HOOKS)}",
            f"missing {', '.join(missing)}",
        )


def check_wrapper_state(wrapper: BaseDatabaseWrapper) -> None:
    """Raise `IncompatibleVersionError` unless `wrapper` has every attribute the pool uses."""
    missing = [name for name in WRAPPER_STATE if not hasattr(wrapper, name)]
    if missing:
        raise _fail(
            "the connection state attributes of a DatabaseWrapper",
            f"missing {', '.join(missing)}",
        )


def swap_class(wrapper: BaseDatabaseWrapper, cls: type[BaseDatabaseWrapper]) -> None:
    """Make `wrapper` an instance of `cls`, a subclass of its own class.

    Python allows `__class__` assignment between classes with the same instance
    layout; a subclass adding no `__slots__` qualifies (CPython 3.11 and 3.13).
    Django's wrappers are plain classes with a `__dict__` (5.2.19 and 6.1.3).
    """
    if not issubclass(cls, type(wrapper)):
        raise TypeError(f"{cls.__qualname__} is not a subclass of {type(wrapper).__qualname__}")
    try:
        wrapper.__class__ = cls
    except TypeError as exc:  # a layout change, e.g. __slots__ added to a wrapper class
        raise _fail("swapping a DatabaseWrapper's class for a subclass", str(exc)) from exc


def new_connection_side_effects(wrapper: BaseDatabaseWrapper) -> dict[str, Any]:
    """The attributes `get_new_connection()` just set on `wrapper` (see above)."""
    state = vars(wrapper)
    return {name: state[name] for name in NEW_CONNECTION_SIDE_EFFECTS if name in state}


def ping_raw(wrapper: BaseDatabaseWrapper, raw: Any) -> bool:
    """The backend's own health check, `is_usable()`, run on a raw connection.

    `is_usable()` checks `self.connection` (every backend, Django 5.2.19 and
    6.1.3) and never raises; the wrapper's connection is pointed at `raw` for
    the call and restored after. Only called from the thread that owns the
    wrapper, while it holds no connection of its own (inside `connect()`).
    """
    saved = wrapper.connection
    wrapper.connection = raw
    try:
        return bool(wrapper.is_usable())
    finally:
        wrapper.connection = saved


# -- Django cursors --------------------------------------------------------------------------
#
# A chunked cursor (`DatabaseWrapper.chunked_cursor()`, used by `.iterator()`) is
# a `django.db.backends.utils.CursorWrapper` (or its debug subclass): a plain
# class with a `__dict__`, whose `close` is reached through `__getattr__` (and
# called by `__exit__` and by the ORM's `cursor_iter()` when the iteration ends
# or is abandoned). An instance attribute `close` therefore intercepts every
# close (Django 5.2.19 and 6.1.3).


def on_cursor_close(cursor: Any, callback: Callable[[], None]) -> None:
    """Call `callback` once when `cursor` is closed, after closing it."""
    try:
        original = cursor.close
    except AttributeError as exc:
        raise _fail("a cursor's close() method", f"{type(cursor).__qualname__} has none") from exc
    done = False

    def close() -> Any:
        nonlocal done
        try:
            return original()
        finally:
            if not done:
                done = True
                callback()

    try:
        cursor.close = close
    except AttributeError as exc:  # e.g. __slots__ added to CursorWrapper
        raise _fail(
            "setting close() on a cursor wrapper", f"{type(cursor).__qualname__}: {exc}"
        ) from exc


# -- asgiref: the request's thread ------------------------------------------------------------
#
# asgiref 3.13.0 added `ThreadSensitiveContext(executor=...)`: an outer context
# brings the executor that runs every thread-sensitive call made inside it
# (public API; the flag only tells whether the installed asgiref has it).
# Without it (asgiref < 3.13) each request gets asgiref's own per-request
# thread, and the wrapper can only clean that thread's connections at the
# request's end, for which it must know whether the thread exists: that map is
# `SyncToAsync.context_to_thread_executor`, a private class attribute (a
# `WeakKeyDictionary` from context to its single-thread executor), checked on
# asgiref 3.8.1 and 3.13.0.

#: Whether `ThreadSensitiveContext` takes an `executor` (asgiref >= 3.13).
REQUEST_THREADS_SUPPORTED: Final[bool] = _thread_sensitive_takes_executor()


def context_has_own_thread(context: Any) -> bool:
    """Did this `ThreadSensitiveContext` create a thread of its own (so there is one to clean)?

    No token: an enclosing context owns the thread, and cleans it. Not in
    asgiref's map: the request made no thread-sensitive call, so no thread
    exists, and asking for one just to close nothing would create it.
    """
    from asgiref.sync import SyncToAsync

    executors: Any = getattr(SyncToAsync, "context_to_thread_executor", None)
    if executors is None:
        raise IncompatibleVersionError(
            "async_dbbridge relies on asgiref's SyncToAsync.context_to_thread_executor "
            "(asgiref < 3.13, per-request threads), which this asgiref lacks; "
            f"it was checked on asgiref {', '.join(CHECKED_ASGIREF)}. Please report this."
        )
    return getattr(context, "token", None) is not None and context in executors


# -- asgiref: where a thread-sensitive call runs ------------------------------------------------
#
# `SyncToAsync.__call__` picks the thread of a thread-sensitive call in this order: the
# `CurrentThreadExecutor` of a sync frame waiting on this very code (`AsyncToSync.executors`,
# an asgiref `Local`, attribute `current`), else the executor of the enclosing
# `ThreadSensitiveContext` (`SyncToAsync.thread_sensitive_context`, a `ContextVar`), else
# the thread of the sync caller that started the running loop
# (`AsyncToSync.loop_thread_executors`, a dict keyed by loop), else the one process-wide
# `SyncToAsync.single_thread_executor`. All four are private class attributes, checked on
# asgiref 3.13.0. The Channels integration keeps the first three and replaces only the last.


def thread_sensitive_call_would_use_the_process_thread(loop: Any) -> bool:
    """Would asgiref run a thread-sensitive call made here on its one process-wide thread?

    True when no sync frame waits on the calling code, no `ThreadSensitiveContext` encloses
    it, and `loop` was not started by a sync caller: the last resort, which funnels every
    such call of the process through one thread.
    """
    from asgiref.sync import AsyncToSync, SyncToAsync

    executors: Any = getattr(AsyncToSync, "executors", None)
    context_var: Any = getattr(SyncToAsync, "thread_sensitive_context", None)
    loop_threads: Any = getattr(AsyncToSync, "loop_thread_executors", None)
    if executors is None or context_var is None or not isinstance(loop_threads, dict):
        raise IncompatibleVersionError(
            "async_dbbridge relies on asgiref's AsyncToSync.executors, "
            "SyncToAsync.thread_sensitive_context and AsyncToSync.loop_thread_executors "
            "(where a thread-sensitive call runs), which this asgiref lacks or changed; "
            f"it was checked on asgiref {', '.join(CHECKED_ASGIREF)}. Please report this."
        )
    if getattr(executors, "current", None) is not None:
        return False
    if context_var.get(None) is not None:
        return False
    return loop not in loop_threads


# -- Django's middleware chain ------------------------------------------------------------------
#
# `BaseHandler.load_middleware(is_async=True)` (ASGIHandler.__init__) stores the
# chain it builds in the private `_middleware_chain`, read by
# `get_response_async()` on every request. Under ASGI every layer is wrapped in
# `convert_exception_to_response(mw_instance)`, whose async `inner` is made with
# `functools.wraps(mw_instance)`, so `inner.__wrapped__` is the instance, and a
# `MiddlewareMixin` instance keeps the next layer (itself such an `inner`, or the
# wrapped `_get_response_async`) in its public `get_response`. No adaptation
# sits between two async-capable layers (`adapt_method_mode` returns the handler
# as is), nor on top of an async chain. Checked on Django 5.2.19 and 6.1.3:
# `MiddlewareMixin.__call__`/`__acall__`, `convert_exception_to_response` and
# `load_middleware` are the same code in both.


@functools.cache
def _converted_inner_code() -> Any:
    """The code object of `convert_exception_to_response`'s async wrapper.

    Computed on first use: importing Django's handler modules at import time
    would pull in settings-dependent modules before `django.setup()`.
    """
    from django.core.handlers.exception import convert_exception_to_response

    async def probe(request: Any) -> Any:
        return None

    return convert_exception_to_response(probe).__code__


def middleware_chain(handler: Any) -> Callable[[Any], Any] | None:
    """`handler`'s built middleware chain, or None before `load_middleware()` ran."""
    chain: Callable[[Any], Any] | None = getattr(handler, "_middleware_chain", None)
    return chain


def set_middleware_chain(handler: Any, chain: Callable[[Any], Any]) -> None:
    """Replace `handler`'s middleware chain (what `load_middleware()` assigns last)."""
    if not hasattr(handler, "_middleware_chain"):
        raise _fail(
            "BaseHandler._middleware_chain (set by load_middleware())",
            f"{type(handler).__qualname__} has none",
        )
    handler._middleware_chain = chain


def unwrap_converted(layer: Any) -> Any | None:
    """What Django's `convert_exception_to_response` wrapped into `layer`, else None.

    Identified by code object, not by name: any other callable (a wrapper of
    the project's own, a future Django's changed wrapper) is not unwrapped.
    """
    if getattr(layer, "__code__", None) is not _converted_inner_code():
        return None
    return getattr(layer, "__wrapped__", None)
