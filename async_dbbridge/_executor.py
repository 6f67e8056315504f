"""DBExecutor: a thread pool that owns the lifecycle of its threads' connections."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.thread import BrokenThreadPool
from dataclasses import asdict, dataclass
from queue import Empty
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast

from django.conf import settings as django_settings
from django.db import connections

from . import _exit, _fork
from ._completions import completions_for
from ._connections import (
    Policy,
    cleanup_after_call,
    close_all_for_exit,
    describe,
    discard_inherited,
    expire_connections,
    on_connect,
)
from ._lending import after_call, give_back_all, make_pooled, pool_stats
from ._thread_cache import RETIRE, CachedThread, ThreadCache
from ._validation import is_number, is_positive_int

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ("DBExecutor", "ExecutorStats")

logger = logging.getLogger("async_dbbridge")

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: How long an idle worker waits for work before it retires and closes its
#: connections. Long enough that a steady trickle of calls keeps connections warm,
#: short enough that a burst's extra threads and sessions go away by themselves.
DEFAULT_IDLE_TIMEOUT: Final = 60.0

# Returned by DBExecutor._next_item when the worker is to stop.
_STOP: Final = object()

# Every live executor, so fork and interpreter exit can reach them.
_executors: weakref.WeakSet[DBExecutor] = weakref.WeakSet()


class ConnectionCounts:
    """What every stats snapshot has: connections open per alias, and a JSON form."""

    connections_open: dict[str, int]

    @property
    def open_connections(self) -> int:
        """All connections held open, over every alias."""
        return sum(self.connections_open.values())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        fields: dict[str, Any] = asdict(cast(Any, self))  # subclasses are dataclasses
        return fields


@dataclass(frozen=True)
class ExecutorStats(ConnectionCounts):
    """A snapshot of a [`DBExecutor`][async_dbbridge.DBExecutor]: counts only, never credentials.

    Returned by [`DBExecutor.stats()`][async_dbbridge.DBExecutor.stats];
    `as_dict()` gives a JSON-serialisable copy and `open_connections` the sum
    of `connections_open`.

    Attributes:
        max_workers: The most worker threads the pool may run.
        workers: Worker threads alive now (`busy` + `idle`).
        busy: Workers running a call.
        idle: Workers waiting for a call.
        queued: Calls waiting for a worker because all are busy.
        calls: Calls run since the pool started.
        errors: Calls that raised.
        call_time: Seconds spent running calls (cleanup included), summed over
            all calls: with `calls`, the mean duration of a call over any
            interval.
        connections_open: Connections held open now, per alias.
        connections_opened: Connections opened since the pool started, per alias.
        connections_closed: Connections closed since the pool started, per alias.
        policy: The kind of the pool's [`Policy`][async_dbbridge.Policy]:
            `"request"`, `"close"` or `"max_age"`.
        shutdown: Whether `shutdown()` has been called.
        pooled: Whether the workers take their connections from the
            process's connection pools (the process-wide bridge does). The
            three `connections_*` counts of a pooled executor are then its
            pools' (open: in use or idle), which it shares with the ASGI
            wrapper's request threads: see [`stats()`][async_dbbridge.stats].
    """

    max_workers: int
    workers: int
    busy: int
    idle: int
    queued: int
    calls: int
    errors: int
    connections_open: dict[str, int]
    connections_opened: dict[str, int]
    connections_closed: dict[str, int]
    policy: str = "request"
    shutdown: bool = False
    pooled: bool = False
    call_time: float = 0.0


class OwnerThread(CachedThread):
    """A thread the bridge owns (an executor worker), and its connections.

    Everything here is written only by the thread itself, so none of it needs a
    lock; other threads (stats(), a forked child) only read it.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.opened: Counter[str] = Counter()
        # The thread's wrappers, captured when they connect: stats() reads their
        # state from other threads, and after fork() the child must find the
        # wrappers of threads that no longer exist to discard their sockets.
        self.wrappers: dict[str, BaseDatabaseWrapper] = {}

    def connected(self, connection: BaseDatabaseWrapper) -> None:
        """Called on this thread when one of its own wrappers has connected."""
        # A pooled wrapper "connects" on every checkout (Django sends
        # connection_created each time): the pool counts real opens, not us.
        # The wrapper is still recorded, for stats and for fork.
        if not getattr(connection, "_dbbridge_pooled", False):
            self.opened[connection.alias] += 1
        self.wrappers[connection.alias] = connection

    def open_aliases(self) -> list[str]:
        return [alias for alias, conn in self.wrappers.items() if conn.connection is not None]

    def connections(self, aliases: tuple[str, ...] | None) -> list[BaseDatabaseWrapper]:
        """This thread's wrappers that ever connected: the only ones with anything
        to clean up, found without Django's (comparatively slow) thread-local lookups."""
        if aliases is None:
            return list(self.wrappers.values())
        return [conn for alias, conn in self.wrappers.items() if alias in aliases]


