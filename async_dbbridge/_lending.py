"""Lending pooled connections to Django's wrappers, and taking them back.

The one place that decides what happens to a pooled connection when a call, a
request, a job or a thread ends; the pool itself (`_pool`) knows no Django.

Django wrappers use the pool the way Django's own psycopg pool backend does
(Django 5.1+): `get_new_connection()` takes a connection from the pool and
`_close()` gives it back. `make_pooled(wrapper)` swaps a wrapper's class for a
cached subclass of its backend class that does exactly that, so every Django
code path that opens or closes a connection — `ensure_connection()`,
`close_if_unusable_or_obsolete()`, `close()` — keeps its meaning:

* a connection is *given back* (returned to the pool, still open) only through
  [`give_back()`][async_dbbridge._lending.give_back], which checks that it is idle;
* every other `close()` really closes it and frees its slot.

The raw connections are made by the backend's original `get_new_connection()`
(OPTIONS, init commands, time zone: all Django's).

Who calls what:

* request threads (`_request_threads`): `make_pooled()` at thread start,
  `give_back_idle()` after each sync call (`HOLD="transaction"`),
  `end_request()` at the request's end;
* the bridge's pooled executor workers (`_executor`): `after_call()` after
  each call, `give_back_all()` when idle or exiting;
* threads the library does not start — task workers, consumers
  (`integrations`): [`begin_job()`][async_dbbridge._lending.begin_job],
  [`end_job()`][async_dbbridge._lending.end_job] and
  [`end_thread()`][async_dbbridge._lending.end_thread].

Forked children: `_fork` discards every inherited connection without network
I/O, then calls `_reset_after_fork()` here for the pools' idle ones.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.utils import OperationalError

from . import _compat, _exit, _fork, _observers
from . import _pool as pool_module
from ._binding import current_request_state
from ._connections import (
    Policy,
    cleanup_after_call,
    close_all_for_exit,
    discard_inherited,
    discard_transaction,
    in_transaction,
    is_database_error,
    prepare_connections,
    warn_left_open,
)
from ._pool import ConnectionPool, PooledConnection, PoolStats
from .conf import get_settings

__all__ = (
    "PoolTimeout",
    "after_call",
    "begin_job",
    "close_pools",
    "end_job",
    "end_of_request",
    "end_request",
    "end_thread",
    "get_pool",
    "give_back",
    "give_back_all",
    "give_back_idle",
    "make_pooled",
    "may_keep",
    "pool_stats",
    "pooled_class",
)

logger = logging.getLogger("async_dbbridge")


class PoolTimeout(OperationalError):
    """No pooled connection became free within `POOL_TIMEOUT`, or too many threads wait.

    A subclass of Django's `django.db.OperationalError`, so code that already
    handles database errors handles it too. Under the ASGI wrapper, a request
    that fails with it is answered `503 Service Unavailable` with `Retry-After`.

    Attributes:
        alias: The database alias.
        max_size: The pool's size (`ASYNC_DBBRIDGE["POOL_SIZE"]`).
        timeout: Seconds a thread may wait (`ASYNC_DBBRIDGE["POOL_TIMEOUT"]`).
        max_waiting: Set when the checkout failed at once because this many
            threads were already waiting (`ASYNC_DBBRIDGE["MAX_WAITING"]`);
            `None` when it waited `timeout` seconds in vain.
    """

    def __init__(
        self, alias: str, max_size: int, timeout: float, *, max_waiting: int | None = None
    ) -> None:
        self.alias = alias
        self.max_size = max_size
        self.timeout = timeout
        self.max_waiting = max_waiting
        if max_waiting is None:
            message = (
                f"no connection to database {alias!r} became free within {timeout:g}s: all "
                f"{max_size} of this process's pooled connections were in use. Raise "
                "ASYNC_DBBRIDGE['POOL_SIZE'] (within the server's connection limit) or "
                "ASYNC_DBBRIDGE['POOL_TIMEOUT'], or hold connections for less time."
            )
        else:
            message = (
                f"no connection to database {alias!r}: all {max_size} of this process's "
                f"pooled connections were in use and {max_waiting} threads were already "
                "waiting for one (ASYNC_DBBRIDGE['MAX_WAITING']); failed at once rather "
                "than wait."
            )
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            functools.partial(type(self), max_waiting=self.max_waiting),
            (self.alias, self.max_size, self.timeout),
        )


def _closed_error(alias: str) -> OperationalError:
    return OperationalError(
        f"the connection pool of database {alias!r} is closed "
        "(async_dbbridge's pools were shut down)"
    )


def _take(
    pool: ConnectionPool,
    connect: Callable[[], Any],
    *,
    max_age: float | None,
    ping: Callable[[Any], bool] | None,
    probe: Callable[[Any], bool] | None,
) -> PooledConnection:
    try:
        return pool.take(connect, max_age=max_age, ping=ping, probe=probe)
    except PoolTimeout as error:
        _mark_request_unavailable(error, pool.alias)
        raise
    except Exception as error:
        # The server refused a new connection because it is full: the same
        # condition as a checkout timeout seen from the server's side (more
        # sessions wanted than there are), and the same 503 for the client.
        if server_is_full(error):
            _mark_request_unavailable(error, pool.alias)
        raise


#: SQLSTATE 53300, too_many_connections: PostgreSQL's "sorry, too many clients
#: already" and "remaining connection slots are reserved ...".
_PG_TOO_MANY_CONNECTIONS: Final = "53300"
#: MySQL/MariaDB: ER_CON_COUNT_ERROR ("Too many connections") and
#: ER_TOO_MANY_USER_CONNECTIONS (max_user_connections); ER_USER_LIMIT_REACHED
#: (1226) only by its words, since it also covers query and update quotas.
_MYSQL_TOO_MANY_CONNECTIONS: Final = frozenset({1040, 1203})
_FULL_MESSAGES: Final = (
    "max_user_connections",
    "too many clients",
    "too many connections",
    "connection slots are reserved",
)


def server_is_full(error: BaseException) -> bool:
    """Whether a driver's connect error says the server has no session left for us.

    By the error code where the driver gives one (psycopg's `sqlstate`,
    psycopg2's `pgcode`, mysqlclient's first argument), else by the server's
    words, which connection-phase errors of libpq carry only in the message.
    """
    for cause in (error, error.__cause__):
        if cause is None:
            continue
        code = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        if code == _PG_TOO_MANY_CONNECTIONS:
            return True
        args = getattr(cause, "args", ())
        if args and isinstance(args[0], int) and args[0] in _MYSQL_TOO_MANY_CONNECTIONS:
            return True
        if any(words in str(cause).lower() for words in _FULL_MESSAGES):
            return True
    return False


def _mark_request_unavailable(error: BaseException, alias: str) -> None:
    """Tell the ASGI wrapper that the current request failed for want of a connection.

    The request's state object lives in a contextvar of `_binding` (asgiref
    copies contextvars into sync calls, so the request thread sees it); the
    wrapper turns Django's 500 into a 503.
    """
    state = current_request_state.get(None)
    if state is not None:
        state.pool_timed_out = True
        if state.pool_timeout is None:
            state.pool_timeout = error
            state.unavailable_alias = alias


# -- the registry: one pool per alias per process -------------------------------------------

_pools: dict[str, ConnectionPool] = {}
_pools_lock = threading.Lock()


def get_pool(alias: str) -> ConnectionPool:
    """The process's pool for `alias`, built from the settings on first use."""
    # A dict read is atomic: the fast path (every checkout) takes no lock.
    pool = _pools.get(alias)
    if pool is not None:
        return pool
    if alias not in connections.settings:
        raise ValueError(f"no database {alias!r} in settings.DATABASES")
    with _pools_lock:
        pool = _pools.get(alias)
        if pool is None:
            settings = get_settings()
            pool = _pools[alias] = ConnectionPool(
                alias,
                settings.effective_pool_size,
                settings.pool_timeout,
                max_waiting=settings.effective_max_waiting,
                max_idle=settings.idle_timeout,
                # Read at build time (not bound as a default argument), so a
                # test can lower it before the pool exists.
                health_check_idle=pool_module.HEALTH_CHECK_IDLE,
                timeout_error=PoolTimeout,
                closed_error=_closed_error,
            )
    return pool


