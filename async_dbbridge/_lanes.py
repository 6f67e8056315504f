"""Request lanes: long-lived threads that each serve one ASGI request's sync work at a time.

Django's ``ASGIHandler`` runs every thread-sensitive call of a request (request
signals, sync middleware and views, async ORM methods) on a thread made for
that request, which dies at its end — stranding its connection when
``CONN_MAX_AGE > 0``. A lane is a thread that outlives the request: the ASGI
wrapper hands each request a `RequestLane` as the executor of an outer
``ThreadSensitiveContext(executor=...)`` (asgiref >= 3.13), so all of that work
runs on one lane thread, whose connections the next request reuses, and
Django's own ``request_started`` / ``request_finished`` handlers enforce
``CONN_MAX_AGE`` and ``CONN_HEALTH_CHECKS`` on them exactly as under WSGI.

Lanes deliberately do no per-call cleanup (unlike `DBExecutor`): the
calls of one request share its connections and possibly one transaction (an
atomic block opened by one ``sync_to_async`` call and closed by a later one),
and closing or rolling back between them would break it. Cleanup happens per
*request*: when a lane is bound (what Django's ``request_started`` receivers
do) and when it is released (roll back a transaction the request left open,
then what ``request_finished``'s ``close_old_connections`` does). Django's own
receivers therefore stand aside in lane requests, so that a request binds a
lane only at its first real sync call, and the lane goes back as soon as
``response.close()`` (which sends ``request_finished``) returns.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import enum
import inspect
import itertools
import logging
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any, Final, Literal, ParamSpec, TypeVar, cast

from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, reset_queries
from django.dispatch import Signal

from ._connections import (
    close_all_for_exit,
    close_connections,
    discard_inherited,
    discard_transaction,
    in_transaction,
    initialized_connections,
    prepare_connections,
)
from ._executor import (
    ConnectionCounts,
    OwnerThread,
    _LoopItem,
    _WorkItem,
    count_connections,
    run_plain,
)

__all__ = (
    "LANES_SUPPORTED",
    "LaneSet",
    "LaneStats",
    "RequestLane",
    "current_request_lane",
    "end_request_cleanup",
)

logger = logging.getLogger("async_dbbridge")

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: asgiref >= 3.13 lets an outer ``ThreadSensitiveContext`` bring its own
#: executor; older versions have no public way to choose the request's thread,
#: so the wrapper falls back to closing the per-request thread's connections.
LANES_SUPPORTED: Final[bool] = (
    "executor" in inspect.signature(ThreadSensitiveContext.__init__).parameters
)

LaneFull = Literal["temporary", "wait"]

# Every live lane set, so fork and interpreter exit can reach them.
_lane_sets: weakref.WeakSet[LaneSet] = weakref.WeakSet()

#: The lane of the ASGI request running in this context, ``None`` outside one.
#: Set by the wrapper around the app: the request's tasks inherit it, and so
#: do its calls on the lane (asgiref runs them in a copy of the context).
current_request_lane: contextvars.ContextVar[RequestLane | None] = contextvars.ContextVar(
    "async_dbbridge_request_lane", default=None
)


# -- Django's request signals in a lane request ---------------------------------
#
# Django connects receivers of its own to the request signals: reset_queries
# and close_old_connections to request_started, close_old_connections to
# request_finished. They are sync, so ASGIHandler's
# ``await request_started.asend()`` is a thread-sensitive call: it would bind
# the request's lane before the view even runs and keep it for the request's
# whole life — a streaming response or a long poll with no database work would
# hold a lane throughout — and cost a round trip between the loop and the lane
# on every request. In a lane request the lane does what those receivers do
# itself, on its own connections, at the right moments: when it is bound
# (before the request's first sync call, as request_started) and when it is
# released (after its last, as request_finished). So inside a lane request,
# and only there, the two signals leave Django's own receivers out. Receivers
# of the project still run, on the lane, as before.

LiveReceivers = Callable[[Any], tuple[list[Any], list[Any]]]
AsyncSend = Callable[..., Awaitable[list[tuple[Any, Any]]]]


def _without_djangos_own(live_receivers: LiveReceivers) -> LiveReceivers:
    def live(sender: Any) -> tuple[list[Any], list[Any]]:
        sync_receivers, async_receivers = live_receivers(sender)
        if sync_receivers and current_request_lane.get() is not None:
            sync_receivers = [
                receiver
                for receiver in sync_receivers
                if receiver is not close_old_connections and receiver is not reset_queries
            ]
        return sync_receivers, async_receivers

    live.__wrapped__ = live_receivers  # type: ignore[attr-defined]
    return live


def _nothing_to_send_in_lane_requests(signal: Signal, asend: AsyncSend) -> AsyncSend:
    """``asend`` returning at once when, Django's own receivers aside, nobody listens.

    What Django's ``asend`` would return too, without its gather of an empty
    sync batch and an empty async batch (in Django 5.2, a task per request).
    """

    async def send(sender: Any, **named: Any) -> list[tuple[Any, Any]]:
        if current_request_lane.get() is not None:
            sync_receivers, async_receivers = signal._live_receivers(sender)
            if not sync_receivers and not async_receivers:
                return []
        return await asend(sender, **named)

    send.__wrapped__ = asend  # type: ignore[attr-defined]
    return send


def _release_after_this_call(sender: Any, **kwargs: Any) -> None:
    """``request_finished`` on a lane: the request's last sync work is running.

    Django sends it from ``response.close()``, the request's last
    thread-sensitive call; the lane cleans up and goes back as soon as that
    call returns, instead of staying bound until the event loop comes round
    to release it (a lane is the scarce resource; the loop, under load, is
    slow to come round). Only for Django's own ASGI handler: a test client or
    nested handler sending the signal from inside a view ends nothing.
    """
    request = current_request_lane.get()
    if request is None or not (isinstance(sender, type) and issubclass(sender, ASGIHandler)):
        return
    thread = threading.current_thread()
    if isinstance(thread, _LaneThread) and thread.request is request:
        thread.release_after_call = True


_hooks_lock = threading.Lock()
_hooks_installed = False


def _install_signal_hooks() -> None:
    """Once per process, when the first lane set is made (idempotent)."""
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        signals: tuple[Signal, ...] = (request_started, request_finished)
        for signal in signals:
            live_receivers: LiveReceivers | None = getattr(signal, "_live_receivers", None)
            # A private method: take it over only in the shape Django 5.0+
            # gives it, (sync receivers, async receivers). Otherwise lanes
            # still work, binding on request_started as any sync call would.
            shape = live_receivers(None) if live_receivers is not None else None
            if live_receivers is None or not (isinstance(shape, tuple) and len(shape) == 2):
                logger.debug("%r: Django's receivers stay in lane requests", signal)
                continue
            signal._live_receivers = _without_djangos_own(live_receivers)  # type: ignore[method-assign,assignment]
            signal.asend = _nothing_to_send_in_lane_requests(signal, signal.asend)  # type: ignore[method-assign,assignment]
        request_finished.connect(
            _release_after_this_call, weak=False, dispatch_uid="async_dbbridge.lanes.release"
        )


def _prepare_lane(thread: _LaneThread) -> None:
    """On a lane just bound to a request: what Django's ``request_started`` receivers do.

    ``reset_queries`` and ``close_old_connections``, for the lane's own
    connections (the only ones that ever connected on it: ``thread.wrappers``).
    """
    conns = list(thread.wrappers.values())
    for conn in conns:
        conn.queries_log.clear()
    prepare_connections(conns=conns)


def end_request_cleanup(*, final: bool) -> list[str]:
    """On the thread that served a request, once all of its sync work is done.

    Rolls back and closes connections the request left inside a transaction
    (returning their aliases, so the caller can warn on the event loop, where
    the request ran). Then ``final`` (the thread ends with the request) closes
    everything; otherwise connections past ``CONN_MAX_AGE`` or broken are closed
    and the rest kept for the next request, as ``request_finished`` does.
    """
    leftovers: list[str] = []
    for conn in initialized_connections():
        if in_transaction(conn):
            # request_finished may already have closed the raw connection (it
            # refuses to inside an atomic block but still marks it closed); the
            # wrapper's transaction state must be reset either way, or the
            # next request would run inside the dead block.
            discard_transaction(conn)
            leftovers.append(conn.alias)
    if final:
        close_all_for_exit()
    else:
        close_connections(only_obsolete=True)
    return leftovers


class _Signal(enum.Enum):
    PREPARE = "prepare"
    STOP = "stop"


class _Release:
    """Queued behind a request's last call: clean up, then give the lane back."""

    __slots__ = ("future", "request")

    def __init__(self, request: RequestLane | None, future: Future[list[str]] | None) -> None:
        self.request = request
        self.future = future


