"""One bounded pool of raw DB-API connections per database alias per process.

Django wrappers use it the way Django's own psycopg pool backend does (Django
5.1+): `get_new_connection()` takes a connection from the pool and `_close()`
gives it back. `make_pooled(wrapper)` swaps a wrapper's class for a cached
subclass of its backend class that does exactly that, so every Django code
path that opens or closes a connection — `ensure_connection()`,
`close_if_unusable_or_obsolete()`, `close()` — keeps its meaning:

* a connection is *given back* (returned to the pool, still open) only through
  [`give_back()`][async_dbbridge._pool.give_back], which checks that it is idle;
* every other `close()` really closes it and frees its slot.

The raw connections are made by the backend's original `get_new_connection()`
(OPTIONS, init commands, time zone: all Django's). The pool knows nothing of
Django beyond that; it counts slots under one lock and never opens a
connection beyond `max_size`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final, cast

from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.utils import OperationalError

from . import _compat
from ._connections import (
    TransactionLeftOpenWarning,
    discard_inherited,
    discard_transaction,
    in_transaction,
)
from ._validation import is_positive_int

__all__ = (
    "ConnectionPool",
    "PoolStats",
    "PoolTimeout",
    "close_pools",
    "end_of_request",
    "get_pool",
    "give_back",
    "make_pooled",
    "may_keep",
    "pool_stats",
    "pooled_class",
    "release_all",
)

logger = logging.getLogger("async_dbbridge")

#: A connection taken after sitting idle at least this long (seconds) is
#: pinged first when the alias has `CONN_HEALTH_CHECKS` on. One that was given
#: back a moment ago is almost certainly alive, and a ping per checkout would
#: double the cost of every short sync call.
HEALTH_CHECK_IDLE: Final = 1.0


class PoolTimeout(OperationalError):
    """No pooled connection became free within `POOL_TIMEOUT`.

    A subclass of Django's `django.db.OperationalError`, so code that already
    handles database errors handles it too. Under the ASGI wrapper, a request
    that fails with it is answered `503 Service Unavailable` with `Retry-After`.

    Attributes:
        alias: The database alias.
        max_size: The pool's size (`ASYNC_DBBRIDGE["POOL_SIZE"]`).
        timeout: Seconds the thread waited (`ASYNC_DBBRIDGE["POOL_TIMEOUT"]`).
    """

    def __init__(self, alias: str, max_size: int, timeout: float) -> None:
        self.alias = alias
        self.max_size = max_size
        self.timeout = timeout
        super().__init__(
            f"no connection to database {alias!r} became free within {timeout:g}s: all "
            f"{max_size} of this process's pooled connections were in use. Raise "
            "ASYNC_DBBRIDGE['POOL_SIZE'] (within the server's connection limit) or "
            "ASYNC_DBBRIDGE['POOL_TIMEOUT'], or hold connections for less time."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.alias, self.max_size, self.timeout))


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one alias's connection pool.

    Attributes:
        max_size: Connections the pool may have open at once.
        in_use: Connections checked out (or being opened) right now.
        idle: Open connections waiting in the pool.
        waiting: Threads waiting for a connection.
        opened: Connections opened since the pool was created.
        closed: Connections really closed since the pool was created.
        checkouts: Successful checkouts.
        timeouts: Checkouts that failed with [`PoolTimeout`][async_dbbridge.PoolTimeout].
        wait_time_total: Seconds spent waiting by all checkouts that had to wait.
        wait_time_max: The longest single wait, in seconds.
    """

    max_size: int
    in_use: int
    idle: int
    waiting: int
    opened: int
    closed: int
    checkouts: int
    timeouts: int
    wait_time_total: float
    wait_time_max: float

    def as_dict(self) -> dict[str, int | float]:
        """The fields as a plain `dict`, e.g. for a metrics exporter."""
        return asdict(self)


