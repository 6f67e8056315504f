"""Observers: how metrics exporters hear about events that a snapshot cannot show.

Gauges (connections in use, idle, waiting threads) are read from
[`PoolStats`][async_dbbridge.PoolStats] when a collector asks; what happens
*between* two collections — how long each checkout waited, how long each
connection was held, how long a connect took, a timeout, a call's duration,
a transaction rolled back at release, a stranded connection closed — has to be
recorded when it happens. The pool and the lender call every registered
observer then for the counted events; durations are queued once, whatever the
number of observers, and handed to them in batches off the hot path
(`duration()`, `drain()`).

The cost when no exporter is installed is the point of this module: the hot
paths read one module global (`active`, an empty tuple) and skip everything,
including the clock reads; no lock, no call. Registering an observer swaps in
a new tuple (copy on write), so readers never need a lock either.

Nothing here knows Django (the pool imports it).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Final

__all__ = (
    "CREATED",
    "USED",
    "WAITED",
    "Duration",
    "Observer",
    "active",
    "add",
    "drain",
    "duration",
    "remove",
)


#: The kinds of duration, the first item of each queued duration.
CREATED: Final = 0
"""`connect()` of a new pooled connection took this long."""
WAITED: Final = 1
"""Obtaining a checked-out connection took this long (waiting included)."""
USED: Final = 2
"""A checked-out connection was given back or closed after this long in use."""

#: A queued duration: (kind, alias, seconds).
Duration = tuple[int, str, float]


class Observer:
    """Override the events you record; every method here does nothing.

    Counted events are called on the thread where the event happened, outside
    the pool's lock, so a slow observer slows that thread only; an observer
    must not raise (an exception propagates to the thread's caller).
    Durations are not: the hot path queues them once, whatever the number of
    observers (`duration()`), and `record_durations()` receives them in
    batches off the hot path. Durations are seconds measured with
    `time.perf_counter()`.
    """

    def record_durations(self, durations: Sequence[Duration]) -> None:
        """Record queued durations: `(kind, alias, seconds)`, kind `CREATED`, `WAITED` or `USED`.

        Called by `drain()`, on the flusher thread or an exporter's collection,
        never on the thread that timed them; each duration reaches every
        registered observer once.
        """

    def checkout_failed(self, alias: str, *, rejected: bool) -> None:
        """A checkout timed out (`rejected`: at once, too many threads were waiting)."""

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
    """Register `observer` (once: adding it again changes nothing).

    Durations queued before go to the observers registered before.
    """
    global active
    drain()
    with _lock:
        if observer not in active:
            active = (*active, observer)
    _wake_flusher(now=False)


def remove(observer: Observer) -> None:
    """Unregister `observer`; one not registered is ignored.

    Durations queued before it is removed are recorded into it first.
    """
    global active
    drain()
    with _lock:
        active = tuple(o for o in active if o is not observer)


#: Seconds between two drains of the queue by the flusher thread.
FLUSH_INTERVAL = 1.0
#: Queued durations that wake the flusher at once; ten times as many are kept at most.
LIMIT: Final = 10_000

# Recording into an SDK histogram costs microseconds (attribute hashing,
# locks); a checkout must not pay that, nor pay it once per exporter. The hot
# path appends one tuple to this deque (atomic in CPython, no lock), whatever
# the number of observers; `drain()` hands the queued durations to every
# observer. Should the drains fall behind by ten times `LIMIT`, the oldest
# durations are dropped (memory stays bounded).
_queue: deque[Duration] = deque(maxlen=10 * LIMIT)


def duration(kind: int, alias: str, seconds: float) -> None:
    """Queue a duration for the observers (hot path: call only when `active` is not empty)."""
    _queue.append((kind, alias, seconds))
    if len(_queue) > LIMIT:
        _wake_flusher(now=True)


def drain() -> None:
    """Hand every queued duration to every registered observer, now.

    Run by the flusher thread every `FLUSH_INTERVAL` seconds (or at once when
    `LIMIT` durations are queued), and by the exporters when they collect —
    never by the thread that timed a duration. May run on several threads at
    once: each duration is taken by one of them.
    """
    batch: list[Duration] = []
    take, keep = _queue.popleft, batch.append
    try:
        while True:
            keep(take())
    except IndexError:
        pass
    if not batch:
        return
    for observer in active:
        try:
            observer.record_durations(batch)
        except Exception:
            logger.warning("recording queued durations into metrics failed", exc_info=True)


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
        drain()
