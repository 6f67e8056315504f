"""Request threads: an elastic set of reused threads, each serving one ASGI request at a time.

A request's thread-sensitive work must run on one thread for the request's
whole life (asgiref's contract for `ThreadSensitiveContext`; request-scoped
``threading.local`` state relies on it). Django makes a thread per request for
that. Here threads are reused instead, and they hold nothing between requests:
their connections come from the pool (``_pool``) and go back to it — after each
call when idle (hold mode ``"transaction"``) and at the request's end in any
case — so a thread is cheap to keep and the set never needs a bound:

* `RequestThreads.acquire()` never waits: it takes the most recently idle
  thread (LIFO: a light load keeps reusing one hot thread, so the ones below
  stay idle long enough to retire), or starts a new one.
* A thread goes back to the set by itself after running the request's
  end-of-request job, or is given back by the request's binding when that job
  would have nothing to do (see ``_binding.RequestBinding.end``).
* An idle thread retires once it has waited ``idle_timeout`` seconds for a
  request: its own queue wait times out, so no reaper thread is needed.

Threads are bound to requests by ``_binding.RequestBinding``; connections are
the pool's business. This module only runs calls and keeps count.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from django.db import connections

from . import _compat, _exit, _fork
from ._connections import discard_inherited
from ._executor import _LoopItem, _WorkItem, run_plain
from ._lending import end_request, give_back_idle, make_pooled
from ._thread_cache import RETIRE, CachedThread, ThreadCache
from ._validation import is_number
from .conf import HOLD_CHOICES, Hold

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = (
    "RequestThread",
    "RequestThreadStats",
    "RequestThreads",
    "combined_stats",
    "idle_give_back",
)

logger = logging.getLogger("async_dbbridge")

# How long, at interpreter exit, busy request threads get to finish and give
# their connections back (they are daemon threads: nobody else waits for them).
_EXIT_TIMEOUT: Final = 5.0

# Every live set, so fork and interpreter exit can reach them.
_sets: weakref.WeakSet[RequestThreads] = weakref.WeakSet()


@dataclass(frozen=True)
class RequestThreadStats:
    """A snapshot of the ASGI wrapper's request threads.

    Part of [`stats()`][async_dbbridge.stats]: request threads run each ASGI
    request's sync work, one request per thread at a time; they are elastic
    (started when every one is busy, retired after `IDLE_TIMEOUT` idle) and
    hold no connection between requests.

    Attributes:
        busy: Threads serving a request now.
        idle: Threads waiting for a request.
        started: Threads started since the set was made (or since fork).
        retired: Threads that have ended: idle too long, or closed.
        closing: Whether `close()` has been called.
    """

    busy: int
    idle: int
    started: int
    retired: int
    closing: bool

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


class _Stop(enum.Enum):
    STOP = "stop"


class _EndOfRequest:
    """A request's last job: clean up its connections, then go back to the set."""

    __slots__ = ("finished", "future")

    def __init__(self, finished: Callable[[], object], future: Future[list[str]]) -> None:
        self.finished = finished
        self.future = future


_Call = _WorkItem | _LoopItem
_Item = _Call | _EndOfRequest | _Stop