class PooledConnection:
    """A raw connection and what the pool knows about it."""

    __slots__ = (
        "deadline",
        "idle_since",
        "initialized",
        "opened_at",
        "pool",
        "raw",
        "side_effects",
    )

    def __init__(self, pool: ConnectionPool, raw: Any, max_age: float | None) -> None:
        self.pool = pool
        self.raw = raw
        self.opened_at = time.monotonic()
        # CONN_MAX_AGE is a pooled connection's lifetime, counted from when it
        # was really opened, not from each checkout.
        self.deadline = None if max_age is None else self.opened_at + max_age
        self.idle_since = self.opened_at
        # Set by the pooled wrapper: whether init_connection_state() ran on it,
        # and what get_new_connection() set on the wrapper that opened it.
        self.initialized = False
        self.side_effects: dict[str, Any] | None = None


class _Waiter:
    """One thread waiting in line; served in arrival order (fairness)."""

    __slots__ = ("closed", "entry", "granted", "ready")

    def __init__(self, lock: threading.Lock) -> None:
        # A condition on the pool's own lock: the granter holds that lock
        # already, so handing over costs no second lock.
        self.ready = threading.Condition(lock)
        self.granted = False
        # What was handed over: a connection, or None for a free slot that the
        # waiter opens a connection into.
        self.entry: PooledConnection | None = None
        self.closed = False


def _close_raw(raw: Any) -> None:
    """Really close a raw connection that no wrapper holds; never raises."""
    try:
        raw.close()
    except Exception:
        # Closing a dead connection can fail; it is gone either way.
        logger.debug("closing a pooled connection failed", exc_info=True)