def pool_stats() -> dict[str, PoolStats]:
    """Per alias, a snapshot of the pools that exist in this process."""
    return {alias: pool.stats() for alias, pool in list(_pools.items())}


def pools() -> list[ConnectionPool]:
    """The pools that exist in this process."""
    return list(_pools.values())


def close_pools(timeout: float | None = None) -> bool:
    """Close every pool: idle connections now, those in use when given back.

    The next use of an alias builds a new pool from the settings. Returns
    whether every connection was closed within `timeout` seconds.
    """
    with _pools_lock:
        closing = list(_pools.values())
        _pools.clear()
    deadline = None if timeout is None else time.monotonic() + timeout
    all_closed = True
    for pool in closing:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        all_closed = pool.close(remaining) and all_closed
    return all_closed


def drain_pools() -> int:
    """Drain every pool (`ConnectionPool.drain`); how many idle connections were closed."""
    with _pools_lock:
        live = list(_pools.values())
    return sum(pool.drain() for pool in live)


class _RawHolder:
    """Lets `discard_inherited()` (which works on a wrapper) discard a bare connection."""

    def __init__(self, raw: Any) -> None:
        self.connection = raw


def _discard_inherited_raw(raw: Any) -> None:
    # discard_inherited() points the socket at /dev/null and keeps the object
    # alive for good; it only reads `.connection` and resets bookkeeping
    # attributes, which the holder accepts.
    discard_inherited(cast("BaseDatabaseWrapper", _RawHolder(raw)))


