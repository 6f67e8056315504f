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
import logging
import select
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ()

logger = logging.getLogger("async_dbbridge")

CHECKED_DJANGO: Final = ("5.2.19", "6.1.3")
CHECKED_ASGIREF: Final = ("3.13.0",)


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


# -- driver connections: is it still there? ---------------------------------------------------
#
# Public driver API only: psycopg 3 `Connection.fileno()`, `.closed`, `.broken`
# (3.1+); psycopg 2 `connection.fileno()`, `.closed` (an int); mysqlclient
# `Connection.fileno()` (2.2). sqlite3 has no socket and no way to die while idle.


def _socket_of(raw: Any) -> int | None:
    fileno = getattr(raw, "fileno", None)
    if not callable(fileno):
        return None
    try:
        fd = fileno()
    except Exception:
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def may_be_disconnected(raw: Any) -> bool:
    """No round trip: True if an idle connection may be dead.

    An idle connection has no request in flight, so its socket has nothing to
    read unless the server spoke first: a termination notice and EOF (a
    killed backend, a server restart, PgBouncer gone) or, rarely, a
    notification. Either way the caller pings it; an unreadable socket is
    trusted. A connection the driver already knows to be closed is dead.
    After an error, the same test tells a disconnect from a bad query.
    """
    if getattr(raw, "broken", False):
        return True
    closed = getattr(raw, "closed", False)
    if closed:
        return True
    fd = _socket_of(raw)
    if fd is None:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


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


# -- asgiref: sync calls nested in an AsyncToSync -------------------------------------------------
#
# A thread-sensitive `sync_to_async` call made while the request's thread is
# itself blocked in `async_to_sync` — Django does that for the whole async part
# of a chain below a sync-only middleware (WhiteNoise's), async view included —
# runs on that thread through the `CurrentThreadExecutor` which
# `AsyncToSync.__call__` makes for each call, by the module-level name
# `asgiref.sync.CurrentThreadExecutor`, and whose `submit(fn, *args, **kwargs)`
# queues work for its `_work_thread` (asgiref 3.13.0). Such calls never reach
# the request thread's own queue, so what the thread does after each of its
# calls (give an idle pooled connection back) would wait for the outer call
# to end: a connection held across every await of the async view. The
# subclass below, put under that name, runs a hook the thread's owner asks for
# after each such call; for any other thread it is asgiref's own class.

#: sha256 (first 16 hex digits) of `AsyncToSync.__call__`'s source as checked
#: (asgiref 3.13.0): it must still read `self.awaitable` on every call (the
#: fused middleware below a sync-only layer), and make its `CurrentThreadExecutor`
#: by the module-level name (the hook below).
ASGIREF_FINGERPRINTS: Final = {"asgiref.sync.AsyncToSync.__call__": "811b9e33968648b2"}

#: sha256 (first 16 hex digits) of what the subclass relies on (asgiref 3.13.0).
NESTED_CALL_FINGERPRINTS: Final = {
    **ASGIREF_FINGERPRINTS,
    "asgiref.current_thread_executor.CurrentThreadExecutor.__init__": "9a0691132d4b4685",
    "asgiref.current_thread_executor.CurrentThreadExecutor.submit": "1afa2734dd024d4b",
}

#: For a thread, the hook to run after each nested call it runs, or None.
AfterNestedCall = Callable[[Any], "Callable[[], object] | None"]