class RequestThread(CachedThread):
    """One thread of a `RequestThreads` set; runs the calls queued on it, in order."""

    def __init__(self, threads: RequestThreads, name: str) -> None:
        super().__init__(name)
        self._threads = threads
        # This thread's wrapper of every alias, made pooled at start; written
        # once by the thread itself, read after fork by the child.
        self.wrappers: tuple[BaseDatabaseWrapper, ...] = ()
        # Why the wrappers could not be made pooled: every call then fails
        # with it rather than open connections outside the pool's bound.
        self._broken: BaseException | None = None
        # Calls queued on this thread, and calls it is done with (run, failed
        # or cancelled, and idle connections given back). Each count has one
        # writer — the binding, under its lock, and this thread — so neither
        # needs a lock; equal counts mean nothing is queued or running.
        self.submitted = 0
        self.finished = 0

    # -- used by the binding (any thread) ---------------------------------------

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Future[Any]:
        """Queue a call; on an event loop, returns the loop's own future (see the binding)."""
        self.submitted += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            future: Future[Any] = Future()
            self.inbox.put(_WorkItem(future, fn, args, kwargs))
            return future
        # The loop's own future, completed with one call_soon_threadsafe: no
        # concurrent Future (a Condition per call) and no chaining between
        # the two on every sync call of every request. run_in_executor() hands
        # it back unchanged, because asyncio.wrap_future() returns anything
        # asyncio.isfuture() accepts as is (Python 3.11 and 3.13).
        on_loop: asyncio.Future[Any] = loop.create_future()
        # No context: asgiref's callable enters the request's context itself.
        self.inbox.put(_LoopItem(loop, on_loop, None, fn, args, kwargs))
        return cast("Future[Any]", on_loop)

    def done_with_request(self) -> bool:
        """Whether the request using this thread can end without a last job on it.

        True when every call queued on it is finished and it holds no
        connection (none was left in a transaction, hold mode "transaction"),
        so the end-of-request job would find nothing to do: the binding then
        gives the thread back at once, and the request's end costs no
        wake-up of this thread and no round trip to the loop. Read from the
        loop's thread: plain reads of counts and attributes this thread
        wrote before it delivered the request's last result.
        """
        return (
            self.finished == self.submitted
            and self._broken is None
            and all(conn.connection is None for conn in self.wrappers)
        )

    def end_request(self, finished: Callable[[], object]) -> Future[list[str]]:
        """Queue the request's last job; ``finished`` runs on this thread before it goes back."""
        future: Future[list[str]] = Future()
        # Running from the start: cancelling an asyncio future that wraps it
        # (a cancelled request) must not cancel this one, which the thread
        # completes regardless.
        future.set_running_or_notify_cancel()
        self.inbox.put(_EndOfRequest(finished, future))
        return future

    def _stop(self) -> None:
        self.inbox.put(_Stop.STOP)

    # -- the thread ---------------------------------------------------------------

    def main(self) -> None:
        # In a fresh context (CachedThread): each call still runs in its
        # request's context, which asgiref enters in the callable it submits.
        try:
            self._set_up()
            self._serve()
        finally:
            # Nothing should be held here (every request ends by giving its
            # connections back), but a pooled connection left on a dead
            # thread would be a pool slot lost for good.
            end_request(self.wrappers)
            self._threads._exited(self)

    def _set_up(self) -> None:
        try:
            self.wrappers = tuple(connections[alias] for alias in connections)
            for conn in self.wrappers:
                make_pooled(conn)
        except Exception as exc:
            self._broken = exc
            logger.error(
                "request thread %s could not make its database connections pooled; its calls fail",
                self.name,
                exc_info=True,
            )

    def _serve(self) -> None:
        cache = self._threads._cache
        while True:
            # Whether this thread is on the idle stack is the set's business:
            # a request's end may put it back from the loop's thread (see
            # done_with_request), or this thread itself after an end-of-request job.
            item = cache.next_item(self)
            if item is RETIRE:
                return
            if isinstance(item, _EndOfRequest):
                if not self._end_request(item):
                    return
            elif isinstance(item, _Stop):
                return
            else:
                self._call(item)
            del item  # nothing of a finished call stays alive while idling

    def _call(self, item: _Call) -> None:
        if self._broken is not None:
            error = RuntimeError(
                f"request thread {self.name} could not make its database connections "
                f"pooled: {self._broken!r}"
            )
            error.__cause__ = self._broken
            self.finished += 1
            item.fail(error)
            return
        if not item.execute(run_plain):
            self.finished += 1
            return  # cancelled before it started: nothing ran
        if self._threads.hold == "transaction":
            # Before the result is delivered: by the time the request goes on,
            # an idle connection is back in the pool for others.
            self._give_back_idle()
        # Before the result too: once the request has its last result, the
        # binding may end it without a job on this thread (done_with_request).
        self.finished += 1
        item.deliver()

    def serve_until(self, token: object) -> None:
        """Inside a call of this thread: run the calls queued meanwhile, until `token` comes.

        The one-hop call (`_one_hop`) waits here while the loop sends its
        response. Code on the loop may make thread-sensitive calls for the same
        request meanwhile (an ASGI middleware that wraps `send` with
        `sync_to_async`): they are queued on this very thread, so it runs them
        as it waits — as asgiref's `CurrentThreadExecutor` does for a thread
        blocked in `async_to_sync` — instead of deadlocking. Only calls can
        arrive while a call of the request runs (its end comes after the app
        returned, which waits for this call); anything else would be put back
        behind the token.
        """
        other: list[_Item] = []
        while True:
            item = self.inbox.get()
            if item is token:
                break
            if isinstance(item, _WorkItem | _LoopItem):
                self._call(item)
            else:
                other.append(item)
        for item in other:
            self.inbox.put(item)

    def _give_back_idle(self) -> None:
        # Runs after every call: a few attribute reads when nothing is held.
        give_back_idle(self.wrappers)

    def _end_request(self, item: _EndOfRequest) -> bool:
        """The request's last job. True: the thread stays in the set (idle)."""
        leftovers = end_request(self.wrappers)
        try:
            item.finished()  # the binding is DONE before anyone else may take this thread
        except Exception:
            logger.warning("ending a request's binding failed", exc_info=True)
        # A broken thread leaves: the next request starts a fresh one, which
        # tries again to make its connections pooled.
        stays = self._threads._release(self, keep=self._broken is None)
        # Completed after the release, so "done" means "the thread is back".
        item.future.set_result(leftovers)
        return stays