def _reset_after_fork() -> None:
    """In a forked child: forget the parent's pools without I/O.

    Connections checked out belong to wrappers, which `_fork` discarded first;
    the idle ones are discarded here. New pools are built on next use.
    """
    global _pools, _pools_lock
    inherited = list(_pools.values())
    # Fresh objects: a parent thread may have held the old lock at fork time.
    _pools = {}
    _pools_lock = threading.Lock()
    pool_module.reset_after_fork()
    for pool in inherited:
        pool.forget_after_fork(_discard_inherited_raw)


# After the wrappers and the executors' workers (see _fork's order).
_fork.on_child(_reset_after_fork, order=_fork.ORDER_POOLS)

#: How long, at interpreter exit, the pools wait for connections still in use
#: (by work that outlived the request threads' and workers' own exit waits).
_EXIT_TIMEOUT: Final = 5.0


def _close_pools_at_exit() -> None:
    """Close the pools lifespan shutdown did not (no lifespan, or a server that skipped it).

    Closed, not dropped: each connection gets the driver's goodbye, so the
    server ends the session at once and MariaDB logs no aborted connection.
    """
    with _pools_lock:
        live = list(_pools.values())
    if not live:
        return  # lifespan shutdown closed them (or none was ever built)
    before = sum(pool.stats().closed for pool in live)
    all_closed = close_pools(_EXIT_TIMEOUT)
    closed = sum(pool.stats().closed for pool in live) - before
    if all_closed:
        logger.info(
            "async_dbbridge closed %d pooled connection(s) at process exit "
            "(no lifespan shutdown closed them)",
            closed,
        )
    else:
        in_use = sum(pool.stats().in_use for pool in live)
        logger.warning(
            "async_dbbridge closed %d pooled connection(s) at process exit; %d still in use "
            "after %gs are dropped with the process",
            closed,
            in_use,
            _EXIT_TIMEOUT,
        )


# After the request threads and the bridge's workers have given theirs back.
_exit.on_exit(_close_pools_at_exit, order=_exit.ORDER_POOLS)


# -- pooled wrappers ------------------------------------------------------------------------

_cursor_tokens = itertools.count()