def hook_nested_calls(after: AfterNestedCall) -> str | None:
    """Run `after(thread)()` after each sync call nested in an `AsyncToSync` on that thread.

    Returns None once installed (idempotent), or why it cannot be on this
    asgiref (the calls then run exactly as asgiref runs them).
    """
    import asgiref
    import asgiref.sync as sync_module

    current: Any = sync_module.CurrentThreadExecutor  # type: ignore[attr-defined]
    if getattr(current, "_dbbridge_after", None) is not None:
        current._dbbridge_after = after
        return None
    why_not = code_mismatch(
        "asgiref", asgiref.__version__, "asgiref 3.13.0", NESTED_CALL_FINGERPRINTS
    )
    if why_not is not None:
        return why_not

    class HookedCurrentThreadExecutor(current):  # type: ignore[misc]
        _dbbridge_after: AfterNestedCall | None = after

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            hook = type(self)._dbbridge_after
            then = None if hook is None else hook(self._work_thread)
            if then is not None:
                fn = functools.partial(_call_then, fn, then)
            return super().submit(fn, *args, **kwargs)

    HookedCurrentThreadExecutor.__qualname__ = current.__qualname__
    sync_module.CurrentThreadExecutor = HookedCurrentThreadExecutor  # type: ignore[attr-defined]
    return None


def _call_then(
    fn: Callable[..., Any], then: Callable[[], object], *args: Any, **kwargs: Any
) -> Any:
    try:
        return fn(*args, **kwargs)
    finally:
        # Before asgiref sets the call's result: by the time the awaiting
        # coroutine goes on, the hook has run (as after the thread's own calls).
        then()


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


@functools.cache
def _converted_sync_inner_code() -> Any:
    """The code object of `convert_exception_to_response`'s sync wrapper."""
    from django.core.handlers.exception import convert_exception_to_response

    def probe(request: Any) -> Any:
        return None

    return convert_exception_to_response(probe).__code__


# A chain that holds a sync-only middleware (WhiteNoise, say) is sync from its
# top down to that layer: `adapt_method_mode` puts a `SyncToAsync` on top,
# and an `AsyncToSync` between the sync layer and the async-capable layers
# inside it. asgiref 3.13.0: `SyncToAsync` keeps its callable in `func`;
# `AsyncToSync` keeps its coroutine function in `awaitable` and reads it on
# every call (`__call__`), so replacing it changes what that adapter runs.


def sync_adapter_target(node: Any) -> Any | None:
    """What a `SyncToAsync` adapter runs; None if `node` is not one."""
    from asgiref.sync import SyncToAsync

    return node.func if isinstance(node, SyncToAsync) else None


def async_adapter_target(node: Any) -> Any | None:
    """What an `AsyncToSync` adapter runs; None if `node` is not one."""
    from asgiref.sync import AsyncToSync

    return node.awaitable if isinstance(node, AsyncToSync) else None


@functools.cache
def async_adapter_mismatch() -> str | None:
    """Why an `AsyncToSync`'s target must not be replaced on this asgiref, or None."""
    import asgiref

    return code_mismatch("asgiref", asgiref.__version__, "asgiref 3.13.0", ASGIREF_FINGERPRINTS)


def set_async_adapter_target(adapter: Any, target: Callable[[Any], Any]) -> None:
    """Make the `AsyncToSync` `adapter` run `target` from its next call on."""
    if async_adapter_target(adapter) is None:
        raise _fail("AsyncToSync.awaitable", f"{type(adapter).__qualname__} is not an AsyncToSync")
    adapter.awaitable = target


def unwrap_converted_sync(layer: Any) -> Any | None:
    """What Django's sync `convert_exception_to_response` wrapper wrapped into `layer`."""
    if getattr(layer, "__code__", None) is not _converted_sync_inner_code():
        return None
    return getattr(layer, "__wrapped__", None)


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


# -- Django's request machinery: fingerprints ---------------------------------------------------
#
# The fused middleware (_middleware) and the one-hop path (_one_hop) each do in
# their own code part of what Django's request machinery does. They act only on
# a Django whose functions they *mirror* are, to the character, the ones they
# were checked against: the source text of each function below, hashed. What
# they only *call* (get_response, load_middleware, create_request, close, and
# __call__, which still runs) is not fingerprinted: a library that wraps one of
# those (Sentry's DjangoIntegration wraps get_response, load_middleware and
# __call__) keeps its wrapper on either path. Any other
# Django (a new release, a patched function — also one patched by another
# library, whose patch a rewrite would bypass) turns the optimisation off, with
# the reason logged at startup, and Django serves every request its own way.
# tests/test_compat.py fails when a release in the matrix changes one of them,
# so the project notices before its users do. Hashes of the source, not of the
# bytecode: one Django release runs on several Python versions.

