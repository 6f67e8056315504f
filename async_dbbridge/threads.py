"""Threads of your own that never leak a database connection.

Django keeps one connection per thread and alias, and only the thread that
opened a connection may close it. Outside requests nobody does: a thread that
ends leaves its connections to the garbage collector (with `CONN_MAX_AGE > 0`
possibly for a long time), and a long-lived thread never honours
`CONN_MAX_AGE` or `CONN_HEALTH_CHECKS` at all. Two helpers fix both:

* [`DBThread`][async_dbbridge.DBThread] — a `threading.Thread` that closes its
  connections when it ends, whatever happens;
* [`db_connection_scope`][async_dbbridge.db_connection_scope] — a decorator and
  context manager that gives any sync code the connection handling of a request.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._connections import (
    Policy,
    cleanup_after_call,
    close_all_for_exit,
    describe,
    initialized_connections,
    on_connect,
    prepare_connections,
)
from ._executor import _validate_aliases

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ("ConnectionScope", "DBThread", "db_connection_scope")

logger = logging.getLogger("async_dbbridge")

_P = ParamSpec("_P")
_R = TypeVar("_R")


# -- DBThread -----------------------------------------------------------------


def _closing_run(run: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap a `run` method so that the thread's connections close when it ends."""

    @functools.wraps(run)
    def closing_run(self: Any) -> None:
        # A subclass's run() may call super().run(): only the outermost call
        # closes, or the subclass would lose its connection halfway through.
        depth: int = getattr(self, "_dbbridge_run_depth", 0)
        self._dbbridge_run_depth = depth + 1
        try:
            run(self)
        finally:
            self._dbbridge_run_depth = depth
            if depth == 0:
                close_all_for_exit()

    return closing_run


class DBThread(threading.Thread):
    """A `threading.Thread` that closes its database connections when it ends.

    These two lines are equivalent, except that the second never strands a
    connection:

    ```python
    # Not runnable: consume and jobs stand for your thread's target and its queue.
    threading.Thread(target=consume, args=(jobs,)).start()
    DBThread(target=consume, args=(jobs,)).start()
    ```

    When the target returns or raises — whatever it raised — the thread rolls
    back any transaction left open and closes every connection it opened, on
    every alias, before it ends; the exception then reaches
    `threading.excepthook` as usual. A subclass that overrides `run()` gets
    the same (the cleanup runs once, after the outermost `run()`). The
    constructor is `threading.Thread`'s.

    **A background worker fed by a queue** — combine it with
    [`db_connection_scope`][async_dbbridge.db_connection_scope] so that each job
    is handled like a request:

    ```python
    # Not runnable: Job and handle() stand for yours; "Threads and fork" has a complete one.
    def consume(jobs: queue.Queue[Job | None]) -> None:
        while (job := jobs.get()) is not None:
            with db_connection_scope():
                handle(job)

    worker = DBThread(target=consume, args=(jobs,), name="jobs")
    worker.start()
    ...
    jobs.put(None)  # the thread ends and closes its connection
    worker.join()
    ```

    Between jobs the connection is kept as long as `CONN_MAX_AGE` allows,
    checked before reuse when `CONN_HEALTH_CHECKS` is on, and closed after a
    job that raised a database error; when the thread ends it is closed.

    **A pool of threads with long-lived connections** (each connection living
    for at most, say, five minutes) is what
    [`DBExecutor`][async_dbbridge.DBExecutor] is:

    ```python
    # Not runnable: handle() and job stand for yours.
    pool = DBExecutor(max_workers=8, policy=Policy.max_age(300))
    future = pool.submit(handle, job)
    ```

    Its workers close their connections when they retire or the pool shuts down.

    **Daemon threads:** a daemon thread still running when the interpreter
    exits is stopped where it stands, with no cleanup; the server notices
    that the process went away and ends its sessions.
    """

    # It closes its own connections when it ends: CLOSE_STRANDED leaves it be.
    _dbbridge_owned = True

    run = _closing_run(threading.Thread.run)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run")
        if run is not None and callable(run):
            cls.run = _closing_run(run)


# -- db_connection_scope -----------------------------------------------------


class _ScopeState(threading.local):
    """The calling thread's outermost active scope, if any."""

    def __init__(self) -> None:
        self.active: _Entry | None = None


_state = _ScopeState()


class _Entry:
    """What one entry into a scope remembers until its exit."""

    __slots__ = ("owner", "policy", "protected")

    def __init__(
        self, policy: Policy, protected: frozenset[str], owner: Callable[..., object]
    ) -> None:
        self.policy = policy
        self.protected = protected
        self.owner = owner


def _caller_of_with(depth: int) -> Callable[..., object]:
    """A stand-in naming the function around a ``with`` block, for warnings."""
    frame = sys._getframe(depth + 1)

    def owner() -> None:
        pass

    owner.__module__ = str(frame.f_globals.get("__name__", "?"))
    owner.__qualname__ = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
    return owner


def _on_connect(connection: BaseDatabaseWrapper, thread: threading.Thread) -> None:
    entry = _state.active
    if entry is not None and entry.policy.kind == "max_age":
        # As for DBExecutor workers: Django's own close_if_unusable_or_obsolete()
        # then enforces the scope's lifetime instead of CONN_MAX_AGE.
        connection.close_at = entry.policy.connection_deadline(time.monotonic())


on_connect(_on_connect)