#: Backends whose `init_connection_state()` costs a round trip per call (MySQL
#: sends `SET SQL_AUTO_IS_NULL = 0` and the isolation level): skipped when a
#: connection that already had it is reused — session variables persist on the
#: connection. PostgreSQL's and SQLite's cost no I/O unless something changed
#: (e.g. TIME_ZONE under override_settings), so they always run.
_INIT_ONCE_VENDORS: Final = frozenset({"mysql"})


class _PooledWrapper(BaseDatabaseWrapper):
    """Put in front of a backend's `DatabaseWrapper` by `pooled_class()`."""

    # Class defaults; make_pooled() sets the instance's own. A wrapper of a
    # pooled class that make_pooled() did not enable (Django's `copy()`,
    # `_nodb_cursor()` create `type(self)(...)` with other settings) behaves as
    # the plain backend: its connections must never enter the alias's pool.
    _dbbridge_pooled: bool = False
    _dbbridge_entry: PooledConnection | None = None
    _dbbridge_giving_back: bool = False
    # Set by _close() when the connection went back to the pool (not closed).
    _dbbridge_put: bool = False
    _dbbridge_cursors: set[int]

    def get_new_connection(self, conn_params: Any) -> Any:
        if not self._dbbridge_pooled:
            return super().get_new_connection(conn_params)
        settings_dict = self.settings_dict
        checks = bool(settings_dict["CONN_HEALTH_CHECKS"])
        # Django checks a connection once per request before its first use;
        # a pooled checkout is a connect() to Django, which skips that check.
        # The pool's own check takes its place on every checkout: a socket
        # probe (no round trip) and a ping when the connection idled long, is
        # suspect, or the probe found its socket readable.
        ping = functools.partial(_compat.ping_raw, self) if checks else None
        probe = _compat.may_be_disconnected if checks else None
        opener = functools.partial(super().get_new_connection, conn_params)
        entry = _take(
            get_pool(self.alias),
            opener,
            max_age=settings_dict["CONN_MAX_AGE"],
            ping=ping,
            probe=probe,
        )
        if entry.side_effects is None:
            entry.side_effects = _compat.new_connection_side_effects(self)
        else:
            for name, value in entry.side_effects.items():
                setattr(self, name, value)
        self._dbbridge_entry = entry
        self._dbbridge_cursors.clear()
        # connect() set close_at from "now"; the lifetime runs from the real open.
        self.close_at = entry.deadline
        return entry.raw

    def init_connection_state(self) -> None:
        entry = self._dbbridge_entry
        if (
            entry is not None
            and entry.initialized
            and entry.raw is self.connection
            and self.vendor in _INIT_ONCE_VENDORS
        ):
            return
        super().init_connection_state()
        if entry is not None and entry.raw is self.connection:
            entry.initialized = True

    def chunked_cursor(self) -> Any:
        cursor = super().chunked_cursor()  # connects if needed
        if self._dbbridge_entry is not None:
            # An open chunked cursor (a server-side cursor on PostgreSQL, lazy
            # fetching on SQLite) pins the connection until it is closed: the
            # iteration may span several sync calls (.iterator(), aiterator()).
            token = next(_cursor_tokens)
            cursors = self._dbbridge_cursors
            cursors.add(token)
            _compat.on_cursor_close(cursor, functools.partial(cursors.discard, token))
        return cursor

    def _close(self) -> None:
        entry = self._dbbridge_entry
        if entry is None or entry.raw is not self.connection:
            # Not a pooled connection (opened before make_pooled()).
            super()._close()  # type: ignore[misc]  # private hook, not in django-stubs
            return
        self._dbbridge_entry = None
        self._dbbridge_cursors.clear()
        try:
            reusable = self._dbbridge_giving_back and self._reusable()
        except Exception:
            # Deciding must never cost the slot: when in doubt, really close.
            logger.debug("checking a pooled connection before reuse raised", exc_info=True)
            reusable = False
        if reusable:
            self._dbbridge_put = entry.pool.put(entry)
            return
        if self.errors_occurred and _compat.may_be_disconnected(entry.raw):
            # Died of a disconnect (server restart, failover, killed): its idle
            # siblings most likely died with it. Check each before reuse.
            entry.pool.suspect_idle()
        # Any other close() is a real close (Django's meaning: errors, max age,
        # close_old_connections(), an explicit close()).
        try:
            super()._close()  # type: ignore[misc]  # private hook, not in django-stubs
        finally:
            entry.pool.release(entry)

    def _reusable(self) -> bool:
        if self.errors_occurred and not self.is_usable():
            # What close_if_unusable_or_obsolete() does after an error: keep
            # the connection only if it still works.
            return False
        return _raw_is_idle(self.connection)


