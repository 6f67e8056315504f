"""Observers: how metrics exporters hear about events that a snapshot cannot show.

Gauges (connections in use, idle, waiting threads) are read from
[`PoolStats`][async_dbbridge.PoolStats] when a collector asks; what happens
*between* two collections — how long each checkout waited, how long each
connection was held, how long a connect took, a timeout, a call's duration,
a transaction rolled back at release, a stranded connection closed — has to be
recorded when it happens. The pool, the executor and the lender call every
registered observer then.

The cost when no exporter is installed is the point of this module: the hot
paths read one module global (`active`, an empty tuple) and skip everything,
including the clock reads; no lock, no call. Registering an observer swaps in
a new tuple (copy on write), so readers never need a lock either.

Nothing here knows Django (the pool imports it).
"""

from __future__ import annotations

import threading

__all__ = ("Observer", "active", "add", "remove")


class Observer:
    """Override the events you record; every method here does nothing.

    Called on the thread where the event happened, outside the pool's lock,
    so a slow observer slows that thread only; an observer must not raise
    (an exception propagates to the thread's caller). Durations are seconds
    measured with `time.perf_counter()`.
    """

    def connection_created(self, alias: str, seconds: float) -> None:
        """A pooled connection to `alias` was opened; `connect()` took `seconds`."""

    def checkout(self, alias: str, seconds: float) -> None:
        """A connection was checked out; obtaining it took `seconds` (waiting included)."""

    def checkout_failed(self, alias: str, *, rejected: bool) -> None:
        """A checkout timed out (`rejected`: at once, too many threads were waiting)."""

    def connection_returned(self, alias: str, seconds: float) -> None:
        """A checked-out connection was given back or closed after `seconds` in use."""

    def call_finished(self, executor: str, seconds: float, *, error: bool) -> None:
        """A call on a `DBExecutor` named `executor` ran `seconds`; `error`: it raised."""

    def rolled_back(self, alias: str) -> None:
        """A transaction left open was rolled back when its connection was released."""

    def stranded_closed(self, alias: str) -> None:
        """A connection stranded by an ended foreign thread was closed (`CLOSE_STRANDED`)."""


#: The registered observers. Hot paths read this one global and do nothing
#: when it is empty; it is replaced, never mutated, so no reader needs a lock.
active: tuple[Observer, ...] = ()

_lock = threading.Lock()


def add(observer: Observer) -> None:
    """Register `observer` (once: adding it again changes nothing)."""
    global active
    with _lock:
        if observer not in active:
            active = (*active, observer)


def remove(observer: Observer) -> None:
    """Unregister `observer`; one not registered is ignored."""
    global active
    with _lock:
        active = tuple(o for o in active if o is not observer)