def count_connections(
    threads: Iterable[OwnerThread], retired_opened: Counter[str]
) -> tuple[dict[str, int], dict[str, int]]:
    """(opened, open now) per alias over ``threads``, with ``retired_opened`` counted in.

    Both dicts have every alias either one has, so they can be compared key by key.
    """
    opened = Counter(retired_opened)
    open_now: Counter[str] = Counter()
    for thread in threads:
        opened.update(thread.opened)
        open_now.update(thread.open_aliases())
    aliases = sorted(set(opened) | set(open_now))
    return {a: opened[a] for a in aliases}, {a: open_now[a] for a in aliases}


class _Worker(OwnerThread):
    """A pool thread."""

    def __init__(self, executor: DBExecutor, name: str) -> None:
        super().__init__(name)
        # A weak reference: a worker must not keep an abandoned executor alive.
        self.executor_ref = weakref.ref(executor)
        self.policy = executor._policy
        # Work is handed to a worker directly, through its inbox; None stops it.
        self.busy = False
        # The call running now: a loop's default executor handle must not wait
        # for a call running on the very thread that asks it to shut down
        # (see calls_running_on).
        self.current: _Item | None = None
        self.calls = 0
        self.errors = 0
        self.call_time = 0.0

    def main(self) -> None:
        executor = self.executor_ref()
        if executor is not None:
            executor._work(self)

    def connected(self, connection: BaseDatabaseWrapper) -> None:
        super().connected(connection)
        if self.policy.kind == "max_age":
            # Django set close_at from CONN_MAX_AGE just before sending the
            # signal; replacing it lets Django's own close_if_unusable_or_obsolete()
            # enforce the per-worker lifetime, with no bookkeeping of our own.
            connection.close_at = self.policy.connection_deadline(time.monotonic())


def _on_connect(connection: BaseDatabaseWrapper, thread: threading.Thread) -> None:
    # Only the thread's own wrappers: code running on it may connect a private
    # wrapper of its own (a monitoring connection, a raw second connection),
    # which is not the thread's to count, expire or clean up.
    if isinstance(thread, OwnerThread) and connection is connections[connection.alias]:
        thread.connected(connection)


on_connect(_on_connect)


# Runs one call: the executor's per-call wrapper, or a plain call on a request thread.
_Runner = Callable[
    [Callable[..., Any], tuple[Any, ...], Mapping[str, Any], "contextvars.Context | None"], Any
]


def run_plain(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    context: contextvars.Context | None,
) -> Any:
    """A runner without per-call cleanup (request threads clean up per request)."""
    return fn(*args, **kwargs) if context is None else context.run(fn, *args, **kwargs)


class _WorkItem:
    """A call for the pool's `concurrent.futures.Future` API.

    ``execute`` runs the call and keeps its outcome; ``deliver`` hands it over.
    They are separate so the worker can declare itself free in between: a
    caller woken by the result that submits again at once then finds this
    worker available instead of starting another thread (and connection).
    """

    __slots__ = ("args", "error", "fn", "future", "kwargs", "result")

    def __init__(
        self, future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.result: Any = None
        self.error: BaseException | None = None

    def execute(self, run: _Runner) -> bool:
        if not self.future.set_running_or_notify_cancel():
            return False
        try:
            self.result = run(self.fn, self.args, self.kwargs, None)
        except BaseException as exc:
            self.error = exc
        finally:
            # Drop the call's references before the worker waits again, so
            # nothing it passed in stays alive for as long as the thread idles.
            del self.fn, self.args, self.kwargs
        return True

    def deliver(self) -> None:
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.result)
        # Break a reference cycle with the exception (as CPython's pool does).
        self.result = self.error = None

    def cancel(self) -> None:
        self.future.cancel()

    def fail(self, error: BaseException) -> None:
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(error)