def _raw_is_idle(raw: Any) -> bool:
    """The driver says no transaction is open (a raw BEGIN Django never saw).

    psycopg 2 and 3: `info.transaction_status` (0 is IDLE); sqlite3:
    `in_transaction`. mysqlclient has no public equivalent: trust Django's view.
    """
    info = getattr(raw, "info", None)
    status = getattr(info, "transaction_status", None)
    if status is not None:
        return int(status) == 0
    in_tx = getattr(raw, "in_transaction", None)
    return not in_tx if isinstance(in_tx, bool) else True


_classes: dict[type[BaseDatabaseWrapper], type[BaseDatabaseWrapper]] = {}
_classes_lock = threading.Lock()


def pooled_class(cls: type[BaseDatabaseWrapper]) -> type[BaseDatabaseWrapper]:
    """The pooled subclass of a backend's wrapper class (one per class, cached)."""
    if issubclass(cls, _PooledWrapper):
        return cls
    pooled = _classes.get(cls)
    if pooled is not None:
        return pooled
    with _classes_lock:
        pooled = _classes.get(cls)
        if pooled is None:
            _compat.check_wrapper_class(cls)
            namespace = {"__module__": cls.__module__}
            pooled = _classes[cls] = cast(
                "type[BaseDatabaseWrapper]",
                type(f"Pooled{cls.__name__}", (_PooledWrapper, cls), namespace),
            )
    return pooled


def make_pooled(wrapper: BaseDatabaseWrapper) -> bool:
    """Make `wrapper` take its connections from its alias's pool.

    Call it on the thread that owns the wrapper, before it connects (at thread
    start). Returns whether the wrapper is pooled: an in-memory SQLite database
    is left alone, since Django never closes its connection (closing would
    destroy the database) and it would hold a slot for good.

    Raises:
        ValueError: The wrapper already holds a connection of its own.
        ImproperlyConfigured: The alias uses Django's own psycopg pool
            (`OPTIONS["pool"]`): two pools stacked.
    """
    if isinstance(wrapper, _PooledWrapper) and wrapper._dbbridge_pooled:
        return True
    if wrapper.settings_dict.get("OPTIONS", {}).get("pool"):
        raise ImproperlyConfigured(
            f"database {wrapper.alias!r} uses Django's connection pool (OPTIONS['pool']); "
            "async_dbbridge pools its connections itself. Remove OPTIONS['pool']."
        )
    if wrapper.vendor == "sqlite" and getattr(wrapper, "is_in_memory_db", lambda: False)():
        return False
    if wrapper.connection is not None:
        raise ValueError(
            f"database {wrapper.alias!r}: make_pooled() needs a wrapper without an open "
            "connection; call it before the thread's first query"
        )
    _compat.check_wrapper_state(wrapper)
    _compat.swap_class(wrapper, pooled_class(type(wrapper)))
    pooled = cast("_PooledWrapper", wrapper)
    pooled._dbbridge_cursors = set()
    pooled._dbbridge_pooled = True
    return True