#: What the fused middleware rewrites: Django's nesting of MiddlewareMixin
#: layers in async mode, and the chain it builds.
MIDDLEWARE_FUNCTIONS: Final = (
    "django.utils.deprecation.MiddlewareMixin.__call__",
    "django.utils.deprecation.MiddlewareMixin.__acall__",
    "django.core.handlers.exception.convert_exception_to_response",
    "django.core.handlers.base.BaseHandler.adapt_method_mode",
)

#: What the one-hop path rewrites: ASGIHandler.handle() and the parts of it it
#: mirrors (run_get_response, the request's path_info, the script prefix).
REQUEST_FUNCTIONS: Final = (
    "django.core.handlers.asgi.ASGIHandler.handle",
    "django.core.handlers.asgi.ASGIHandler.run_get_response",
    "django.core.handlers.asgi.ASGIRequest.__init__",
    "django.core.handlers.asgi.get_script_prefix",
)

_COMMON: Final = {
    "django.utils.deprecation.MiddlewareMixin.__call__": "337be048dd62e014",
    "django.utils.deprecation.MiddlewareMixin.__acall__": "adf8cbcaf9f11e45",
    "django.core.handlers.exception.convert_exception_to_response": "a297ae868bddaca2",
    "django.core.handlers.base.BaseHandler.adapt_method_mode": "1f6383b647ac2959",
    "django.core.handlers.asgi.ASGIHandler.run_get_response": "0234ea5fe09a5777",
    "django.core.handlers.asgi.get_script_prefix": "bd6e761a557ee4c5",
}

#: sha256 (first 16 hex digits) of each function's source, per Django series,
#: as checked: Django 5.2.20 and 6.1.3. 6.1 moved handle() into a TaskGroup,
#: and made ASGIRequest's path_info stop at a path segment (asgi_path_info
#: follows both).
FINGERPRINTS: Final[dict[tuple[int, int], dict[str, str]]] = {
    (5, 2): {
        **_COMMON,
        "django.core.handlers.asgi.ASGIHandler.handle": "98faeb5bef800331",
        "django.core.handlers.asgi.ASGIRequest.__init__": "5ff1464df4bf995e",
    },
    (6, 1): {
        **_COMMON,
        "django.core.handlers.asgi.ASGIHandler.handle": "c91f27c7fcdc3fff",
        "django.core.handlers.asgi.ASGIRequest.__init__": "bb92eb4ad9d363bf",
    },
}