_Job = _WorkItem | _LoopItem
_Item = _WorkItem | _LoopItem | _Release | _Signal


class _LaneThread(OwnerThread):
    """A lane (or a temporary stand-in) and the bookkeeping only it writes."""

    def __init__(self, lanes: LaneSet, name: str, *, temporary: bool) -> None:
        super().__init__(name)
        self.lanes = lanes
        self.temporary = temporary
        self.queue: SimpleQueue[_Item] = SimpleQueue()
        # The request this lane serves; written under the lane set's lock.
        self.request: RequestLane | None = None
        self.requests = 0
        # Set (on this thread) by request_finished: release once the call returns.
        self.release_after_call = False

    def run(self) -> None:
        try:
            self.lanes._serve(self)
        finally:
            # A lane's connections can only be closed from the lane itself.
            close_all_for_exit()
            self.lanes._exited(self)
            self.lanes._ended(self)


class RequestLane(Executor):
    """The executor one request's ``ThreadSensitiveContext`` runs its sync work on.

    It borrows a lane thread lazily, on the first call: a request that never
    does thread-sensitive work takes no lane. Calls made before a lane is bound
    (all lanes busy in ``"wait"`` mode) are kept in order and handed over when
    one frees up; ``submit`` itself never blocks the event loop. Once bound,
    every call runs on that one thread, one at a time, in submission order —
    what ``ThreadSensitiveContext`` requires of its executor.

    Calls that come when there is nothing left to share a thread with go to
    ``fallback`` (the bridge) instead of a lane: calls after the lane was
    released (``request_finished`` has run), and calls of a request that never
    had a lane once its response is complete (Django's ``response.close()``
    after a streaming or long-polling view): such a request never waits for a
    lane, nor holds one, at all.
    """

    def __init__(self, lanes: LaneSet, fallback: Executor | None = None) -> None:
        self._lanes = lanes
        self._fallback = fallback
        self._lock = threading.Lock()
        self._thread: _LaneThread | None = None
        self._pending: list[_Job] = []
        self._requested = False
        self._released = False
        self._response_complete = False
        # With a LANE_WAIT_TIMEOUT: when waiting for a lane ends in a temporary.
        self._wait_deadline = 0.0
        # Done when the lane has cleaned up after the request and gone back.
        self._release_future: Future[list[str]] | None = None

    @property
    def thread_name(self) -> str | None:
        """The lane thread serving this request, if it has one yet."""
        thread = self._thread
        return thread.name if thread is not None else None

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        """Run ``fn`` on this request's lane; never blocks.

        Called on an event loop — as ``ThreadSensitiveContext`` always does,
        through ``loop.run_in_executor()`` — it returns the loop's own
        `asyncio.Future`, which ``run_in_executor``'s ``wrap_future()``
        passes through unchanged, and the lane completes it with one
        ``call_soon_threadsafe``: no `concurrent.futures.Future` (a
        ``Condition`` per call) and no future-chaining between the two, on
        every sync call of every request. Called anywhere else, a
        `concurrent.futures.Future`.
        """
        job: _Job
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            future: Future[_T] = Future()
            job = _WorkItem(future, fn, args, kwargs)
        else:
            on_loop: asyncio.Future[_T] = loop.create_future()
            job = _LoopItem(loop, on_loop, None, fn, args, kwargs)
            future = cast("Future[_T]", on_loop)
        with self._lock:
            if self._released or (self._response_complete and not self._requested):
                fallback = self._fallback
                if fallback is None:
                    raise RuntimeError("this request has ended; its lane takes no more calls")
            else:
                fallback = None
                if self._thread is not None:
                    self._thread.queue.put(job)
                    return future
                self._pending.append(job)
                if self._requested:
                    return future
                self._requested = True
        if fallback is not None:
            # Outside the lock: the bridge may start a thread.
            return fallback.submit(fn, *args, **kwargs)
        try:
            self._lanes._borrow(self)
        except BaseException:
            # No thread could be started: fail this call (run_in_executor
            # raises it to the awaiting request) and let the next one retry.
            # The future was never handed out: cancelled, it is not reported
            # as an exception nobody retrieved.
            job.future.cancel()
            with self._lock:
                self._thread = None
                self._requested = False
                self._pending.clear()
            raise
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # The lane set owns the threads; ThreadSensitiveContext never calls
        # this for a caller-owned executor anyway.
        return None

    def response_complete(self) -> None:
        """The response's last body message has been sent (called on the loop).

        From now on, a request that never had a lane has only end-of-request
        work left (``response.close()``), with no connection or transaction
        of its own to share a thread with: it goes to the fallback.
        """
        self._response_complete = True

    def release(self) -> Future[list[str]] | None:
        """At request end: queue the cleanup behind the request's last call.

        Returns a future for the aliases left in a transaction, done once the
        lane has cleaned up and gone back to the set — or ``None`` if the
        request never had a lane. If the lane already released itself (after
        ``response.close()``), that future is usually done by now. The lane
        goes back even if nobody waits for the future (a cancelled request),
        so a lane is never lost.
        """
        if self._requested and self._thread is None:
            # Still waiting for a lane (or being handed one right now).
            self._lanes._forget_waiter(self)
        with self._lock:
            if self._released:
                return self._release_future
            self._released = True
            thread, pending = self._thread, self._pending
            self._pending = []
            if thread is not None:
                future = self._release_future = _running_future()
        for job in pending:
            # Only calls of a request that gave up while waiting for a lane.
            job.cancel()
        if thread is None:
            return None
        thread.queue.put(_Release(self, future))
        return future

    def _release_from_lane(self, thread: _LaneThread) -> Future[list[str]] | None:
        """On the lane, after the call that sent ``request_finished``: end here?

        Only if nothing else of the request is queued on the lane: under the
        lock that ``submit`` queues with, an empty queue stays empty once the
        request is marked released (later calls go to the fallback), so the
        lane can go to another request with nothing of this one behind it.
        """
        with self._lock:
            if self._released or self._thread is not thread or not thread.queue.empty():
                return None
            self._released = True
            future = self._release_future = _running_future()
            return future

    def _bind(self, thread: _LaneThread) -> bool:
        """Attach a lane; False if the request ended while it waited for one."""
        with self._lock:
            if self._released:
                return False
            self._thread = thread
            # First what request_started does (close obsolete connections,
            # re-arm health checks, reset the query log): Django's own
            # receivers are left out of lane requests, and other ASGI apps
            # send no request signals at all.
            thread.queue.put(_Signal.PREPARE)
            for job in self._pending:
                thread.queue.put(job)
            self._pending.clear()
            return True