def give_back(wrapper: BaseDatabaseWrapper) -> bool:
    """Return `wrapper`'s connection to the pool if it is idle.

    Idle: in autocommit, outside any atomic block, no chunked cursor open, no
    pending rollback. Cheap (a few attribute reads): it runs after every sync
    call. Returns whether the connection went back to the pool; a connection
    that is broken (after an error) or past its lifetime is really closed
    instead, and this returns `False`.

    Raises:
        DatabaseError: Closing a connection that could not be reused failed
            (it is forgotten either way).
    """
    if _idle_entry(wrapper) is None:
        return False
    pooled = cast("_PooledWrapper", wrapper)
    pooled._dbbridge_giving_back = True
    pooled._dbbridge_put = False
    try:
        # Django's close() resets the wrapper (connection = None, on-commit
        # hooks dropped); _close() puts the raw connection back in the pool.
        wrapper.close()
    finally:
        pooled._dbbridge_giving_back = False
    # False if it was really closed instead (broken, or past its lifetime).
    return pooled._dbbridge_put


def _idle_entry(wrapper: BaseDatabaseWrapper) -> PooledConnection | None:
    """`wrapper`'s pooled connection if it is idle: in autocommit, outside any atomic
    block, no chunked cursor open, no pending rollback; else None."""
    entry: PooledConnection | None = getattr(wrapper, "_dbbridge_entry", None)
    if (
        entry is None
        or wrapper.connection is None
        or wrapper.in_atomic_block
        or wrapper.needs_rollback
        or not wrapper.autocommit
        or cast("_PooledWrapper", wrapper)._dbbridge_cursors
    ):
        return None
    return entry


def may_keep(wrapper: BaseDatabaseWrapper) -> bool:
    """Whether a thread with more work queued may keep `wrapper`'s connection for it.

    Only an idle connection (what `give_back()` would take), still within its
    lifetime and its errors-free state, of a pool nobody is waiting on: a
    bridge worker that runs call after call then skips a give-back and a
    checkout per call, and gives it back as soon as someone waits or it has
    nothing queued.
    """
    entry = _idle_entry(wrapper)
    if entry is None or wrapper.errors_occurred:
        return False
    if entry.deadline is not None and time.monotonic() >= entry.deadline:
        return False
    # A plain read of the pool's queue of waiters (no lock): a waiter that
    # arrives just after it waits at most for this worker's next call.
    return not entry.pool.has_waiters


def end_of_request(wrapper: BaseDatabaseWrapper) -> str | None:
    """At a request's (or job's) end: leave `wrapper` holding no connection.

    A transaction left open is rolled back and the connection given back clean;
    one that cannot be given back (an open chunked cursor, a failed rollback)
    is really closed. Returns the alias if a transaction was rolled back, so
    that the caller reports it once (see `end_request()`).
    Run it on the thread that owns `wrapper`.
    """
    if wrapper.connection is None:
        return None
    rolled_back = None
    if in_transaction(wrapper):
        rolled_back = wrapper.alias
        _observe_rollback(wrapper.alias)
        if not _roll_back_leftover(wrapper):
            return rolled_back
    if getattr(wrapper, "_dbbridge_entry", None) is None:
        # Not a pooled connection: not the pool's business to close it.
        return rolled_back
    try:
        give_back(wrapper)
        if wrapper.connection is not None:
            wrapper.close()
    except Exception:
        _abandon(wrapper)
        logger.debug("closing %r at the end of a request failed", wrapper.alias, exc_info=True)
    return rolled_back


def _observe_rollback(alias: str) -> None:
    for observer in _observers.active:
        observer.rolled_back(alias)


def _roll_back_leftover(wrapper: BaseDatabaseWrapper) -> bool:
    """Roll back an open transaction and reset Django's bookkeeping as connect() would.

    Works on the raw connection: Django's `rollback()` refuses inside an atomic
    block. Returns False if the connection had to be abandoned instead.
    """
    raw = wrapper.connection
    if wrapper.closed_in_transaction or raw is None:
        _abandon(wrapper)
        return False
    try:
        raw.rollback()
        wrapper.in_atomic_block = False
        wrapper.savepoint_ids = []
        wrapper.atomic_blocks = []
        wrapper.needs_rollback = False
        wrapper.run_on_commit = []
        wanted = wrapper.settings_dict["AUTOCOMMIT"]
        if wrapper.autocommit != wanted:
            wrapper.set_autocommit(wanted)
    except Exception:
        logger.debug("rolling back a leftover transaction failed", exc_info=True)
        _abandon(wrapper)
        return False
    return True