class ConnectionPool:
    """A bounded pool of raw connections to one database alias.

    Slots are counted under one lock: a slot is either an idle connection, or
    in use (checked out, being opened, or handed to a waiter). Idle connections
    sit in a LIFO stack, so a light load keeps reusing one hot connection while
    the others age out after `max_idle`; whoever next touches the pool closes
    them (no housekeeping thread). A thread finding no idle connection and no
    free slot waits, in arrival order, up to `timeout`, then gets
    [`PoolTimeout`][async_dbbridge.PoolTimeout].

    Args:
        alias: The database alias (for messages and stats).
        max_size: Connections open at once, at most.
        timeout: Seconds a thread waits for a connection.
        max_idle: Seconds an idle connection is kept; `None`: for ever.
        health_check_idle: Idle seconds after which a taken connection is
            pinged when the caller asks for health checks.
    """

    def __init__(
        self,
        alias: str,
        max_size: int,
        timeout: float,
        *,
        max_idle: float | None = None,
        health_check_idle: float = HEALTH_CHECK_IDLE,
    ) -> None:
        if not is_positive_int(max_size):
            raise ValueError(f"max_size must be a positive integer, not {max_size!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        if max_idle is not None and not max_idle > 0:
            raise ValueError(f"max_idle must be a number of seconds > 0 or None, not {max_idle!r}")
        self.alias = alias
        self.max_size = max_size
        self.timeout = float(timeout)
        self.max_idle = max_idle
        self.health_check_idle = health_check_idle
        self._lock = threading.Lock()
        # Signalled when the last slot is freed while closing (close() waits on it).
        self._drained = threading.Condition(self._lock)
        self._idle: list[PooledConnection] = []  # a stack: the top is the hottest
        self._waiters: deque[_Waiter] = deque()
        self._in_use = 0
        self._closing = False
        self._opened = 0
        self._closed = 0
        self._checkouts = 0
        self._timeouts = 0
        self._wait_total = 0.0
        self._wait_max = 0.0

    def __repr__(self) -> str:
        return (
            f"<ConnectionPool {self.alias!r} in_use={self._in_use} idle={len(self._idle)} "
            f"max_size={self.max_size}>"
        )

    # -- checkout --------------------------------------------------------------------------

    def take(
        self,
        connect: Callable[[], Any],
        *,
        max_age: float | None,
        ping: Callable[[Any], bool] | None = None,
    ) -> PooledConnection:
        """Check a connection out, opening one with `connect()` if there is room.

        Blocks the calling thread (never call it on an event loop) up to the
        pool's timeout. `max_age` is the lifetime of a connection opened now;
        `ping(raw)` (if given) checks a connection that sat idle for
        `health_check_idle` seconds or more, and a dead one is replaced.

        Raises:
            PoolTimeout: No connection became free in time.
            OperationalError: The pool was closed.
            Exception: Whatever `connect()` raised, unchanged (the slot is freed).
        """
        to_close: list[PooledConnection] = []
        entry: PooledConnection | None = None
        timed_out = closed = False
        with self._lock:
            if self._closing:
                closed = True
            else:
                now = time.monotonic()
                self._prune_locked(now, to_close)
                entry = self._pop_idle_locked(now, to_close)
                # Invariant: threads wait only when there is neither an idle
                # connection nor a free slot, so a new arrival never overtakes
                # them (give-backs are handed straight to the first in line).
                if entry is not None or self._in_use < self.max_size:
                    self._in_use += 1
                    self._checkouts += 1
                else:
                    entry, timed_out, closed = self._wait_locked()
        # Network I/O (closing, pinging, connecting) happens outside the lock:
        # it can take as long as the server likes, and other threads must be
        # able to give back and take meanwhile.
        for stale in to_close:
            _close_raw(stale.raw)
        if closed:
            raise OperationalError(
                f"the connection pool of database {self.alias!r} is closed "
                "(async_dbbridge's pools were shut down)"
            )
        if timed_out:
            error = PoolTimeout(self.alias, self.max_size, self.timeout)
            _mark_request_timed_out(error)
            raise error
        # From here on this thread owns a slot: it must end up with a
        # connection or give the slot back.
        try:
            if (
                entry is not None
                and ping is not None
                and time.monotonic() - entry.idle_since >= self.health_check_idle
                and not ping(entry.raw)
            ):
                # Dead while idle (server restart, idle timeout, killed): the
                # caller must never see it. Replace it in the same slot.
                _close_raw(entry.raw)
                with self._lock:
                    self._closed += 1
                entry = None
            if entry is None:
                entry = PooledConnection(self, connect(), max_age)
                with self._lock:
                    self._opened += 1
        except BaseException:
            self._free_slot()
            raise
        return entry

    def _wait_locked(self) -> tuple[PooledConnection | None, bool, bool]:
        """Wait in line (the lock is held); return (entry, timed_out, closed)."""
        waiter = _Waiter(self._lock)
        self._waiters.append(waiter)
        start = time.monotonic()
        deadline = start + self.timeout
        while not waiter.granted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Woken by the granter (notify on this waiter's own condition), so
            # exactly one thread wakes per connection given back.
            waiter.ready.wait(remaining)
        waited = time.monotonic() - start
        self._wait_total += waited
        self._wait_max = max(self._wait_max, waited)
        if not waiter.granted:
            # Still in line (granting removes the waiter under this same lock).
            self._waiters.remove(waiter)
            self._timeouts += 1
            return None, True, False
        if waiter.closed:
            return None, False, True
        # The granter kept the slot counted in _in_use for us.
        self._checkouts += 1
        return waiter.entry, False, False

    def _pop_idle_locked(
        self, now: float, to_close: list[PooledConnection]
    ) -> PooledConnection | None:
        while self._idle:
            entry = self._idle.pop()
            if entry.deadline is not None and now >= entry.deadline:
                to_close.append(entry)
                self._closed += 1
                continue
            return entry
        return None

    def _prune_locked(self, now: float, to_close: list[PooledConnection]) -> None:
        """Close idle connections from the bottom of the stack: the coldest first."""
        idle = self._idle
        while idle:
            bottom = idle[0]
            expired = bottom.deadline is not None and now >= bottom.deadline
            unused = self.max_idle is not None and now - bottom.idle_since >= self.max_idle
            if not (expired or unused):
                break
            to_close.append(idle.pop(0))
            self._closed += 1

    # -- return ----------------------------------------------------------------------------

    def put(self, entry: PooledConnection) -> bool:
        """Give a checked-out connection back, idle and open.

        It is really closed instead when past its lifetime or when the pool is
        closing (returns False then). The caller vouches that it is idle.
        """
        now = time.monotonic()
        close = False
        with self._lock:
            if self._closing or (entry.deadline is not None and now >= entry.deadline):
                close = True
                self._closed += 1
                self._release_slot_locked()
            elif self._waiters:
                # Handed straight to the first waiter, slot and all: a thread
                # arriving meanwhile cannot overtake it.
                entry.idle_since = now
                self._grant_locked(entry)
            else:
                entry.idle_since = now
                self._in_use -= 1
                self._idle.append(entry)
        if close:
            _close_raw(entry.raw)
        return not close

    def release(self, entry: PooledConnection) -> None:
        """The caller really closed `entry`'s connection: free its slot."""
        with self._lock:
            self._closed += 1
            self._release_slot_locked()

    def _free_slot(self) -> None:
        """A slot reserved for a connection that never came to be (connect failed)."""
        with self._lock:
            self._release_slot_locked()

    def _release_slot_locked(self) -> None:
        if self._waiters:
            # The free slot goes to the first waiter, who opens a connection.
            self._grant_locked(None)
            return
        self._in_use -= 1
        if self._closing and self._in_use == 0:
            self._drained.notify_all()

    def _grant_locked(self, entry: PooledConnection | None) -> None:
        waiter = self._waiters.popleft()
        waiter.entry = entry
        waiter.granted = True
        waiter.ready.notify()

    # -- shutdown, stats -------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> bool:
        """Close idle connections now and those in use when given back.

        Waiting threads get an `OperationalError`. Returns whether every
        connection was closed within `timeout` seconds (`None`: wait for ever).
        """
        with self._lock:
            self._closing = True
            idle, self._idle = self._idle, []
            self._closed += len(idle)
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.closed = waiter.granted = True
                waiter.ready.notify()
        for entry in idle:
            _close_raw(entry.raw)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._in_use:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._drained.wait(remaining)
        return True

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                max_size=self.max_size,
                in_use=self._in_use,
                idle=len(self._idle),
                waiting=len(self._waiters),
                opened=self._opened,
                closed=self._closed,
                checkouts=self._checkouts,
                timeouts=self._timeouts,
                wait_time_total=self._wait_total,
                wait_time_max=self._wait_max,
            )

    def _forget_after_fork(self) -> None:
        """In a forked child: drop every inherited connection without network I/O.

        The lock is not taken: the child has one thread, and the lock may be
        held for good by a parent thread that does not exist here.
        """
        self._closing = True
        idle, self._idle = self._idle, []
        self._waiters.clear()
        for entry in idle:
            _discard_inherited_raw(entry.raw)


def _mark_request_timed_out(error: PoolTimeout) -> None:
    """Tell the ASGI wrapper that the current request failed for want of a connection.

    The request's state object lives in a contextvar of `_binding` (asgiref
    copies contextvars into sync calls, so the request thread sees it); the
    wrapper turns the 500 into a 503. Looked up only if that module is loaded:
    without the ASGI wrapper there is no request to mark.
    """
    binding = sys.modules.get("async_dbbridge._binding")
    var = getattr(binding, "current_request_state", None)
    state = var.get(None) if var is not None else None
    if state is not None:
        state.pool_timed_out = True
        if state.pool_timeout is None:
            state.pool_timeout = error


class _RawHolder:
    """Lets `discard_inherited()` (which works on a wrapper) discard a bare connection."""

    def __init__(self, raw: Any) -> None:
        self.connection = raw


def _discard_inherited_raw(raw: Any) -> None:
    # discard_inherited() points the socket at /dev/null and keeps the object
    # alive for good; it only reads `.connection` and resets bookkeeping
    # attributes, which the holder accepts.
    discard_inherited(cast("BaseDatabaseWrapper", _RawHolder(raw)))


# -- the registry: one pool per alias per process -------------------------------------------

_pools: dict[str, ConnectionPool] = {}
_pools_lock = threading.Lock()


def get_pool(alias: str) -> ConnectionPool:
    """The process's pool for `alias`, built from the settings on first use."""
    # A dict read is atomic: the fast path (every checkout) takes no lock.
    pool = _pools.get(alias)
    if pool is not None:
        return pool
    from .conf import get_settings  # conf is imported lazily: it reads Django settings

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
                max_idle=settings.idle_timeout,
                # Read at build time (not bound as a default argument), so a
                # test can lower it before the pool exists.
                health_check_idle=HEALTH_CHECK_IDLE,
            )
    return pool