class ConnectionScope:
    """Request-like connection handling around sync code.

    What [`db_connection_scope()`][async_dbbridge.db_connection_scope] returns
    when called without a function: a context manager, and a decorator
    (calling it with a function returns the function wrapped in the scope).
    One scope may be used by several threads at once, and re-entered.
    """

    def __init__(
        self, policy: Policy | str = "request", databases: Iterable[str] | None = None
    ) -> None:
        self._policy = Policy.coerce(policy)
        self._databases = _validate_aliases(databases)
        # Per thread, and a stack: one scope object may be entered by several
        # threads at once (a decorated function) and re-entered by recursion.
        self._entries = threading.local()

    @property
    def policy(self) -> Policy:
        """The [`Policy`][async_dbbridge.Policy] applied when the scope exits."""
        return self._policy

    def _stack(self) -> list[_Entry | None]:
        stack: list[_Entry | None] | None = getattr(self._entries, "stack", None)
        if stack is None:
            stack = self._entries.stack = []
        return stack

    def _enter(self, owner: Callable[..., object]) -> None:
        if _state.active is not None:
            # Nested in another scope on this thread: the outermost one owns
            # the connections, as a request does for everything it calls.
            self._stack().append(None)
            return
        # An alias already in an atomic block belongs to the caller's
        # transaction: closing it there would break that transaction.
        protected = frozenset(
            conn.alias for conn in initialized_connections(self._databases) if conn.in_atomic_block
        )
        entry = _Entry(self._policy, protected, owner)
        prepare_connections(self._databases)  # skips atomic blocks itself
        self._stack().append(entry)
        _state.active = entry

    def _exit(self, error: BaseException | None) -> None:
        entry = self._stack().pop()
        if entry is None:
            return
        _state.active = None
        aliases = [
            conn.alias
            for conn in initialized_connections(self._databases)
            if conn.alias not in entry.protected
        ]
        try:
            cleanup_after_call(entry.policy, error=error, fn=entry.owner, aliases=aliases)
        except Exception as exc:
            if error is not None:
                # Never let a cleanup problem replace the body's exception.
                logger.warning("connection cleanup after a failed scope raised", exc_info=True)
            elif isinstance(exc, Warning):
                raise
            else:
                # The body's work is done (and committed in autocommit): raising
                # now would invite a retry. The connection is already forgotten.
                logger.warning(
                    "connection cleanup after %s raised", describe(entry.owner), exc_info=True
                )

    def __enter__(self) -> None:
        self._enter(_caller_of_with(1))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(exc)

    def __call__(self, fn: Callable[_P, _R]) -> Callable[_P, _R]:
        """Use the scope as a decorator: every call of `fn` runs inside it.

        Raises:
            TypeError: `fn` is a coroutine function.
        """
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"db_connection_scope() decorates sync functions, not the coroutine "
                f"function {describe(fn)}; use db_call() from async code"
            )

        @functools.wraps(fn)
        def scoped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            self._enter(fn)
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self._exit(exc)
                raise
            self._exit(None)
            return result

        return scoped

    def __repr__(self) -> str:
        return f"<{type(self).__name__} policy={self._policy.kind}>"


@overload
def db_connection_scope(fn: Callable[_P, _R], /) -> Callable[_P, _R]: ...


@overload
def db_connection_scope(
    fn: None = None, /, *, policy: Policy | str = "request", databases: Iterable[str] | None = None
) -> ConnectionScope: ...


def db_connection_scope(
    fn: Callable[_P, _R] | None = None,
    /,
    *,
    policy: Policy | str = "request",
    databases: Iterable[str] | None = None,
) -> Callable[_P, _R] | ConnectionScope:
    """Handle the calling thread's connections around sync code like a request does.

    These two blocks are equivalent, except that the second also closes the
    connection after a database error and rescues a transaction left open:

    ```python
    # Not runnable: handle() and job stand for yours.
    close_old_connections()  # what request_started does
    try:
        handle(job)
    finally:
        close_old_connections()  # what request_finished does

    with db_connection_scope():
        handle(job)
    ```

    It works as a context manager and as a decorator (`@db_connection_scope`
    or `@db_connection_scope(policy=...)`), for code on any thread you own —
    a [`DBThread`][async_dbbridge.DBThread], a management command's loop, a
    plain thread's target. On entry, connections past their lifetime or broken
    by an earlier error are closed and health checks re-armed; on exit, the
    policy decides.

    **Transactions:** a scope entered inside a caller's `transaction.atomic()`
    block leaves that alias's connection alone, on entry and on exit: closing
    it there would break the caller's transaction. A body that returns with a
    transaction of its own still open (an atomic block entered and not left,
    autocommit turned off) has it rolled back, the connection closed and a
    [`TransactionLeftOpenWarning`][async_dbbridge.TransactionLeftOpenWarning] raised.

    **Errors:** after the body raised a database error its connections are
    closed unconditionally (Django's own check misses connections killed
    server-side). The body's exception always propagates unchanged; a failure
    of the cleanup itself is logged, never raised in its place.

    **Nesting:** only the outermost scope on a thread acts; inner ones (say, a
    decorated function called from another) do nothing.

    Args:
        fn: The function to decorate (for the bare `@db_connection_scope` form).
        policy: As for [`DBExecutor`][async_dbbridge.DBExecutor]: `"request"`
            (default) honours each alias's `CONN_MAX_AGE` and
            `CONN_HEALTH_CHECKS`; `"close"` closes on exit;
            `Policy.max_age(seconds)` gives connections opened inside the
            scope a lifetime of their own.
        databases: Aliases to handle; `None` (default) means every alias the
            thread has used.

    Returns:
        With `fn`, the decorated function; otherwise a
            [`ConnectionScope`][async_dbbridge.ConnectionScope], usable both as
            a context manager and as a decorator.

    Raises:
        TypeError: `fn` is a coroutine function, or `databases` is a string.
        ValueError: `policy` or `databases` is invalid.
    """
    scope = ConnectionScope(policy, databases)
    if fn is None:
        return scope
    return scope(fn)