def _abandon(wrapper: BaseDatabaseWrapper) -> None:
    """Really close a wrapper's connection whatever its state, and free its slot."""
    entry: PooledConnection | None = getattr(wrapper, "_dbbridge_entry", None)
    if entry is not None and entry.raw is not wrapper.connection:
        entry = None
    if entry is not None:
        cast("_PooledWrapper", wrapper)._dbbridge_entry = None
    try:
        # Rolls back and closes the raw connection (skipping a closed one) and
        # resets Django's transaction bookkeeping.
        discard_transaction(wrapper)
    finally:
        if entry is not None:
            entry.pool.release(entry)


# -- after a call on a pooled thread ---------------------------------------------------------


def after_call(
    policy: Policy,
    *,
    error: BaseException | None,
    fn: Callable[..., object],
    conns: Iterable[BaseDatabaseWrapper],
    busy: bool = False,
) -> None:
    """After a call on a pooled thread: give its connections back, or really close them.

    A database error closes them (the pool opens a fresh one next time: a
    connection broken server-side must never go back); a transaction left
    open is rolled back and reported, then the connection goes back clean;
    `Policy.always_close()` closes; otherwise each goes back to its pool —
    unless `busy` (more calls queued for this thread) and nobody waits, when
    the thread may keep it for its next call.
    """
    conns = [conn for conn in conns if conn.connection is not None]
    if not conns:
        return
    database_error = error is not None and is_database_error(error, conns)
    close = database_error or policy.kind == "close"
    leftovers: list[str] = []
    cleanup_error: BaseException | None = None
    for conn in conns:
        try:
            if in_transaction(conn):
                # As cleanup_after_call(): after a database error with only
                # autocommit off, the work may well be committed.
                if conn.in_atomic_block or not database_error:
                    leftovers.append(conn.alias)
                if close:
                    _observe_rollback(conn.alias)
                    _abandon(conn)  # roll back, really close, free the slot
                else:
                    end_of_request(conn)  # roll back, give back clean
            elif close:
                conn.close()  # the pooled wrapper's real close frees the slot
            elif busy and error is None and may_keep(conn):
                # Calls are queued for this thread and nobody waits for a
                # connection: keep it for the next call (a give-back and a
                # checkout saved per call under load); the thread gives it
                # back once it has nothing queued or someone waits.
                continue
            else:
                # Gives back when idle; one it cannot (a chunked cursor the
                # call left open) is really closed: the next call may run on
                # any thread, so nothing can continue on it.
                end_of_request(conn)
        except Exception as exc:
            cleanup_error = cleanup_error or exc
    if leftovers:
        what_else = "and the connection closed" if close else "before the connection went back"
        warn_left_open(fn, leftovers, what_else)
    if cleanup_error is not None:
        raise cleanup_error


def give_back_idle(wrappers: Iterable[BaseDatabaseWrapper]) -> None:
    """After a sync call on a request thread (`HOLD="transaction"`): give back what is idle.

    A few attribute reads when nothing is held: it runs after every call.
    """
    for conn in wrappers:
        if conn.connection is not None:
            try:
                give_back(conn)
            except Exception:
                # The call's work is done (and committed, in autocommit);
                # failing it now would invite a retry of done work. Django
                # has forgotten the connection either way.
                logger.warning("giving %r back after a call failed", conn.alias, exc_info=True)


def end_request(wrappers: Iterable[BaseDatabaseWrapper]) -> list[str]:
    """At a request's end, on its thread: roll back what it left open, give everything back.

    Returns the aliases rolled back, for the caller to report where the
    request ran (the event loop).
    """
    leftovers: list[str] = []
    for conn in wrappers:
        try:
            if end_of_request(conn):
                leftovers.append(conn.alias)
        except Exception:
            logger.warning(
                "giving %r back at the end of a request failed", conn.alias, exc_info=True
            )
    return leftovers