def _resolve(dotted: str) -> Any:
    import importlib

    parts = dotted.split(".")
    # The longest importable module prefix, then attributes.
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def fingerprint(dotted: str) -> str | None:
    """The hash of the named function's source text; None when it cannot be read."""
    import hashlib
    import inspect

    try:
        source = inspect.getsource(_resolve(dotted))
    except (ImportError, AttributeError, OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def code_mismatch(
    library: str, version: str, checked_on: str, fingerprints: dict[str, str]
) -> str | None:
    """None when every named function is the code it was checked against; else why not.

    The sentence names each changed function by its last two dotted parts.
    """
    changed = [
        ".".join(dotted.split(".")[-2:])
        for dotted, expected in fingerprints.items()
        if fingerprint(dotted) != expected
    ]
    if not changed:
        return None
    verb = "differs" if len(changed) == 1 else "differ"
    return (
        f"{library} {version}'s {', '.join(changed)} {verb} from the code it was checked "
        f"against ({checked_on})"
    )


def _machinery_mismatch(functions: tuple[str, ...]) -> str | None:
    import django

    series = django.VERSION[:2]
    expected = FINGERPRINTS.get(series)
    version = ".".join(map(str, django.VERSION[:3]))
    if expected is None:
        checked = ", ".join(f"{major}.{minor}" for major, minor in sorted(FINGERPRINTS))
        return f"Django {version} is not a series it was checked on ({checked})"
    changed = [name for name in functions if fingerprint(name) != expected.get(name)]
    if changed:
        names = ", ".join(".".join(name.split(".")[-2:]) for name in changed)
        return (
            f"Django {version}'s {names} differ from the code it was checked against "
            "(a new release, or patched by another library)"
        )
    return None


def middleware_machinery_mismatch() -> str | None:
    """Why the fused middleware must not run on this Django, or None."""
    return _machinery_mismatch(MIDDLEWARE_FUNCTIONS)


def request_machinery_mismatch() -> str | None:
    """Why the one-hop path must not run on this Django, or None."""
    return _machinery_mismatch(REQUEST_FUNCTIONS)


# -- Sentry's DjangoIntegration: its middleware wrapper ------------------------------------------
#
# sentry-sdk patches `BaseHandler.load_middleware` so that every middleware class
# Django loads is replaced by a `SentryWrappingMiddleware` made for it by
# `sentry_sdk.integrations.django.middleware._wrap_middleware` (checked on
# sentry-sdk 3.0.1). An instance keeps the real middleware in its private
# `_inner`, built with the same `get_response`; its `__call__`, its `__acall__`
# (`_asgi_middleware_mixin_factory`) and every hook it exposes (`__getattr__`)
# call the inner's own — inside a span only when the integration's
# `middleware_spans` is on (off by default since sentry-sdk 3.0). With it off a
# wrapped layer does exactly what its inner does, so the fused middleware may
# treat the inner as the layer; with it on, or on a Sentry whose wrapper is not
# the code below, it must not (fusing would drop the spans, or worse).

#: The Sentry functions whose code the see-through relies on, and the sha256
#: (first 16 hex digits) of their source as checked: sentry-sdk 3.0.1.
SENTRY_FINGERPRINTS: Final = {
    "sentry_sdk.integrations.django.middleware._wrap_middleware": "d17db77c07b41199",
    "sentry_sdk.integrations.django.asgi._asgi_middleware_mixin_factory": "cbe60d7c26ec0257",
}
_SENTRY_CALL: Final = "_wrap_middleware.<locals>.SentryWrappingMiddleware.__call__"


def is_sentry_wrapper(layer: object) -> bool:
    """Is `layer` an instance of a class Sentry's `_wrap_middleware` made?

    By the qualified name of the class's `__call__`: Sentry gives the class the
    wrapped middleware's name, module and qualified name, not its methods.
    """
    call = vars(type(layer)).get("__call__")
    return (
        getattr(call, "__qualname__", None) == _SENTRY_CALL
        and getattr(call, "__module__", None) == "sentry_sdk.integrations.django.middleware"
    )


@functools.cache
def sentry_wrapper_mismatch() -> str | None:
    """Why Sentry's middleware wrapper must not be seen through on this sentry-sdk, or None."""
    try:
        import sentry_sdk
    except ImportError:
        return "sentry-sdk is not installed"
    return code_mismatch("sentry-sdk", sentry_sdk.VERSION, "sentry-sdk 3.0.1", SENTRY_FINGERPRINTS)


def sentry_middleware_spans_off() -> bool:
    """Sentry's own test before every wrapped middleware call: no span will be made.

    The same lookup `_check_middleware_span` makes (public API), so the answer
    follows a `sentry_sdk.init()` made after startup.
    """
    get_client, integration_class = _sentry_lookup()
    integration = get_client().get_integration(integration_class)
    return integration is None or not integration.middleware_spans


@functools.cache
def _sentry_lookup() -> tuple[Any, Any]:
    """`sentry_sdk.get_client` and `DjangoIntegration`, imported once (asked per request)."""
    import sentry_sdk
    from sentry_sdk.integrations.django import DjangoIntegration

    return sentry_sdk.get_client, DjangoIntegration


def sentry_inner(layer: object) -> Any | None:
    """The middleware a Sentry wrapper holds; None if `layer` is not one."""
    if not is_sentry_wrapper(layer):
        return None
    return vars(layer).get("_inner")


# -- Django's ASGI handler: the one-hop path's entry point ---------------------------------------
#
# `ASGIHandler.__call__` enters a ThreadSensitiveContext and awaits
# `self.handle(scope, receive, send)` (Django 5.2.19 and 6.1.3, fingerprinted
# above): an instance attribute `handle` takes its place for that instance
# only, leaving the class — and whatever wraps `__call__` — untouched.


def instance_handle(handler: object) -> Any:
    """The `handle` set on this handler instance, if any."""
    return vars(handler).get("handle")


def set_instance_handle(handler: object, handle: Any) -> None:
    """Set (or with None, remove) the instance's own `handle`."""
    if handle is None:
        vars(handler).pop("handle", None)
    else:
        vars(handler)["handle"] = handle


def asgi_script_prefix(scope: Any) -> str:
    """Django's script prefix for an ASGI scope (`FORCE_SCRIPT_NAME` or `root_path`)."""
    from django.core.handlers.asgi import get_script_prefix

    prefix: str = get_script_prefix(scope)
    return prefix


def asgi_path_info(scope: Any) -> str:
    """`ASGIRequest(scope, ...).path_info`, without building the request."""
    import django

    path: str = scope["path"]
    script_name = asgi_script_prefix(scope)
    if not script_name:
        return path
    if django.VERSION[:2] >= (6, 1):
        stripped = script_name.rstrip("/")
        if path.startswith(stripped + "/") or path == stripped:
            return path[len(stripped) :]
        return path
    return path.removeprefix(script_name)


# -- asyncio: a loop's default executor ----------------------------------------------------------
#
# asyncio has no public getter for a loop's default executor; `BaseEventLoop`
# keeps it in `_default_executor` (Python 3.4 to 3.13, checked on 3.11 and 3.13).
# uvloop's `Loop` keeps it where Python cannot see it. The library tracks the
# defaults it installs itself (`_install._installed`); this is read only for
# one set by `loop.set_default_executor()` directly, so that `db_call` uses a
# `DBExecutor` installed that way and `install_default_executor()` shuts a
# replaced default down. On uvloop both go unnoticed: use
# `install_default_executor()` there (the docs say so).


def loop_default_executor(loop: Any) -> Executor | None:
    """The executor set with `loop.set_default_executor()`, where the loop lets Python see it."""
    default = getattr(loop, "_default_executor", None)
    return default if isinstance(default, Executor) else None


def close_dead_threads_connection(wrapper: BaseDatabaseWrapper) -> bool:
    """Close the raw connection of a wrapper whose thread has ended; return whether it had one.

    Django's `close()` calls `validate_thread_sharing()`, which refuses every
    thread but the one that made the wrapper (`DatabaseError`), and that
    thread is gone. What `close()` itself does underneath (Django 5.2.19 and
    6.1.3: `_close()` closes `self.connection`, then `self.connection = None`
    marks the wrapper unconnected) is done here instead, from the closing
    thread. Safe only because the owner has ended: no code can be using the
    connection. SQLite's connections are opened with `check_same_thread=False`
    by Django, so they may be closed from here too. Never raises: a connection
    that fails to close is gone either way.
    """
    raw = wrapper.connection
    if raw is None:
        return False
    wrapper.connection = None
    try:
        raw.close()
    except Exception:
        logger.debug("closing a stranded connection of %r failed", wrapper.alias, exc_info=True)
    return True
