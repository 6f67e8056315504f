"""How many sync-view requests run on request threads at once: the rest wait on the loop.

The one-hop path (`_one_hop`) runs a sync request's whole sync part in one call
on a request thread. Request threads are elastic, so without a bound every
request in flight gets a thread at once: with 32 clients and `POOL_SIZE = 8`,
32 threads start their request, and 24 of them block on the pool in the middle
of it (the session's query, say) — threads parked mid-request, a pool handover
and two thread wake-ups per request, and 32 threads taking turns with the GIL.
Measured in-process on the project benchmark's session view (PostgreSQL, 32
concurrent clients), that costs about 12% more CPU per request than letting 8
requests in at a time, which is what a WSGI server does with its threads
(gunicorn `--threads`, a2wsgi's `workers`).

`SyncGate` lets `SYNC_REQUESTS` requests in (default `POOL_SIZE`) and queues
the others on the event loop, in arrival order, where waiting costs a future
and no thread. The queue behaves like the pool's own: a request waits at most
`POOL_TIMEOUT` and at most `MAX_WAITING` wait at once; beyond either it gets the
same 503 with `Retry-After` as a pool checkout that timed out, before Django
sees it (no signal, no middleware: the request was never started).

One gate per event loop: asyncio futures belong to one loop, and a server runs
one loop per process.
"""

from __future__ import annotations

import asyncio
import collections

__all__ = ("SyncGate", "SyncRequestsBusy")


class SyncRequestsBusy(Exception):
    """A sync request could not start: `SYNC_REQUESTS` were running and it waited too long.

    Carried in the request's state like a pool's `PoolTimeout`, so the ASGI
    wrapper answers with its 503 and says why in the log.

    Attributes:
        limit: `SYNC_REQUESTS`.
        timeout: How long the request waited (`POOL_TIMEOUT`), or `None` when
            it was turned away at once because `MAX_WAITING` were waiting.
        max_waiting: `MAX_WAITING`, when that is why.
    """

    def __init__(self, limit: int, *, timeout: float | None, max_waiting: int | None) -> None:
        self.limit = limit
        self.timeout = timeout
        self.max_waiting = max_waiting
        if max_waiting is not None:
            why = (
                f"all {limit} sync requests were running and {max_waiting} were already "
                "waiting (ASYNC_DBBRIDGE SYNC_REQUESTS / MAX_WAITING)"
            )
        else:
            why = (
                f"all {limit} sync requests stayed running for {timeout:g}s "
                "(ASYNC_DBBRIDGE SYNC_REQUESTS / POOL_TIMEOUT)"
            )
        super().__init__(why)


class SyncGate:
    """A first-come, first-served limit on requests running at once, for one event loop.

    Args:
        limit: Requests let in at once (>= 1).
        timeout: Seconds a request waits for its turn before `SyncRequestsBusy`.
        max_waiting: Requests that may wait at once; one more is turned away.
    """

    __slots__ = ("_free", "_waiters", "limit", "max_waiting", "timeout")

    def __init__(self, limit: int, *, timeout: float, max_waiting: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit!r}")
        self.limit = limit
        self.timeout = timeout
        self.max_waiting = max_waiting
        self._free = limit
        # Futures of the requests waiting, oldest first; a grant sets one's
        # result, and the permit passes to it without ever being free.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def running(self) -> int:
        """Requests let in and not yet out."""
        return self.limit - self._free

    @property
    def waiting(self) -> int:
        """Requests waiting for their turn."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def enter(self) -> None:
        """Wait for a turn; call `leave()` once after it returns.

        Raises:
            SyncRequestsBusy: `max_waiting` were waiting already, or the turn
                did not come within `timeout` seconds.
        """
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise SyncRequestsBusy(self.limit, timeout=None, max_waiting=self.max_waiting)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        expiry = loop.call_later(self.timeout, self._expire, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Granted just as the request was cancelled: pass the turn on.
                self.leave()
            else:
                self._forget(waiter)
            raise
        finally:
            expiry.cancel()

    def leave(self) -> None:
        """A request let in is done: the oldest waiter goes in, or the turn is free."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._forget(waiter)
            waiter.set_exception(
                SyncRequestsBusy(self.limit, timeout=self.timeout, max_waiting=None)
            )

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass  # already taken off by a grant or an expiry

    def __repr__(self) -> str:
        return f"<{type(self).__name__} running={self.running}/{self.limit} waiting={self.waiting}>"