def pool_stats() -> dict[str, PoolStats]:
    """Per alias, a snapshot of the pools that exist in this process."""
    return {alias: pool.stats() for alias, pool in list(_pools.items())}


def close_pools(timeout: float | None = None) -> bool:
    """Close every pool: idle connections now, those in use when given back.

    The next use of an alias builds a new pool from the settings. Returns
    whether every connection was closed within `timeout` seconds.
    """
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    deadline = None if timeout is None else time.monotonic() + timeout
    all_closed = True
    for pool in pools:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        all_closed = pool.close(remaining) and all_closed
    return all_closed


def _reset_after_fork() -> None:
    """In a forked child (from `_fork`'s hook): forget the parent's pools without I/O.

    Connections checked out belong to wrappers, which `_fork` discards; the idle
    ones are discarded here. New pools are built on next use.
    """
    global _pools, _pools_lock
    pools = list(_pools.values())
    # Fresh objects: a parent thread may have held the old lock at fork time.
    _pools = {}
    _pools_lock = threading.Lock()
    for pool in pools:
        pool._forget_after_fork()


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
        ping = (
            functools.partial(_compat.ping_raw, self)
            if settings_dict["CONN_HEALTH_CHECKS"]
            else None
        )
        opener = functools.partial(super().get_new_connection, conn_params)
        entry = get_pool(self.alias).take(opener, max_age=settings_dict["CONN_MAX_AGE"], ping=ping)
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
        if self._dbbridge_giving_back and self._reusable():
            self._dbbridge_put = entry.pool.put(entry)
            return
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
    entry = getattr(wrapper, "_dbbridge_entry", None)
    if (
        entry is None
        or wrapper.connection is None
        or wrapper.in_atomic_block
        or wrapper.needs_rollback
        or not wrapper.autocommit
    ):
        return False
    pooled = cast("_PooledWrapper", wrapper)
    if pooled._dbbridge_cursors:
        return False
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