class _LoopItem:
    """A call awaited on an event loop.

    Skips ``concurrent.futures.Future`` and ``wrap_future``: the worker hands the
    outcome straight to the loop (through the loop's `Completions`, which
    batches the wake-ups), which is what makes ``db_call`` cheaper than
    ``run_in_executor``. Make it on the loop's thread.
    """

    __slots__ = ("args", "completions", "context", "error", "fn", "future", "kwargs", "result")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        context: contextvars.Context | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Any,
    ) -> None:
        self.completions = completions_for(loop)
        self.future = future
        self.context = context
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.result: Any = None
        self.error: BaseException | None = None

    def execute(self, run: _Runner) -> bool:
        # A plain read of the future's state from this thread: a call cancelled
        # before it started never runs. (If the cancellation lands a moment
        # later the call runs to completion and its result is dropped.)
        if self.future.cancelled():
            return False
        try:
            self.result = run(self.fn, self.args, self.kwargs, self.context)
        except BaseException as exc:
            self.error = exc
        finally:
            del self.fn, self.args, self.kwargs, self.context
        return True

    def deliver(self) -> None:
        # A loop closed while the call ran drops it: nobody is left to tell.
        self.completions.post(self.future, self.result, self.error)
        self.result = self.error = None

    def cancel(self) -> None:
        future, loop = self.future, self.completions.loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(future.cancel)
        except RuntimeError:
            pass

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.deliver()


_Item = _WorkItem | _LoopItem