class RequestThreads:
    """An elastic set of reused threads that serve ASGI requests, one request each.

    `acquire()` never waits: it returns the most recently idle thread, or
    starts a new one. A thread serves its request's calls in order, gives idle
    connections back to the pool after each call (`hold="transaction"`) and
    everything at the request's end, then returns to the set (by itself, or
    from the binding when the request left nothing to clean up). Idle threads
    retire after `idle_timeout` seconds.

    Args:
        hold: `"transaction"` gives idle connections back after each call;
            `"request"` only at the request's end (for session state: `SET`,
            advisory locks, temporary tables).
        idle_timeout: Seconds an idle thread waits for a request before it
            ends; `None` keeps idle threads until `close()`.
        thread_name_prefix: Threads are named `<prefix>-request-N`.

    Raises:
        ValueError: `hold` is not `"transaction"` or `"request"`, or `idle_timeout`
            is not a number of seconds > 0 or `None`.
    """

    def __init__(
        self, *, hold: Hold, idle_timeout: float | None, thread_name_prefix: str = "dbbridge"
    ) -> None:
        if hold not in HOLD_CHOICES:
            raise ValueError(f"hold must be 'transaction' or 'request', not {hold!r}")
        if idle_timeout is not None and not (is_number(idle_timeout) and idle_timeout > 0):
            raise ValueError(
                f"idle_timeout must be a number of seconds > 0 or None, not {idle_timeout!r}"
            )
        self.hold: Hold = hold
        self.idle_timeout = float(idle_timeout) if idle_timeout is not None else None
        self._prefix = thread_name_prefix
        self._closing = False
        self._reset_state()
        _sets.add(self)

    def _reset_state(self) -> None:
        self._cache: ThreadCache[RequestThread] = ThreadCache(
            functools.partial(RequestThread, self),
            prefix=f"{self._prefix}-request",
            idle_timeout=self.idle_timeout,
        )
        self._lock = self._cache.lock
        # Threads serving a request now (the cache keeps the idle and the alive).
        self._busy: set[RequestThread] = set()

    @property
    def closing(self) -> bool:
        """Whether `close()` has been called."""
        return self._closing

    def acquire(self) -> RequestThread:
        """A thread for one request: the most recently idle one, or a new one. Never waits.

        The caller queues the request's calls on it and ends with its
        end-of-request job, after which the thread comes back by itself, or
        gives it back with `release()` when there is nothing to clean up.

        Raises:
            RuntimeError: No thread could be started (the set is unchanged).
        """
        cache = self._cache
        with self._lock:
            thread = cache.pop_idle_locked()
            if thread is not None:
                self._busy.add(thread)
                return thread
            # After close() too: a request still in flight must finish; its
            # thread ends when the request does (see _release).
            thread = cache.new_locked()
            self._busy.add(thread)
        try:
            # Outside the lock: starting a thread is the one pause acquire()
            # may make (the same one asyncio's default executor makes).
            cache.start(thread)
        except BaseException:
            with self._lock:
                self._busy.discard(thread)
            raise
        return thread

    def stats(self) -> RequestThreadStats:
        """A snapshot: threads busy and idle now, started and retired so far."""
        with self._lock:
            return RequestThreadStats(
                busy=len(self._busy),
                idle=len(self._cache.idle),
                started=self._cache.started,
                retired=self._cache.retired,
                closing=self._closing,
            )

    def close(self, timeout: float | None = None) -> bool:
        """Stop keeping threads; wait up to `timeout` seconds for every thread to end.

        Idle threads end at once; busy ones once their request has ended and
        its connections are back (a request arriving meanwhile still gets a
        thread, which ends with it). Blocks: from an event loop, call it
        through a thread (the ASGI wrapper's shutdown does), or with
        `timeout=0` to only start closing. Called on one of the set's own
        threads, it does not wait for that thread.

        Returns:
            Whether every thread had ended within `timeout`.
        """
        with self._lock:
            self._closing = True
            idle = self._cache.take_all_idle_locked()
        for thread in idle:
            thread._stop()
        return self._cache.wait_ended(timeout)

    def release(self, thread: RequestThread) -> None:
        """Put back a thread whose request ended with nothing left to do on it.

        From the binding, on the loop's thread, when `done_with_request()` says
        the end-of-request job would be empty. The thread itself is waiting
        for its next call; while the set is closing it is told to stop instead.
        """
        if not self._release(thread, keep=True):
            thread._stop()

    # -- used by the threads --------------------------------------------------------

    def _release(self, thread: RequestThread, *, keep: bool) -> bool:
        """After a request's last job: back to the idle stack (True), or end (False)."""
        with self._lock:
            self._busy.discard(thread)
            if self._closing or not keep:
                return False
            self._cache.park_locked(thread)
            return True

    def _exited(self, thread: RequestThread) -> None:
        with self._lock:
            self._busy.discard(thread)
        self._cache.exited(thread)

    def __repr__(self) -> str:
        stats = self.stats()
        state = "closing" if stats.closing else "open"
        return (
            f"<{type(self).__name__} {state} hold={self.hold} busy={stats.busy} idle={stats.idle}>"
        )