def may_keep(wrapper: BaseDatabaseWrapper) -> bool:
    """Whether a thread with more work queued may keep `wrapper`'s connection for it.

    Only an idle connection (what `give_back()` would take), still within its
    lifetime and its errors-free state, of a pool nobody is waiting on: a
    bridge worker that runs call after call then skips a give-back and a
    checkout per call, and gives it back as soon as someone waits or it has
    nothing queued.
    """
    entry = getattr(wrapper, "_dbbridge_entry", None)
    if (
        entry is None
        or wrapper.connection is None
        or wrapper.in_atomic_block
        or wrapper.needs_rollback
        or wrapper.errors_occurred
        or not wrapper.autocommit
        or cast("_PooledWrapper", wrapper)._dbbridge_cursors
    ):
        return False
    if entry.deadline is not None and time.monotonic() >= entry.deadline:
        return False
    # A plain read of the pool's queue of waiters (no lock): a waiter that
    # arrives just after it waits at most for this worker's next call.
    return not entry.pool._waiters


def end_of_request(wrapper: BaseDatabaseWrapper) -> str | None:
    """At a request's (or job's) end: leave `wrapper` holding no connection.

    A transaction left open is rolled back and the connection given back clean;
    one that cannot be given back (an open chunked cursor, a failed rollback)
    is really closed. Returns the alias if a transaction was rolled back, so
    that the caller reports it once (see [`release_all`][async_dbbridge._pool.release_all]).
    Run it on the thread that owns `wrapper`.
    """
    if wrapper.connection is None:
        return None
    rolled_back = None
    if in_transaction(wrapper):
        rolled_back = wrapper.alias
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


def release_all(wrappers: Iterable[BaseDatabaseWrapper], *, where: str) -> None:
    """[`end_of_request`][async_dbbridge._pool.end_of_request] for each wrapper; one warning.

    Emits a single `TransactionLeftOpenWarning` naming every alias whose
    transaction was rolled back; `where` names what left it open (a request
    path, a callable).
    """
    leftovers = [alias for conn in wrappers if (alias := end_of_request(conn)) is not None]
    if leftovers:
        warnings.warn(
            f"{where} ended inside a transaction on database "
            f"{', '.join(repr(a) for a in leftovers)}: its uncommitted work was rolled back. "
            "Use 'with transaction.atomic():' so the transaction ends where it began.",
            TransactionLeftOpenWarning,
            stacklevel=2,
        )