class DBExecutor(ThreadPoolExecutor):
    """A thread pool whose threads never leak a Django database connection.

    A drop-in `concurrent.futures.ThreadPoolExecutor` (so asyncio accepts
    it as the default executor): every call submitted to it — through
    `submit`, `map`, `loop.run_in_executor`, `asyncio.to_thread` once
    installed as the default, or [`db_call`][async_dbbridge.db_call] — runs
    inside a wrapper that treats the call like a request:

    * before the call, connections past their lifetime or broken by an earlier
      error are closed and health checks are re-armed (`request_started`);
    * after the call, the [`Policy`][async_dbbridge.Policy] decides: honour
      `CONN_MAX_AGE` (default), always close, or a lifetime of the pool's own;
    * a call that raised a database error has its connections closed
      unconditionally; a call that left a transaction open is rolled back, its
      connection closed and a
      [`TransactionLeftOpenWarning`][async_dbbridge.TransactionLeftOpenWarning]
      names it.

    Workers close every connection they opened when they exit: on
    [`shutdown`][async_dbbridge.DBExecutor.shutdown], when idle longer than
    `idle_timeout`, and at interpreter exit. So open connections never exceed
    `max_workers` times the aliases used, and `shutdown(wait=True)` returns
    with none left.

    Args:
        max_workers: The most threads (and so connections per alias). Defaults
            to the standard library's `min(32, os.cpu_count() + 4)`.
        thread_name_prefix: Names the worker threads (`dbbridge-0`, ...).
        initializer: Called with `initargs` at the start of every worker. If
            it raises, the pool is broken, as in the standard library.
        initargs: Arguments for `initializer`.
        policy: A [`Policy`][async_dbbridge.Policy], or `"request"` / `"close"`.
        idle_timeout: Seconds a worker waits for work before it retires and
            closes its connections; `None` keeps workers until shutdown.
        databases: Aliases the per-call cleanup looks at; `None` (default)
            means every alias the thread has used. Workers close every alias
            when they exit, whatever this says.
        pooled: Take the workers' connections from the process's connection
            pool of each alias (bounded by `ASYNC_DBBRIDGE["POOL_SIZE"]`,
            shared with the ASGI wrapper's request threads) and give them back
            after every call, instead of each worker owning its own. The
            process-wide bridge is pooled. An executor you make is not, by
            default: a batch job on an explicit pool should not queue behind
            web traffic for connections, and its own `max_workers` already
            bounds what it opens. A pooled connection's lifetime is the
            alias's `CONN_MAX_AGE`, counted from when the pool opened it.

    Raises:
        ValueError: `max_workers`, `idle_timeout` or `policy` is invalid,
            `databases` names an alias that `settings.DATABASES` lacks, or
            `pooled=True` with a `Policy.max_age()` policy (the lifetime of
            pooled connections comes from `CONN_MAX_AGE`).
        TypeError: `initializer` is not callable, or `databases` is a string.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        thread_name_prefix: str = "dbbridge",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        policy: Policy | str = "request",
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        databases: Iterable[str] | None = None,
        pooled: bool = False,
    ) -> None:
        if max_workers is None:
            max_workers = min(32, (os.cpu_count() or 1) + 4)
        if not is_positive_int(max_workers):
            raise ValueError(f"max_workers must be a positive integer, not {max_workers!r}")
        if idle_timeout is not None and not (is_number(idle_timeout) and idle_timeout > 0):
            raise ValueError(
                f"idle_timeout must be a number of seconds > 0 or None, not {idle_timeout!r}"
            )
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {initializer!r}")
        # Only the public arguments: the base class's own worker machinery
        # (which changed in Python 3.14) is never started, because submit() and
        # shutdown() are ours.
        super().__init__(max_workers, thread_name_prefix)
        self._policy = Policy.coerce(policy)
        if pooled and self._policy.kind == "max_age":
            raise ValueError(
                "a pooled DBExecutor cannot take Policy.max_age(): the lifetime of pooled "
                "connections is each alias's CONN_MAX_AGE, counted from when the pool opened "
                "them. Use Policy.request() (give back after each call) or "
                "Policy.always_close(), or pooled=False."
            )
        self._pooled = bool(pooled)
        self._idle_timeout = float(idle_timeout) if idle_timeout is not None else None
        self._databases = _validate_aliases(databases)
        self._user_initializer = initializer
        self._user_initargs = initargs
        self._prefix = thread_name_prefix or "dbbridge"
        self._reset_state()
        _executors.add(self)

    def _reset_state(self) -> None:
        # The workers (LIFO idle stack, idle retirement: see _thread_cache);
        # its lock also guards the backlog and the flags below, which change
        # together with its idle stack.
        self._cache: ThreadCache[_Worker] = ThreadCache(
            functools.partial(_Worker, self), prefix=self._prefix, idle_timeout=self._idle_timeout
        )
        self._state_lock = self._cache.lock
        # Calls waiting because every worker is busy and the pool is full.
        self._backlog: deque[_Item] = deque()
        self._closing = False
        self._broken_reason: str | None = None
        self._retired_calls = 0
        self._retired_errors = 0
        self._retired_call_time = 0.0
        self._retired_opened: Counter[str] = Counter()

    # -- public API ---------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """The [`Policy`][async_dbbridge.Policy] applied after every call."""
        return self._policy

    @property
    def pooled(self) -> bool:
        """Whether the workers take their connections from the process's pools."""
        return self._pooled

    @property
    def max_workers(self) -> int:
        """The most worker threads (and so connections per alias) the pool runs."""
        return self._max_workers

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        """Schedule `fn(*args, **kwargs)`; its connections are cleaned up after it.

        Returns:
            A `concurrent.futures.Future` for the call's result.

        Raises:
            RuntimeError: The pool is shut down or broken.
        """
        future: Future[_T] = Future()
        self._enqueue(_WorkItem(future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls; workers finish the queue, close their connections, exit.

        With `wait=True` this returns once every worker has closed its
        connections. `cancel_futures=True` cancels calls that have not started.
        Called from one of the pool's own threads, it does not wait for that
        thread (which would wait for itself).
        """
        self._shutdown_sparing(wait, cancel_futures=cancel_futures, spare=())

    def _shutdown_sparing(
        self, wait: bool, *, cancel_futures: bool, spare: Collection[int]
    ) -> None:
        """``shutdown()``, not waiting for the workers whose thread ident is in ``spare``.

        A worker that runs the event loop being shut down (``asyncio.run()``
        called inside a call) waits for that shutdown to finish: joining it
        would wait for ever. Spared workers stop on their own once their call
        returns, closing their connections as every worker does.
        """
        with self._state_lock:
            self._closing = True
            if cancel_futures:
                while self._backlog:
                    self._backlog.popleft().cancel()
            # Idle workers stop now; busy ones stop once the backlog is done.
            for worker in self._cache.take_all_idle_locked():
                worker.inbox.put(None)
            workers = list(self._cache.alive)
        if wait:
            current = threading.current_thread()
            for worker in workers:
                if worker is not current and worker.ident not in spare:
                    worker.join()

    def _join(self, timeout: float | None) -> bool:
        """After `shutdown(wait=False)`: wait up to `timeout` for the workers to exit.

        Returns whether they all did (the calling thread's own excepted).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state_lock:
            workers = list(self._cache.alive)
        current = threading.current_thread()
        for worker in workers:
            if worker is current:
                continue
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                return False
        return True

    def stats(self) -> ExecutorStats:
        """A snapshot of the pool: threads, queue, calls and connections per alias."""
        with self._state_lock:
            workers = list(self._cache.alive)
            retired_opened = Counter(self._retired_opened)
            calls, errors = self._retired_calls, self._retired_errors
            call_time = self._retired_call_time
            closing = self._closing
        busy = 0
        for worker in workers:
            busy += worker.busy
            calls += worker.calls
            errors += worker.errors
            call_time += worker.call_time
        if self._pooled:
            opened, open_now, closed = _pooled_counts()
        else:
            opened, open_now = count_connections(workers, retired_opened)
            closed = {a: opened[a] - open_now[a] for a in opened}
        queued = len(self._backlog)
        return ExecutorStats(
            max_workers=self._max_workers,
            workers=len(workers),
            busy=busy,
            idle=len(workers) - busy,
            queued=queued,
            calls=calls,
            errors=errors,
            connections_open=open_now,
            connections_opened=opened,
            connections_closed=closed,
            policy=self._policy.kind,
            shutdown=closing,
            pooled=self._pooled,
            call_time=call_time,
        )

    # -- used by db_call ----------------------------------------------------

    def _submit_to_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> asyncio.Future[_T]:
        future: asyncio.Future[_T] = loop.create_future()
        self._enqueue(_LoopItem(loop, future, contextvars.copy_context(), fn, args, kwargs))
        return future

    # -- internals ----------------------------------------------------------

    def _enqueue(self, item: _Item) -> None:
        with self._state_lock:
            if self._broken_reason is not None:
                raise BrokenThreadPool(self._broken_reason)
            if self._closing:
                raise RuntimeError("cannot schedule new calls after shutdown")
            threads = self._cache
            idle = threads.pop_idle_locked()
            if idle is not None:
                idle.inbox.put(item)
                return
            if len(threads.alive) >= self._max_workers:
                self._backlog.append(item)
                return
            worker = threads.new_locked()
            worker.inbox.put(item)
        # "can't start new thread" (a thread or memory limit): the caller gets
        # the error, as from the standard library's pool, and the cache forgets
        # the thread: a phantom worker would fill the pool (later calls queued
        # for ever) and make shutdown join a thread never started. Its call
        # goes with it, never run and never reported. Started outside the
        # lock, as a request thread is: the one pause a submit may make.
        threads.start(worker)

    def _next_item(self, worker: _Worker) -> _Item | object | None:
        """After a call: the next queued call, _STOP, or None (now idle)."""
        with self._state_lock:
            if self._backlog:
                return self._backlog.popleft()
            if self._closing or self._broken_reason is not None:
                return _STOP
            self._cache.park_locked(worker)
            return None

    def _run_call(
        self,
        worker: _Worker,
        fn: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        context: contextvars.Context | None = None,
    ) -> _T:
        """The per-call wrapper: prepare like ``request_started``, run, clean up."""
        aliases = self._databases
        worker.calls += 1
        # Two clock reads per call, metrics or not: exporters read the sum
        # (ExecutorStats.call_time) when they collect, so a call records
        # nothing else for them.
        started = time.perf_counter()
        # A pooled worker holds nothing between calls (except while it runs a
        # backlog, see _cleanup_pooled): nothing can expire.
        cleanup = after_call if self._pooled else cleanup_after_call
        if not self._pooled:
            expire_connections(worker.connections(aliases), time.monotonic())
        try:
            result = fn(*args, **kwargs) if context is None else context.run(fn, *args, **kwargs)
        except BaseException as exc:
            worker.errors += 1
            try:
                cleanup(self._policy, error=exc, fn=fn, conns=worker.connections(aliases))
            except Exception:
                # Never let a cleanup problem replace the caller's exception.
                logger.warning("connection cleanup after a failed call raised", exc_info=True)
            worker.call_time += time.perf_counter() - started
            raise
        try:
            if self._pooled:
                # Read after the call: calls queued meanwhile are what it may keep
                # its connection for (a plain read; a stale answer costs one
                # checkout, or keeps the connection until the worker idles).
                after_call(
                    self._policy,
                    error=None,
                    fn=fn,
                    conns=worker.connections(aliases),
                    busy=bool(self._backlog),
                )
            else:
                cleanup_after_call(
                    self._policy, error=None, fn=fn, conns=worker.connections(aliases)
                )
        except Exception as exc:
            # The call's own work succeeded (and in autocommit it is committed):
            # reporting failure now would invite a retry of work that is done.
            # The connection is already forgotten, so the next call reconnects.
            if isinstance(exc, Warning):
                raise
            logger.warning("connection cleanup after %s raised", describe(fn), exc_info=True)
        worker.call_time += time.perf_counter() - started
        return result

    @property
    def name(self) -> str:
        """The executor's thread name prefix: what metrics call it."""
        return self._prefix

    def _work(self, worker: _Worker) -> None:
        try:
            if self._pooled and not self._make_pooled(worker):
                return
            if self._user_initializer is not None:
                try:
                    self._user_initializer(*self._user_initargs)
                except BaseException:
                    logger.critical("DBExecutor worker initializer failed", exc_info=True)
                    self._break(
                        "A thread initializer failed, the thread pool is not usable anymore",
                        worker,
                    )
                    return
            self._serve(worker)
        finally:
            # Settings never loaded: Django cannot have connected anything in
            # this process, and asking its connection handler would load them
            # — ImproperlyConfigured, printed from the exiting thread, in a
            # script that uses the pool without configuring Django.
            if django_settings.configured:
                if self._pooled:
                    give_back_all(worker.wrappers.values())
                close_all_for_exit()
            with self._state_lock:
                self._retired_calls += worker.calls
                self._retired_errors += worker.errors
                self._retired_call_time += worker.call_time
                self._retired_opened.update(worker.opened)
                worker.calls = worker.errors = 0
                worker.call_time = 0.0
                worker.opened.clear()
            self._cache.exited(worker)

    def _make_pooled(self, worker: _Worker) -> bool:
        """At a pooled worker's start: its wrappers take connections from the pools."""
        try:
            for alias in connections:
                conn = connections[alias]
                make_pooled(conn)
                # Known before the first connect, so cleanup and fork find it.
                worker.wrappers[alias] = conn
        except Exception:
            # E.g. an alias on Django's own pool (OPTIONS["pool"]): opening
            # connections outside the bound would break the pool's promise.
            logger.critical(
                "DBExecutor worker could not make its connections pooled", exc_info=True
            )
            self._break("A worker could not make its connections pooled", worker)
            return False
        return True

    def _serve(self, worker: _Worker) -> None:
        threads = self._cache
        run: _Runner = functools.partial(self._run_call, worker)
        item: _Item | None = worker.inbox.get()  # a new worker is started with its first call
        while item is not None:
            worker.busy = True
            worker.current = item
            try:
                ran = item.execute(run)
            finally:
                worker.busy = False
                worker.current = None
                # Become available before delivering the result: a caller that
                # submits again as soon as it wakes then reuses this thread and
                # its connection instead of starting another.
                following = self._next_item(worker)
            if ran:
                item.deliver()
            del item
            if following is _STOP:
                return
            if following is not None:
                item = following  # type: ignore[assignment]  # an _Item
                continue
            if self._pooled:
                # Idle now: a connection kept through a backlog goes back.
                give_back_all(worker.wrappers.values())
            got = threads.next_item(worker)
            if got is RETIRE:
                return  # idle for idle_timeout: off the idle stack already
            item = got

    def _break(self, reason: str, worker: _Worker) -> None:
        """A worker's initializer failed: fail every waiting call, stop idle workers."""
        error = BrokenThreadPool(reason)
        with self._state_lock:
            self._broken_reason = reason
            pending: list[_Item] = list(self._backlog)
            self._backlog.clear()
            for idle in self._cache.take_all_idle_locked():
                idle.inbox.put(None)
        while True:
            try:
                item = worker.inbox.get_nowait()
            except Empty:
                break
            if item is not None:
                pending.append(item)
        for item in pending:
            item.fail(error)

    def __repr__(self) -> str:
        state = "shutdown" if self._closing else "running"
        return (
            f"<{type(self).__name__} {state} max_workers={self._max_workers} "
            f"workers={len(self._cache.alive)} policy={self._policy.kind}>"
        )


def _pooled_counts() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(opened, open now, closed) per alias, from the process's connection pools."""
    pools = pool_stats()
    return (
        {alias: pool.opened for alias, pool in pools.items()},
        {alias: pool.in_use + pool.idle for alias, pool in pools.items()},
        {alias: pool.closed for alias, pool in pools.items()},
    )


def calls_running_on(idents: Collection[int]) -> set[Future[Any]]:
    """Futures of the ``submit()`` calls that workers on these threads are running now.

    For a shutdown that must not wait for its own thread: such a call cannot
    finish before the shutdown returns.
    """
    running: set[Future[Any]] = set()
    for thread in threading.enumerate():
        if isinstance(thread, _Worker) and thread.ident in idents:
            item = thread.current
            if isinstance(item, _WorkItem):
                running.add(item.future)
    return running


def _validate_aliases(databases: Iterable[str] | None) -> tuple[str, ...] | None:
    if databases is None:
        return None
    if isinstance(databases, str):
        raise TypeError(
            f"databases must be an iterable of aliases such as ({databases!r},), not a string"
        )
    aliases = tuple(databases)
    from django.conf import settings
    from django.db import connections

    if settings.configured:
        known = set(connections.settings)
        unknown = [alias for alias in aliases if alias not in known]
        if unknown:
            raise ValueError(
                f"unknown database alias(es) {', '.join(map(repr, unknown))}; "
                f"DATABASES defines {', '.join(map(repr, sorted(known)))}"
            )
    return aliases


def _reinit_after_fork() -> None:
    """In a forked child (called by ``_fork``): the parent's workers do not exist here.

    Their connections are the parent's sessions: discarded without network I/O
    (the workers' ``wrappers`` kept them alive through the fork). Every executor
    then starts afresh with no threads and zeroed counters; its next call starts
    a worker. One that was shut down or broken in the parent stays so.
    """
    for executor in list(_executors):
        for worker in list(executor._cache.alive):
            for conn in worker.wrappers.values():
                discard_inherited(conn)
        closing, broken = executor._closing, executor._broken_reason
        executor._reset_state()
        executor._closing, executor._broken_reason = closing, broken


def _shutdown_all_at_exit() -> None:
    for executor in list(_executors):
        try:
            executor.shutdown(wait=True)
        except Exception:
            logger.warning("shutting down %r at exit failed", executor, exc_info=True)


# In a child, _fork discards the inherited connections of every thread, then
# calls the registered hooks in their order.
_fork.on_child(_reinit_after_fork, order=_fork.ORDER_EXECUTORS)
_exit.on_exit(_shutdown_all_at_exit, order=_exit.ORDER_EXECUTORS)


def call_counts() -> dict[str, tuple[int, int, float]]:
    """(calls, errors, call time) per executor name, over the live `DBExecutor`s.

    What the metrics integrations report: executors sharing a thread name
    prefix are summed under it.
    """
    totals: dict[str, tuple[int, int, float]] = {}
    for executor in list(_executors):
        snapshot = executor.stats()
        calls, errors, seconds = totals.get(executor.name, (0, 0, 0.0))
        totals[executor.name] = (
            calls + snapshot.calls,
            errors + snapshot.errors,
            seconds + snapshot.call_time,
        )
    return totals