def give_back_all(wrappers: Iterable[BaseDatabaseWrapper]) -> None:
    """A pooled thread is idle or exiting: nothing of the pool may stay on it."""
    for conn in wrappers:
        try:
            end_of_request(conn)
        except Exception:
            logger.warning("giving %r back failed", conn.alias, exc_info=True)


# -- jobs on threads the library does not start (task workers, consumers) -------------------

_REQUEST: Final = Policy.request()
_CLOSE: Final = Policy.always_close()


def _job_wrappers(databases: Iterable[str] | None) -> list[BaseDatabaseWrapper]:
    aliases = list(connections.settings) if databases is None else list(databases)
    return [connections[alias] for alias in aliases]


def _is_pooled(conn: BaseDatabaseWrapper) -> bool:
    return bool(getattr(conn, "_dbbridge_pooled", False))


def begin_job(databases: Iterable[str] | None = None) -> None:
    """On a worker's own thread, before a job: lend it pooled connections.

    The first call on a thread makes its wrappers pooled; a connection the
    thread opened before (outside any job, e.g. at worker start) is closed
    first, unless a caller's `atomic()` block holds it. An alias the bridge
    cannot pool (Django's own psycopg pool, `OPTIONS["pool"]`; in-memory
    SQLite) is prepared as `request_started` would. Later calls cost a few
    attribute reads per alias.

    Args:
        databases: The aliases to handle; `None`: every alias in `DATABASES`.
    """
    unpooled: list[BaseDatabaseWrapper] = []
    for conn in _job_wrappers(databases):
        if _is_pooled(conn):
            continue
        if conn.in_atomic_block:
            # The caller's transaction (a job run eagerly inside atomic()):
            # its connection is the caller's business.
            continue
        if conn.vendor == "sqlite" and getattr(conn, "is_in_memory_db", lambda: False)():
            # Django never closes an in-memory database's connection (closing
            # would destroy the database): it keeps the thread's own.
            unpooled.append(conn)
            continue
        if conn.settings_dict.get("OPTIONS", {}).get("pool"):
            # Django's own psycopg pool: request-like handling gives a
            # connection back to it (close() returns it there), never closes it.
            unpooled.append(conn)
            continue
        if conn.connection is not None:
            conn.close()
        make_pooled(conn)
    if unpooled:
        prepare_connections(conns=unpooled)


def end_job(
    error: BaseException | None,
    *,
    owner: Callable[..., object],
    interrupted: bool = False,
    databases: Iterable[str] | None = None,
) -> None:
    """On the same thread, after the job: give its connections back, or close them.

    Never raises for a cleanup problem (logged instead): the job's own outcome
    is what the framework must see. A `TransactionLeftOpenWarning` is raised
    through `warnings` (a filter may turn it into an error) when the job
    itself succeeded.

    Args:
        error: What the job raised, or `None`.
        owner: The job's function, named in warnings.
        interrupted: The job was stopped from outside (a time limit, a worker
            shutdown): the driver may be mid-protocol, so its connections are
            closed, whatever `error` is.
        databases: As for `begin_job()`.
    """
    policy = _CLOSE if interrupted else _REQUEST
    conns = [conn for conn in _job_wrappers(databases) if conn.connection is not None]
    if not conns:
        return
    pooled = [conn for conn in conns if _is_pooled(conn)]
    unpooled = [conn for conn in conns if not _is_pooled(conn)]
    try:
        if pooled:
            after_call(policy, error=error, fn=owner, conns=pooled)
        if unpooled:
            cleanup_after_call(policy, error=error, fn=owner, conns=unpooled)
    except Exception as exc:
        if isinstance(exc, Warning) and error is None:
            raise
        logger.warning("connection cleanup after a job raised", exc_info=True)


def end_thread(databases: Iterable[str] | None = None) -> None:
    """When a worker thread ends: give back and close everything it holds."""
    give_back_all(conn for conn in _job_wrappers(databases) if _is_pooled(conn))
    close_all_for_exit(databases)