def combined_stats() -> RequestThreadStats | None:
    """The request threads of every open set in the process, counted together.

    `None` when there is none (no ASGI wrapper serving on request threads).
    """
    sets = [threads for threads in list(_sets) if not threads.closing]
    if not sets:
        return None
    snapshots = [threads.stats() for threads in sets]
    return RequestThreadStats(
        busy=sum(s.busy for s in snapshots),
        idle=sum(s.idle for s in snapshots),
        started=sum(s.started for s in snapshots),
        retired=sum(s.retired for s in snapshots),
        closing=False,
    )


def _reset_after_fork() -> None:
    """In a forked child (called by ``_fork``'s hook): the parent's threads do not exist here.

    Their connections are the parent's sessions: discarded without network
    I/O (``_fork`` discards every tracked wrapper too; discarding twice is
    harmless). Locks are made anew: another thread may
    have held one at the fork. A set closed in the parent stays closed.
    """
    for threads in list(_sets):
        for thread in list(threads._cache.alive):
            for conn in thread.wrappers:
                discard_inherited(conn)
        threads._reset_state()


def idle_give_back(thread: object) -> Callable[[], object] | None:
    """How `thread` gives its idle connections back between calls, if it is to.

    A request thread with `HOLD="transaction"` gives an idle connection back
    after each call. Two places need it inside a call too, where the thread
    waits on something else and should not keep a pool slot meanwhile:

    * after a sync call nested in an `AsyncToSync` on it: Django runs the async
      part of a chain below a sync-only middleware (WhiteNoise) through
      `async_to_sync` from the request's thread, and that part's sync calls
      (an async view's ORM queries) run on the blocked thread itself
      (`_compat.hook_nested_calls`); otherwise the connection stays held across
      every await of the view;
    * while the one-hop call (`_one_hop`) waits for its response to be sent.

    `None` for any other thread, or with `HOLD="request"`.
    """
    if isinstance(thread, RequestThread) and thread._threads.hold == "transaction":
        return thread._give_back_idle
    return None


_nested_calls_unhooked = _compat.hook_nested_calls(idle_give_back)
if _nested_calls_unhooked is not None:
    logger.debug(
        "sync calls nested in async_to_sync keep their connection: %s", _nested_calls_unhooked
    )

_fork.on_child(_reset_after_fork, order=_fork.ORDER_REQUEST_THREADS)


def _close_all_at_exit() -> None:
    for threads in list(_sets):
        if not threads.close(_EXIT_TIMEOUT):
            logger.warning("%r: request threads still busy at exit", threads)


_exit.on_exit(_close_all_at_exit, order=_exit.ORDER_REQUEST_THREADS)
