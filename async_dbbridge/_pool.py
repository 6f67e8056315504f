"""A bounded pool of raw DB-API connections: slots, waiters, lifetimes, health.

Nothing here knows Django (psycopg_pool's `pool.py` is the model): a
connection is opened by a `connect()` callable the caller passes, checked by
its `ping()`/`probe()` callables, and closed by its own `close()`. The module
that lends these connections to Django's wrappers, and takes them back, is
`_lending`; it also keeps the registry of one pool per alias per process.

The invariants every method keeps, whatever raises where:

* a slot is either an idle connection or *in use* (checked out, being opened,
  or handed to a waiter): `in_use + idle <= max_size`, always;
* a connection is checked out to one holder at a time: giving back one that
  is not checked out (twice, or another pool's) raises
  [`PoolMisuseError`][async_dbbridge._pool.PoolMisuseError] and changes nothing;
* a slot reserved by `take()` ends as a connection handed out or is freed,
  even when opening or checking the connection raises.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

from . import _observers
from ._validation import is_number, is_positive_int

__all__ = (
    "HEALTH_CHECK_IDLE",
    "LIFETIME_JITTER",
    "ConnectionPool",
    "PoolMisuseError",
    "PoolStats",
    "PooledConnection",
)

logger = logging.getLogger("async_dbbridge")

#: A connection taken after sitting idle at least this long (seconds) is
#: pinged (a round trip) when the caller passes `ping`. One given back a moment
#: ago gets the `probe` instead (no round trip: is its socket readable, i.e.
#: did the server say goodbye?), so health checks cost no round trip per short
#: call, yet a connection killed while idle is never handed out.
HEALTH_CHECK_IDLE: Final = 1.0

#: Lifetimes are shortened by up to this fraction, at random (psycopg_pool does
#: the same): connections opened in one burst then do not all expire, and all
#: reconnect, in the same second.
LIFETIME_JITTER: Final = 0.05


class PoolMisuseError(RuntimeError):
    """A connection was given back that is not checked out from this pool.

    Given back twice, or to the wrong pool: accepting it would let two threads
    share one socket. Nothing is changed when this is raised.
    """


class TimeoutErrorFactory(Protocol):
    def __call__(
        self, alias: str, max_size: int, timeout: float, *, max_waiting: int | None = None
    ) -> BaseException: ...


class PoolTimeoutError(TimeoutError):
    """The pool's own timeout error, for a pool built without `timeout_error`."""

    def __init__(
        self, alias: str, max_size: int, timeout: float, *, max_waiting: int | None = None
    ) -> None:
        self.alias, self.max_size, self.timeout, self.max_waiting = (
            alias,
            max_size,
            timeout,
            max_waiting,
        )
        what = (
            f"{max_waiting} threads were already waiting"
            if max_waiting is not None
            else f"none became free within {timeout:g}s"
        )
        super().__init__(f"no connection to {alias!r}: {what} ({max_size} in use)")


