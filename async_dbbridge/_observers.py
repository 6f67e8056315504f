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

import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable

__all__ = ("Observer", "Samples", "active", "add", "remove")


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

    def rolled_back(self, alias: str) -> None:
        """A transaction left open was rolled back when its connection was released."""

    def stranded_closed(self, alias: str) -> None:
        """A connection stranded by an ended foreign thread was closed (`CLOSE_STRANDED`)."""


#: The registered observers. Hot paths read this one global and do nothing
#: when it is empty; it is replaced, never mutated, so no reader needs a lock.
active: tuple[Observer, ...] = ()

_lock = threading.Lock()
logger = logging.getLogger("async_dbbridge")


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


#: Seconds between two drains of every `Samples` by the flusher thread.
FLUSH_INTERVAL = 1.0


class Samples:
    """Durations recorded on a hot path, handed to an exporter's instruments off it.

    Recording into an SDK histogram costs microseconds (attribute hashing,
    locks); a checkout must not pay that. `add()` is a deque append (atomic
    in CPython, no lock). The samples are drained into the instruments by
    the exporter when it collects (an observable instrument's callback, a
    scrape, a refresh) and by one daemon thread every `FLUSH_INTERVAL`
    seconds, or at once when `limit` samples are queued — never by the adding
    thread. Should that thread fall behind by ten times `limit`, the oldest
    samples are dropped (memory stays bounded). `drain()` may run on several
    threads at once: each sample is recorded once.
    """

    def __init__(self, record: Callable[[str, float], None], *, limit: int = 10_000) -> None:
        self._record = record
        self._queue: deque[tuple[str, float]] = deque(maxlen=10 * limit)
        self._limit = limit
        _all_samples.add(self)
        _wake_flusher(now=False)

    def add(self, key: str, seconds: float) -> None:
        self._queue.append((key, seconds))
        if len(self._queue) > self._limit:
            _wake_flusher(now=True)

    def drain(self) -> None:
        queue, record = self._queue, self._record
        while True:
            try:
                key, seconds = queue.popleft()
            except IndexError:
                return
            record(key, seconds)


_all_samples: weakref.WeakSet[Samples] = weakref.WeakSet()
_flusher: threading.Thread | None = None
_wake = threading.Event()


def _wake_flusher(*, now: bool) -> None:
    """Start the flusher thread if it is not running (first use, or in a forked child)."""
    global _flusher
    if _flusher is None or not _flusher.is_alive():
        with _lock:
            if _flusher is None or not _flusher.is_alive():
                _flusher = threading.Thread(
                    target=_flush_forever, name="async_dbbridge-metrics", daemon=True
                )
                _flusher.start()
    if now:
        _wake.set()


def _flush_forever() -> None:
    while True:
        # A timed wait is this thread's schedule (durations reach the
        # instruments within FLUSH_INTERVAL), not a synchronisation.
        _wake.wait(FLUSH_INTERVAL)
        _wake.clear()
        for samples in list(_all_samples):
            try:
                samples.drain()
            except Exception:
                logger.warning("recording queued durations into metrics failed", exc_info=True)