def _running_future() -> Future[list[str]]:
    future: Future[list[str]] = Future()
    # Running from the start: a cancelled await on the wrapping asyncio future
    # must not cancel this one, which the lane completes regardless.
    future.set_running_or_notify_cancel()
    return future


@dataclass(frozen=True)
class LaneStats(ConnectionCounts):
    """A snapshot of a `LaneSet`. Counts only."""

    size: int
    full: str
    lanes: int
    in_use: int
    idle: int
    temporary: int
    waiting: int
    requests: int
    temporaries_started: int
    waits_expired: int
    connections_open: dict[str, int]
    connections_opened: dict[str, int]
    closing: bool


class LaneSet:
    """A bounded set of lane threads, shared by every request of an ASGI app.

    Args:
        size: The most lane threads (and so connections per alias) kept.
        full: When every lane is busy: ``"temporary"`` runs the request on a
            temporary thread whose connections are closed when it ends;
            ``"wait"`` queues it until a lane frees up (a strict bound).
        wait_timeout: With ``"wait"``: seconds a request waits for a lane
            before it gets a temporary thread after all; ``None`` (default)
            waits as long as it takes.
        idle_timeout: Seconds an idle lane waits before it retires and closes
            its connections; ``None`` keeps lanes until `close()`.
        thread_name_prefix: Lanes are named ``<prefix>-lane-N``.
    """

    def __init__(
        self,
        size: int,
        *,
        full: LaneFull = "temporary",
        wait_timeout: float | None = None,
        idle_timeout: float | None = 60.0,
        thread_name_prefix: str = "dbbridge",
    ) -> None:
        checked: object = size  # typed int, but validated for callers without mypy
        if isinstance(checked, bool) or not isinstance(checked, int) or checked <= 0:
            raise ValueError(f"size must be a positive integer, not {size!r}")
        if full not in ("temporary", "wait"):
            raise ValueError(f"full must be 'temporary' or 'wait', not {full!r}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be > 0 or None, not {idle_timeout!r}")
        if wait_timeout is not None and (wait_timeout <= 0 or full != "wait"):
            raise ValueError(
                f"wait_timeout must be > 0 or None, and only with full='wait', not {wait_timeout!r}"
            )
        self._size = size
        self._full: LaneFull = full
        self._wait_timeout = wait_timeout
        self._idle_timeout = idle_timeout
        self._prefix = thread_name_prefix
        self._reset_state()
        _lane_sets.add(self)
        _install_signal_hooks()

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._closing = False
        self._alive: set[_LaneThread] = set()
        self._in_use: set[_LaneThread] = set()
        # LIFO: the most recently used lane (warm connection) is lent first,
        # so under light load the others stay idle long enough to retire.
        self._idle: list[_LaneThread] = []
        self._temporaries: set[_LaneThread] = set()
        # Every started thread until its very last step: what join() waits for.
        self._running: set[_LaneThread] = set()
        self._waiting: deque[RequestLane] = deque()
        # (loop, token) of the one timer that expires waits, if armed.
        self._wait_expiry: tuple[asyncio.AbstractEventLoop, object] | None = None
        self._temporaries_started = 0
        self._waits_expired = 0
        self._retired_requests = 0
        self._retired_opened: Counter[str] = Counter()

    # -- public API ---------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def full(self) -> LaneFull:
        return self._full

    @property
    def closing(self) -> bool:
        return self._closing

    def request_lane(self, fallback: Executor | None = None) -> RequestLane:
        """A lazy lane for one request; call its ``release()`` when the request ends.

        ``fallback`` (the bridge) runs the request's calls that need no lane:
        see `RequestLane`. Without one, such calls raise.
        """
        return RequestLane(self, fallback)

    def counts(self) -> tuple[int, int]:
        """(lane threads alive, lanes serving a request); temporaries count in both."""
        with self._lock:
            temporaries = len(self._temporaries)
            return len(self._alive) + temporaries, len(self._in_use) + temporaries

    def stats(self) -> LaneStats:
        with self._lock:
            threads = list(self._alive | self._temporaries)
            in_use, idle = len(self._in_use), len(self._idle)
            temporary, waiting = len(self._temporaries), len(self._waiting)
            requests, retired_opened = self._retired_requests, Counter(self._retired_opened)
            temporaries_started, closing = self._temporaries_started, self._closing
            waits_expired = self._waits_expired
        requests += sum(thread.requests for thread in threads)
        opened, open_now = count_connections(threads, retired_opened)
        return LaneStats(
            size=self._size,
            full=self._full,
            lanes=len(threads) - temporary,
            in_use=in_use + temporary,
            idle=idle,
            temporary=temporary,
            waiting=waiting,
            requests=requests,
            temporaries_started=temporaries_started,
            waits_expired=waits_expired,
            connections_open=open_now,
            connections_opened=opened,
            closing=closing,
        )

    def close(self) -> None:
        """Stop lending lanes; idle lanes exit now, busy ones when their request ends.

        Never blocks: call `join()` (from a thread that is not the event
        loop) to wait. Requests still waiting for a lane get temporary threads,
        so they finish; requests that arrive later do too.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            idle, self._idle = self._idle, []
            waiting = list(self._waiting)
            self._waiting.clear()
        for thread in idle:
            thread.queue.put(_Signal.STOP)
        for request in waiting:
            try:
                self._lend_temporary(request)
            except Exception:
                # Its calls have been failed with the error; close() goes on.
                logger.warning("no thread for a request waiting for a lane", exc_info=True)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for lanes and temporaries to exit (after `close()`); True if all did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._running)
            if not threads:
                return True
            for thread in threads:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                thread.join(remaining)
                if thread.is_alive():
                    return False

    # -- used by RequestLane --------------------------------------------------

    def _borrow(self, request: RequestLane) -> None:
        # Called from the event loop by the request's first call: only takes a
        # lock and a list element; starting a new thread is the one pause, the
        # same one asyncio's own default executor makes.
        start = False
        with self._lock:
            if self._closing:
                thread = None
            elif self._idle:
                thread = self._idle.pop()
                thread.request = request
                self._in_use.add(thread)
            elif len(self._alive) < self._size:
                thread = self._new_thread(temporary=False)
                thread.request = request
                self._alive.add(thread)
                self._in_use.add(thread)
                start = True
            elif self._full == "wait":
                # The lane that frees up next hands itself over (in _finish);
                # the request's calls wait in its pending list meanwhile,
                # awaited by the event loop, not blocking it.
                self._waiting.append(request)
                if self._wait_timeout is not None:
                    request._wait_deadline = time.monotonic() + self._wait_timeout
                    self._arm_wait_expiry(self._wait_timeout)
                return
            else:
                thread = None
        if thread is None:
            self._lend_temporary(request)
            return
        if not request._bind(thread):
            # Cannot happen from the event loop (binding and release both run
            # there), but never strand a lane: give it straight back.
            thread.queue.put(_Release(None, None))
        if start:
            self._start(thread)

    def _lend_temporary(self, request: RequestLane) -> None:
        with self._lock:
            thread = self._new_thread(temporary=True)
            thread.request = request
            self._temporaries.add(thread)
            self._temporaries_started += 1
        if not request._bind(thread):
            thread.queue.put(_Release(None, None))
        self._start(thread)

    def _start(self, thread: _LaneThread) -> None:
        with self._lock:
            self._running.add(thread)
        try:
            thread.start()
        except BaseException as exc:
            # "can't start new thread": forget it, so the set does not count
            # a lane that will never serve, and fail the calls already handed
            # to it, so nobody awaits them forever.
            with self._lock:
                for threads in (self._running, self._alive, self._in_use, self._temporaries):
                    threads.discard(thread)
            while True:
                try:
                    item = thread.queue.get_nowait()
                except Empty:
                    break
                if isinstance(item, (_WorkItem, _LoopItem)):
                    item.fail(exc)
            raise

    def _arm_wait_expiry(self, delay: float) -> None:
        """Under the lock, on the event loop: make sure a timer will expire waits.

        One timer for the whole queue, not one per waiting request: waiters are
        queued in arrival order with the same timeout, so the head's deadline
        is the next one due, and the timer re-arms itself for the new head.
        A timer on a loop other than the running one (a loop that stopped,
        in tests) is replaced; its token no longer matches when it fires.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # submit() called outside an event loop: wait without limit
        armed = self._wait_expiry
        if armed is not None and armed[0] is loop:
            return
        token = object()
        loop.call_later(delay, self._expire_waits, token)
        self._wait_expiry = (loop, token)

    def _expire_waits(self, token: object) -> None:
        """On the loop, when the queue head's deadline is due: temporaries for the late."""
        now = time.monotonic()
        with self._lock:
            armed = self._wait_expiry
            if armed is None or armed[1] is not token:
                return  # replaced by a timer on another loop
            self._wait_expiry = None
            expired: list[RequestLane] = []
            while self._waiting and self._waiting[0]._wait_deadline <= now:
                expired.append(self._waiting.popleft())
            self._waits_expired += len(expired)
            if self._waiting:
                self._arm_wait_expiry(max(0.0, self._waiting[0]._wait_deadline - now))
        for request in expired:
            try:
                self._lend_temporary(request)
            except Exception:
                # Its calls have been failed with the error (see _start).
                logger.warning("no thread for a request that waited too long", exc_info=True)

    def _forget_waiter(self, request: RequestLane) -> None:
        with self._lock:
            try:
                self._waiting.remove(request)
            except ValueError:
                pass

    def _new_thread(self, *, temporary: bool) -> _LaneThread:
        kind = "lane-tmp" if temporary else "lane"
        return _LaneThread(
            self, f"{self._prefix}-{kind}-{next(self._counter)}", temporary=temporary
        )

    # -- the lane threads -----------------------------------------------------

    def _serve(self, thread: _LaneThread) -> None:
        queue = thread.queue
        while True:
            # Only an idle pooled lane times out; one serving a request waits
            # for as long as the request takes to send its next call.
            idle = thread.request is None and not thread.temporary
            try:
                item = queue.get(timeout=self._idle_timeout if idle else None)
            except Empty:
                if self._retire(thread):
                    return
                continue  # lent out just as it timed out: serve the request
            if isinstance(item, (_WorkItem, _LoopItem)):
                if item.execute(run_plain):
                    exiting = False
                    if thread.release_after_call:
                        # The call was response.close(): release before its
                        # result reaches the loop, so the lane is free (or
                        # serving the next request) when the loop comes round.
                        thread.release_after_call = False
                        exiting = self._release_early(thread)
                    item.deliver()
                    if exiting:
                        return
            elif isinstance(item, _Release):
                if self._finish(thread, item):
                    return
            elif item is _Signal.PREPARE:
                try:
                    _prepare_lane(thread)
                except Exception:
                    # Like a failed close in request_started: the connection
                    # is forgotten and the request's first query reconnects.
                    logger.warning("preparing a lane's connections failed", exc_info=True)
            else:
                return  # _Signal.STOP
            del item

    def _release_early(self, thread: _LaneThread) -> bool:
        """After ``request_finished``: end the request now if nothing else of it is queued.

        True: the thread exits (a temporary, or the set is closing).
        """
        request = thread.request
        future = request._release_from_lane(thread) if request is not None else None
        if future is None:
            return False  # the loop's release(), queued or to come, ends it
        return self._finish(thread, _Release(request, future))

    def _finish(self, thread: _LaneThread, release: _Release) -> bool:
        """Request end, on the lane: clean up, hand the lane on. True: the thread exits."""
        leftovers: list[str] = []
        with self._lock:
            final = thread.temporary or self._closing
        if release.request is not None:
            thread.requests += 1
            try:
                leftovers = end_request_cleanup(final=final)
            except Exception:
                # The response is long sent: report, and let the lane go on.
                # The failed connection is already forgotten (close_connections),
                # so the next request on this lane reconnects.
                logger.warning("cleaning up a lane at request end failed", exc_info=True)
        exiting = thread.temporary
        if not thread.temporary:
            exiting = self._hand_on(thread)
        if exiting:
            # Closed (and accounted as gone) before the request hears back, so
            # "request done" means "its connections are closed" for
            # temporaries and at shutdown.
            close_all_for_exit()
            self._exited(thread)
        if release.future is not None:
            release.future.set_result(leftovers)
        return exiting

    def _hand_on(self, thread: _LaneThread) -> bool:
        """Give the lane to the next waiting request, or back to the idle set."""
        while True:
            with self._lock:
                if self._closing:
                    thread.request = None
                    self._in_use.discard(thread)
                    return True
                if not self._waiting:
                    thread.request = None
                    self._in_use.discard(thread)
                    self._idle.append(thread)
                    return False
                request = self._waiting.popleft()
                thread.request = request
            # Outside the lock: _bind takes the request's own lock, and the
            # loop may be releasing that request right now (it gave up waiting).
            if request._bind(thread):
                return False

    def _retire(self, thread: _LaneThread) -> bool:
        with self._lock:
            if thread in self._idle:
                self._idle.remove(thread)
                # No longer counted at once: a request arriving now may start
                # a replacement instead of waiting for a lane that is leaving.
                self._alive.discard(thread)
                return True
            return False

    def _exited(self, thread: _LaneThread) -> None:
        """The thread serves no more (idempotent: early from _finish, then from run)."""
        with self._lock:
            self._alive.discard(thread)
            self._in_use.discard(thread)
            self._temporaries.discard(thread)
            if thread in self._idle:
                self._idle.remove(thread)
            self._retired_requests += thread.requests
            self._retired_opened.update(thread.opened)
            thread.requests = 0
            thread.opened.clear()

    def _ended(self, thread: _LaneThread) -> None:
        with self._lock:
            self._running.discard(thread)

    def __repr__(self) -> str:
        lanes, in_use = self.counts()
        state = "closing" if self._closing else "open"
        return (
            f"<{type(self).__name__} {state} size={self._size} full={self._full} "
            f"lanes={lanes} in_use={in_use}>"
        )


def _reinit_after_fork() -> None:
    """In a forked child: the parent's lanes do not exist here; start afresh."""
    for lanes in list(_lane_sets):
        for thread in list(lanes._alive | lanes._temporaries):
            for conn in thread.wrappers.values():
                discard_inherited(conn)
        lanes._reset_state()


def close_all_lane_sets(timeout: float) -> bool:
    """Close every lane set in the process: idle lanes at once, busy ones when done.

    Returns whether every lane thread ended (and so closed its connections)
    within ``timeout`` seconds.
    """
    sets = list(_lane_sets)
    for lanes in sets:
        lanes.close()
    deadline = time.monotonic() + timeout
    ended = True
    for lanes in sets:
        if not lanes.join(max(0.0, deadline - time.monotonic())):
            logger.warning("%r: lanes still busy; their connections are dropped", lanes)
            ended = False
    return ended


# Lanes are daemon threads, still alive when atexit hooks run: ask them to close
# their connections and give busy ones a moment; the process is ending, so the
# wait is bounded. (After fork, _fork calls _reinit_after_fork.)
atexit.register(close_all_lane_sets, 5.0)