class PoolClosedError(RuntimeError):
    """The pool was closed; a new one is built on next use by whoever owns pools."""


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
        timeouts: Checkouts that failed with [`PoolTimeout`][async_dbbridge.PoolTimeout]
            after waiting `POOL_TIMEOUT`.
        rejected: Checkouts that failed with `PoolTimeout` at once, because
            `MAX_WAITING` threads were already waiting.
        wait_time_total: Seconds spent waiting by all checkouts that had to wait.
        wait_time_max: The longest single wait, in seconds.
        health_checks: Round-trip checks (pings) of idle connections at checkout.
        replaced: Idle connections found dead at checkout and replaced.
        max_waiting: Threads allowed to wait at once (`None`: no limit).
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
    rejected: int = 0
    health_checks: int = 0
    replaced: int = 0
    max_waiting: int | None = None

    def as_dict(self) -> dict[str, int | float | None]:
        """The fields as a plain `dict`, e.g. for a metrics exporter."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """One open pooled connection, as the status report shows it.

    Attributes:
        state: `"used"` (checked out) or `"idle"`.
        owner_thread: The name of the thread holding it (`None` when idle).
        age: Seconds since it was opened.
        idle_for: Seconds since it was given back (`None` when used).
        suspect: A sibling died of a disconnect while it sat idle: it is
            pinged before its next use.
    """

    state: str
    owner_thread: str | None
    age: float
    idle_for: float | None
    suspect: bool


class PooledConnection:
    """A raw connection and what the pool knows about it."""

    __slots__ = (
        "__weakref__",
        "checked_out",
        "checked_out_at",
        "deadline",
        "idle_since",
        "initialized",
        "opened_at",
        "owner",
        "pool",
        "raw",
        "side_effects",
        "suspect",
    )

    def __init__(self, pool: ConnectionPool, raw: Any, max_age: float | None) -> None:
        self.pool = pool
        self.raw = raw
        self.opened_at = time.monotonic()
        # CONN_MAX_AGE is a pooled connection's lifetime, counted from when it
        # was really opened, not from each checkout; jittered (LIFETIME_JITTER).
        self.deadline = (
            None
            if max_age is None
            else self.opened_at + max_age * (1.0 - random.uniform(0.0, LIFETIME_JITTER))
        )
        self.idle_since = self.opened_at
        # Whether a holder has it now. Flipped only under the pool's lock: the
        # one fact that makes a double give-back detectable.
        self.checked_out = True
        # perf_counter() at checkout, set only while an observer is registered
        # (0.0: unknown), for the use-time histogram.
        self.checked_out_at = 0.0
        # threading.get_ident() of the thread that checked it out last (for
        # the status report: who holds what); stale while idle.
        self.owner = threading.get_ident()
        # A sibling died of a disconnect while this one sat idle: check it
        # with a round trip before handing it out.
        self.suspect = False
        # For the lender: whether init_connection_state() ran on it, and what
        # the lender recorded when it was opened.
        self.initialized = False
        self.side_effects: dict[str, Any] | None = None

    def __repr__(self) -> str:
        state = "checked out" if self.checked_out else "idle"
        return f"<PooledConnection {self.pool.alias!r} {state}>"


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
    """Really close a raw connection that no holder has; never raises."""
    try:
        raw.close()
    except Exception:
        # Closing a dead connection can fail; it is gone either way.
        logger.debug("closing a pooled connection failed", exc_info=True)


def _checked(check: Callable[[Any], bool], raw: Any, *, default: bool) -> bool:
    """Run a health-check callable; one that raises counts as `default`."""
    try:
        return bool(check(raw))
    except Exception:
        logger.debug("a health check of a pooled connection raised", exc_info=True)
        return default


class ConnectionPool:
    """A bounded pool of raw connections to one database alias.

    Idle connections sit in a LIFO stack, so a light load keeps reusing one hot
    connection while the others age out after `max_idle` (the process's reaper
    thread closes them even when no traffic comes). A thread finding no idle
    connection and no free slot waits, in arrival order, up to `timeout`; when
    `max_waiting` threads wait already it fails at once. Either failure is
    `timeout_error(...)`.

    Args:
        alias: The database alias (for messages and stats).
        max_size: Connections open at once, at most.
        timeout: Seconds a thread waits for a connection.
        max_waiting: Threads that may wait at once; `None`: no limit.
        max_idle: Seconds an idle connection is kept; `None`: for ever.
        health_check_idle: Idle seconds after which a taken connection is
            pinged when the caller passes `ping`.
        timeout_error: Builds the exception a failed checkout raises.
        closed_error: Builds the exception a checkout from a closed pool raises.
    """

    def __init__(
        self,
        alias: str,
        max_size: int,
        timeout: float,
        *,
        max_waiting: int | None = None,
        max_idle: float | None = None,
        health_check_idle: float = HEALTH_CHECK_IDLE,
        timeout_error: TimeoutErrorFactory = PoolTimeoutError,
        closed_error: Callable[[str], BaseException] = PoolClosedError,
    ) -> None:
        if not is_positive_int(max_size):
            raise ValueError(f"max_size must be a positive integer, not {max_size!r}")
        if not (is_number(timeout) and 0 < timeout < float("inf")):
            raise ValueError(f"timeout must be a finite number of seconds > 0, not {timeout!r}")
        if max_waiting is not None and not is_positive_int(max_waiting):
            raise ValueError(f"max_waiting must be a positive integer or None, not {max_waiting!r}")
        if max_idle is not None and not (is_number(max_idle) and 0 < max_idle < float("inf")):
            raise ValueError(
                f"max_idle must be a finite number of seconds > 0 or None, not {max_idle!r}"
            )
        self.alias = alias
        self.max_size = max_size
        self.timeout = float(timeout)
        self.max_waiting = max_waiting
        self.max_idle = max_idle
        self.health_check_idle = health_check_idle
        self._timeout_error = timeout_error
        self._closed_error = closed_error
        self._lock = threading.Lock()
        # Signalled when the last slot is freed while closing (close() waits on it).
        self._drained = threading.Condition(self._lock)
        self._idle: list[PooledConnection] = []  # a stack: the top is the hottest
        # No idle connection expires or idles out before this (monotonic): a
        # lower bound kept on every give-back, so the checkout's prune scans
        # the idle stack only when something may be due.
        self._prune_due = float("inf")
        self._waiters: deque[_Waiter] = deque()
        self._in_use = 0
        self._closing = False
        # drain(): connections given back are closed instead of kept (checkouts go on).
        self._draining = False
        self._opened = 0
        self._closed = 0
        self._checkouts = 0
        self._timeouts = 0
        self._rejected = 0
        self._health_checks = 0
        self._replaced = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        # Every open connection, for the status report (checked-out ones are
        # otherwise only counted): added when opened, dropped when closed.
        self._entries: weakref.WeakSet[PooledConnection] = weakref.WeakSet()
        # (time.time(), "Type: message") of the last failed connect or dead
        # connection found at checkout.
        self._last_error: tuple[float, str] | None = None
        if max_idle is not None:
            _reaper.watch(self)

    def __repr__(self) -> str:
        return (
            f"<ConnectionPool {self.alias!r} in_use={self._in_use} idle={len(self._idle)} "
            f"max_size={self.max_size}>"
        )

    @property
    def has_waiters(self) -> bool:
        """Whether a thread waits for a connection (a plain read, no lock)."""
        return bool(self._waiters)

    # -- checkout --------------------------------------------------------------------------

    def take(
        self,
        connect: Callable[[], Any],
        *,
        max_age: float | None,
        ping: Callable[[Any], bool] | None = None,
        probe: Callable[[Any], bool] | None = None,
    ) -> PooledConnection:
        """Check a connection out, opening one with `connect()` if there is room.

        Blocks the calling thread (never call it on an event loop) up to the
        pool's timeout. `max_age` is the lifetime of a connection opened now.
        Health checks, when `ping` is given: an idle connection that sat idle
        `health_check_idle` seconds or more, or is suspect, is pinged
        (`ping(raw)`, a round trip: True if alive); any other is probed
        (`probe(raw)`, no I/O: True if it *may* be dead, e.g. its socket is
        readable), and pinged only if the probe says so. A dead one is closed
        and replaced in the same slot; a check that raises counts as dead.

        Raises:
            Exception: `timeout_error(...)` when no connection became free in
                time or too many threads wait; `closed_error(alias)` when the
                pool is closed; whatever `connect()` raised, unchanged (the
                slot is freed).
        """
        # One global read when no metrics exporter is installed: no clock read,
        # no call (see _observers).
        observers = _observers.active
        started = time.perf_counter() if observers else 0.0
        to_close: list[PooledConnection] = []
        entry: PooledConnection | None = None
        timed_out = closed = rejected = False
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
                    if entry is not None:
                        entry.checked_out = True
                elif self.max_waiting is not None and len(self._waiters) >= self.max_waiting:
                    # A stall must not grow threads without bound: beyond
                    # max_waiting, fail at once (a 503 under the ASGI wrapper)
                    # instead of parking one more thread for `timeout`.
                    self._rejected += 1
                    rejected = True
                else:
                    entry, timed_out, closed = self._wait_locked()
        # Network I/O (closing, pinging, connecting) happens outside the lock:
        # it can take as long as the server likes, and other threads must be
        # able to give back and take meanwhile.
        for stale in to_close:
            _close_raw(stale.raw)
        if closed:
            raise self._closed_error(self.alias)
        if observers and (rejected or timed_out):
            for observer in observers:
                observer.checkout_failed(self.alias, rejected=rejected)
        if rejected:
            raise self._timeout_error(
                self.alias, self.max_size, self.timeout, max_waiting=self.max_waiting
            )
        if timed_out:
            raise self._timeout_error(self.alias, self.max_size, self.timeout)
        # From here on this thread owns a slot: it must end up with a
        # connection or give the slot back, whatever raises.
        try:
            if entry is not None and ping is not None and not self._healthy(entry, ping, probe):
                # Dead while idle (server restart, failover, killed): the
                # caller must never see it. Replace it in the same slot.
                _close_raw(entry.raw)
                with self._lock:
                    self._closed += 1
                    self._replaced += 1
                    self._entries.discard(entry)
                    self._last_error = (time.time(), "a pooled connection was found dead")
                entry = None
            if entry is None:
                connect_started = time.perf_counter() if observers else 0.0
                entry = PooledConnection(self, connect(), max_age)
                with self._lock:
                    self._opened += 1
                    self._entries.add(entry)
                if observers:
                    _observers.duration(
                        _observers.CREATED, self.alias, time.perf_counter() - connect_started
                    )
        except BaseException as exc:
            self._last_error = (time.time(), f"{type(exc).__name__}: {exc}")
            self._free_slot()
            raise
        entry.owner = threading.get_ident()
        if observers:
            entry.checked_out_at = now = time.perf_counter()
            _observers.duration(_observers.WAITED, self.alias, now - started)
        return entry

    def _observe_return(self, checked_out_at: float) -> None:
        """Report how long a connection was checked out, if it was timed at checkout."""
        _observers.duration(_observers.USED, self.alias, time.perf_counter() - checked_out_at)

    def _healthy(
        self,
        entry: PooledConnection,
        ping: Callable[[Any], bool],
        probe: Callable[[Any], bool] | None,
    ) -> bool:
        must_ping = (
            entry.suspect
            or time.monotonic() - entry.idle_since >= self.health_check_idle
            or (probe is not None and _checked(probe, entry.raw, default=True))
        )
        if not must_ping:
            return True
        with self._lock:
            self._health_checks += 1
        alive = _checked(ping, entry.raw, default=False)
        entry.suspect = False
        return alive

    def _wait_locked(self) -> tuple[PooledConnection | None, bool, bool]:
        """Wait in line (the lock is held); return (entry, timed_out, closed)."""
        waiter = _Waiter(self._lock)
        self._waiters.append(waiter)
        start = time.monotonic()
        deadline = start + self.timeout
        try:
            while not waiter.granted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Woken by the granter (notify on this waiter's own condition),
                # so exactly one thread wakes per connection given back.
                waiter.ready.wait(remaining)
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt in the main thread):
            # a grant that arrived meanwhile must not take its slot along.
            self._abandon_wait_locked(waiter)
            raise
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
        if waiter.entry is not None:
            waiter.entry.checked_out = True
        return waiter.entry, False, False

    def _abandon_wait_locked(self, waiter: _Waiter) -> None:
        if not waiter.granted:
            self._waiters.remove(waiter)
        elif not waiter.closed:
            # Handed a slot (and maybe a connection) we will never use: pass it on.
            if waiter.entry is not None:
                self._idle_or_grant_locked(waiter.entry, time.monotonic())
            else:
                self._release_slot_locked()

    def _pop_idle_locked(
        self, now: float, to_close: list[PooledConnection]
    ) -> PooledConnection | None:
        while self._idle:
            entry = self._idle.pop()
            if entry.deadline is not None and now >= entry.deadline:
                to_close.append(entry)
                self._closed += 1
                self._entries.discard(entry)
                continue
            return entry
        return None

    def _prune_locked(self, now: float, to_close: list[PooledConnection]) -> None:
        """Close idle connections from the bottom of the stack: the coldest first.

        Also drops expired ones higher up (a lifetime is per connection, not in
        stack order), so a pool with no traffic ends with nothing idle.
        """
        if now < self._prune_due:
            return  # the common case, on every checkout: nothing can be due yet
        max_idle = self.max_idle
        kept: list[PooledConnection] = []
        due = float("inf")
        for entry in self._idle:
            expired = entry.deadline is not None and now >= entry.deadline
            unused = max_idle is not None and now - entry.idle_since >= max_idle
            if expired or unused:
                to_close.append(entry)
                self._closed += 1
                self._entries.discard(entry)
            else:
                kept.append(entry)
                due = min(due, self._due(entry))
        if len(kept) != len(self._idle):
            self._idle = kept
        self._prune_due = due

    def _due(self, entry: PooledConnection) -> float:
        """When an idle `entry` expires or idles out, whichever comes first."""
        due = float("inf") if entry.deadline is None else entry.deadline
        if self.max_idle is not None:
            due = min(due, entry.idle_since + self.max_idle)
        return due

    def next_due(self) -> float | None:
        """When the next idle connection expires or idles out (monotonic), if any."""
        with self._lock:
            due = min((self._due(entry) for entry in self._idle), default=float("inf"))
        return None if due == float("inf") else due

    def reap(self) -> int:
        """Close the idle connections past their lifetime or `max_idle`; return how many."""
        to_close: list[PooledConnection] = []
        with self._lock:
            if not self._closing:
                self._prune_locked(time.monotonic(), to_close)
        for entry in to_close:
            _close_raw(entry.raw)
        return len(to_close)

    # -- return ----------------------------------------------------------------------------

    def _check_out_locked(self, entry: PooledConnection, action: str) -> float:
        """Mark `entry` given back; return when it was checked out (0.0: not timed).

        The checkout time is read and cleared here, under the lock: once the
        lock is released the entry may be handed to a waiter, which times its
        own checkout.
        """
        if entry.pool is not self:
            raise PoolMisuseError(
                f"{action}: this connection belongs to the pool of {entry.pool.alias!r}, "
                f"not to this pool of {self.alias!r}"
            )
        if not entry.checked_out:
            raise PoolMisuseError(
                f"{action}: this connection to {self.alias!r} is not checked out (given back "
                "twice?); two holders would share one socket"
            )
        entry.checked_out = False
        checked_out_at = entry.checked_out_at
        if checked_out_at:
            entry.checked_out_at = 0.0
        return checked_out_at

    def put(self, entry: PooledConnection) -> bool:
        """Give a checked-out connection back, idle and open.

        It is really closed instead when past its lifetime or when the pool is
        closing (returns False then). The caller vouches that it is idle.

        Raises:
            PoolMisuseError: `entry` is not checked out from this pool.
        """
        now = time.monotonic()
        close = False
        with self._lock:
            checked_out_at = self._check_out_locked(entry, "put()")
            if (
                self._closing
                or (entry.deadline is not None and now >= entry.deadline)
                # Draining: kept only for a thread already waiting for it.
                or (self._draining and not self._waiters)
            ):
                close = True
                self._closed += 1
                self._entries.discard(entry)
                self._release_slot_locked()
            else:
                self._idle_or_grant_locked(entry, now)
        if checked_out_at and _observers.active:
            self._observe_return(checked_out_at)
        if close:
            _close_raw(entry.raw)
        return not close

    def _idle_or_grant_locked(self, entry: PooledConnection, now: float) -> None:
        entry.idle_since = now
        if self._waiters:
            # Handed straight to the first waiter, slot and all: a thread
            # arriving meanwhile cannot overtake it.
            self._grant_locked(entry)
        else:
            self._in_use -= 1
            self._idle.append(entry)
            due = self._due(entry)
            if due < self._prune_due:
                self._prune_due = due

    def release(self, entry: PooledConnection) -> None:
        """The holder really closed `entry`'s connection: free its slot.

        Raises:
            PoolMisuseError: `entry` is not checked out from this pool.
        """
        with self._lock:
            checked_out_at = self._check_out_locked(entry, "release()")
            self._closed += 1
            self._entries.discard(entry)
            self._release_slot_locked()
        if checked_out_at and _observers.active:
            self._observe_return(checked_out_at)

    def discard(self, entry: PooledConnection) -> None:
        """Close a checked-out connection that must not be reused, and free its slot."""
        self.release(entry)
        _close_raw(entry.raw)

    def suspect_idle(self) -> None:
        """A connection just died of a disconnect: check every idle sibling before reuse.

        A server restart or failover kills them all at once; the next
        checkout of each then costs a ping instead of failing a caller.
        """
        with self._lock:
            for entry in self._idle:
                entry.suspect = True

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

    def drain(self) -> int:
        """Stop keeping connections: close the idle ones now, and each one when given back.

        Unlike `close`, checkouts go on (a drained pool opens a connection
        when it has no idle one): for a process that is stopping but still
        finishing requests, with nothing after them to close the pool. A
        connection given back while a thread waits still goes to that thread.
        Returns how many idle connections were closed.
        """
        with self._lock:
            self._draining = True
            idle, self._idle = self._idle, []
            self._closed += len(idle)
            for entry in idle:
                self._entries.discard(entry)
        for entry in idle:
            _close_raw(entry.raw)
        return len(idle)

    def close(self, timeout: float | None = None) -> bool:
        """Close idle connections now and those in use when given back.

        Waiting threads get `closed_error`. Returns whether every connection
        was closed within `timeout` seconds (`None`: wait for ever).
        """
        with self._lock:
            self._closing = True
            idle, self._idle = self._idle, []
            self._closed += len(idle)
            for entry in idle:
                self._entries.discard(entry)
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.closed = waiter.granted = True
                waiter.ready.notify()
        for entry in idle:
            _close_raw(entry.raw)
        if self.max_idle is not None:
            _reaper.poke()
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
                rejected=self._rejected,
                health_checks=self._health_checks,
                replaced=self._replaced,
                max_waiting=self.max_waiting,
            )

    def connections(self) -> list[ConnectionInfo]:
        """Every open connection of the pool: who holds it, since when, how old (a snapshot)."""
        now = time.monotonic()
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        with self._lock:
            entries = list(self._entries)
            return [
                ConnectionInfo(
                    state="used" if entry.checked_out else "idle",
                    owner_thread=(
                        names.get(entry.owner, f"ended thread {entry.owner}")
                        if entry.checked_out
                        else None
                    ),
                    age=now - entry.opened_at,
                    idle_for=None if entry.checked_out else now - entry.idle_since,
                    suspect=entry.suspect,
                )
                for entry in sorted(entries, key=lambda e: e.opened_at)
            ]

    @property
    def last_error(self) -> tuple[float, str] | None:
        """(`time.time()`, message) of the last failed connect or dead connection found."""
        return self._last_error

    def forget_after_fork(self, discard: Callable[[Any], None]) -> None:
        """In a forked child: drop every inherited connection with `discard(raw)`.

        `discard` must do no network I/O (the sockets are the parent's). The
        lock is not taken: the child has one thread, and the lock may be held
        for good by a parent thread that does not exist here.
        """
        self._closing = True
        idle, self._idle = self._idle, []
        self._waiters.clear()
        for entry in idle:
            discard(entry.raw)


class _Reaper:
    """One daemon thread per process that closes idle connections when no traffic comes.

    Pools prune on every checkout too; this is for the quiet after the last
    request, when nothing would otherwise touch the pool: `IDLE_TIMEOUT` must
    mean the server's sessions end, not that they may end on the next request.
    The thread costs nothing on the hot path (a give-back never signals it):
    with nothing idle it sleeps `max_idle`, since a connection given back
    after it fell asleep cannot be due before it wakes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    def watch(self, pool: ConnectionPool) -> None:
        with self._lock:
            self._pools.add(pool)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="async_dbbridge-pool-reaper", daemon=True
                )
                self._thread.start()
            else:
                # A new pool's max_idle may be shorter than the current sleep.
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                pools = [pool for pool in self._pools if not pool._closing]
                if not pools:
                    # Nothing to watch: end; the next pool built starts a new thread.
                    self._thread = None
                    return
            wake_at = time.monotonic() + min(p.max_idle or 60.0 for p in pools)
            for pool in pools:
                try:
                    pool.reap()
                    due = pool.next_due()
                except Exception:
                    logger.warning("closing idle connections of %r failed", pool, exc_info=True)
                    continue
                if due is not None:
                    wake_at = min(wake_at, due)
            with self._lock:
                # A little late rather than early: a connection due at `due`
                # is then past it when checked.
                delay = max(0.0, wake_at - time.monotonic()) + 0.01
                self._wake.wait(delay)

    def poke(self) -> None:
        """Wake the thread now (a pool closed: it may have nothing left to watch)."""
        with self._lock:
            self._wake.notify()

    def reset_after_fork(self) -> None:
        # The parent's thread does not exist in the child; its lock may be held.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pools = weakref.WeakSet()
        self._thread = None


_reaper = _Reaper()


def reset_after_fork() -> None:
    """In a forked child: the reaper thread is the parent's (pools are reset by their owner)."""
    _reaper.reset_after_fork()
