"""Which DBExecutor serves a loop: the one installed on it, or the process-wide bridge.

A loop's default executor is never the shared pool itself but a per-loop handle
onto it (``LoopExecutor``), because asyncio treats the default executor as the
loop's own: ``asyncio.run()`` ends with ``loop.shutdown_default_executor()``,
which calls ``shutdown(wait=True)`` on it (from a helper thread, on Python 3.11
to 3.13), and ``loop.close()`` calls ``shutdown(wait=False)``. On the shared
bridge that would stop it for every other loop, and the join would deadlock
when the loop runs inside a bridge call (``asyncio.to_thread(asyncio.run, ...)``,
``async_to_sync`` from a bridge thread): it would wait for the worker that
waits for it. The handle's shutdown ends only what belongs to its loop.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from typing import Any, ParamSpec, TypeVar

from . import _compat
from ._executor import DBExecutor, calls_running_on
from ._lending import close_pools

__all__ = ("get_bridge_executor", "install_default_executor", "reset_bridge_executor")

_P = ParamSpec("_P")
_T = TypeVar("_T")

_lock = threading.Lock()
_bridge: DBExecutor | None = None
# The handle install_default_executor() made each loop's default. Weak keys: a
# closed, dropped loop must not keep its handle (or executor) alive.
_installed: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopExecutor] = (
    weakref.WeakKeyDictionary()
)
# Handles not shut down yet, to know when the last loop using an executor of
# the caller's ends. Weak: a loop dropped without being closed ends nothing.
_open_handles: weakref.WeakSet[LoopExecutor] = weakref.WeakSet()


def get_bridge_executor() -> DBExecutor:
    """The process-wide [`DBExecutor`][async_dbbridge.DBExecutor], from `settings.ASYNC_DBBRIDGE`.

    Created on first use. Its workers take their connections from the
    process's pools (one per alias, `POOL_SIZE` connections, shared with the
    ASGI wrapper's request threads) and give them back after every call;
    under `POLICY = "max_age"` they own theirs instead. Event loops ending
    never shut it down; it closes at interpreter exit, on
    [`reset_bridge_executor`][async_dbbridge.reset_bridge_executor] and on the
    ASGI wrapper's lifespan shutdown. After that, the next call builds a fresh
    one.
    """
    global _bridge
    bridge = _bridge
    if bridge is not None and not bridge._closing:
        return bridge
    with _lock:
        if _bridge is None or _bridge._closing:
            from .conf import get_settings

            settings = get_settings()
            # Pooled: db_call and the loops' default executor share each
            # alias's bounded pool with the request threads. Except under
            # POLICY = "max_age", which asks for worker-owned connections
            # with a lifetime of their own (pooled ones live CONN_MAX_AGE).
            _bridge = DBExecutor(
                **settings.executor_kwargs(), pooled=settings.policy.kind != "max_age"
            )
        return _bridge


def reset_bridge_executor(*, wait: bool = True) -> None:
    """Shut the process-wide bridge down and close the connection pools; next use rebuilds both.

    Idle pooled connections are closed at once; those in use (by a request
    thread, or a bridge call still running with `wait=False`) when given back.

    Loops it was installed on keep working: their next `db_call`,
    `asyncio.to_thread` or `run_in_executor(None, ...)` runs on the new bridge.

    Args:
        wait: Return only once every worker has closed its connections. Call it
            with `wait=True` off the event loop: it blocks the calling thread.
    """
    global _bridge
    with _lock:
        bridge, _bridge = _bridge, None
    if bridge is not None:
        bridge.shutdown(wait=wait)
    # The pooled bridge's connections are the pools': close those too (idle
    # ones now, those in use when given back; never waiting for them, which
    # could be a request's for as long as it runs). The next use of an alias
    # builds a fresh pool.
    close_pools(0)


class LoopExecutor(ThreadPoolExecutor):
    """One event loop's default executor: a handle onto a shared `DBExecutor`.

    Calls go to ``target``, or with ``target=None`` to the process-wide bridge
    as it is at each call, so a loop keeps working after the bridge is reset.
    ``shutdown()`` — what the loop calls when it ends — stops this handle and
    waits only for the calls submitted through it; the pool itself is shut
    down only if it is an executor of the caller's and no other loop still
    uses it. It never waits for the thread calling it, nor for the thread
    running the loop (a worker, when the loop runs inside a call, which is
    waiting for the loop to end).

    A subclass of ``ThreadPoolExecutor`` only because
    ``loop.set_default_executor()`` accepts nothing else; it starts no
    threads, as ``submit`` and ``shutdown`` are its own.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, target: DBExecutor | None) -> None:
        super().__init__(max_workers=1)
        self._loop_ref = weakref.ref(loop)
        # The thread running the loop, tracked here rather than read from the
        # loop (asyncio's private _thread_id; uvloop has none): known when the
        # handle is installed from the running loop, as the ASGI wrapper and
        # most callers do, or at the loop's first call through it.
        self._loop_thread: int | None = _running_thread_of(loop)
        self._target = target
        self._calls_lock = threading.Lock()
        # Calls submitted through this handle and not done yet: what the
        # loop's end waits for. A done callback takes each one out.
        self._pending: set[Future[Any]] = set()
        self._closed = False

    @property
    def executor(self) -> DBExecutor:
        """The pool the calls run on."""
        return self._target if self._target is not None else get_bridge_executor()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        if self._loop_thread is None:
            self._loop_thread = _running_thread_of(self._loop_ref())
        with self._calls_lock:
            # Checked and recorded under one lock, so a shutdown either refuses
            # the call or waits for it.
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            future = self.executor.submit(fn, *args, **kwargs)
            self._pending.add(future)
        # Outside the lock: an already finished call runs the callback here.
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future[Any]) -> None:
        with self._calls_lock:
            self._pending.discard(future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._calls_lock:
            first = not self._closed
            self._closed = True
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()  # only calls that have not started
        owned: DBExecutor | None = None
        if first:
            with _lock:
                _open_handles.discard(self)
                # An executor of the caller's belongs to the loops it is
                # installed on: the last one to end shuts it down. (Two ending
                # at once may both do it; a second shutdown is harmless.)
                target = self._target
                if target is not None and not any(
                    h._target is target and not h._closed for h in _open_handles
                ):
                    owned = target
        spare = self._spared_threads() if wait else frozenset()
        if owned is not None:
            owned._shutdown_sparing(wait, cancel_futures=cancel_futures, spare=spare)
        elif wait:
            running_here = calls_running_on(spare)
            wait_for_futures([f for f in pending if f not in running_here])

    def _spared_threads(self) -> frozenset[int]:
        """The threads a shutdown must not wait for: its own, and the loop's."""
        idents = {threading.get_ident()}
        # asyncio.run() shuts the default executor down from a helper thread
        # while the loop still runs, so when the loop runs inside a pool call,
        # that worker is busy waiting for this very shutdown.
        if self._loop_thread is not None:
            idents.add(self._loop_thread)
        return frozenset(idents)

    def __repr__(self) -> str:
        state = "shutdown" if self._closed else "running"
        target = "the process-wide bridge" if self._target is None else repr(self._target)
        return f"<{type(self).__name__} {state} onto {target}>"


def _running_thread_of(loop: asyncio.AbstractEventLoop | None) -> int | None:
    """The calling thread's ident if `loop` is the loop running in it, else None."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return threading.get_ident() if running is loop else None


def _loop_default(loop: asyncio.AbstractEventLoop) -> Executor | None:
    """The loop's default executor: ours if we installed one, else what asyncio says."""
    handle = _installed.get(loop)
    if handle is not None and not handle.closed:
        return handle
    return _compat.loop_default_executor(loop)


def executor_for_loop(loop: asyncio.AbstractEventLoop) -> DBExecutor:
    """The executor `db_call` uses on ``loop``."""
    handle = _installed.get(loop)
    if handle is not None:
        return handle.executor
    default = _loop_default(loop)
    if isinstance(default, LoopExecutor):
        return default.executor
    if isinstance(default, DBExecutor):
        return default
    return get_bridge_executor()


def install_default_executor(
    executor: DBExecutor | None = None, *, loop: asyncio.AbstractEventLoop | None = None
) -> DBExecutor:
    """Make a [`DBExecutor`][async_dbbridge.DBExecutor] the default executor of an event loop.

    After this, `loop.run_in_executor(None, fn)`, `asyncio.to_thread(fn)`
    and `sync_to_async(fn, thread_sensitive=False)` on that loop all run
    with connection cleanup, and so does `db_call`.

    **When the loop ends** (`asyncio.run()` returning, `loop.close()`), it
    waits for the calls it submitted and nothing else. The process-wide bridge
    is shared by every loop and stays up (it closes at interpreter exit, on
    [`reset_bridge_executor`][async_dbbridge.reset_bridge_executor] or on the
    ASGI lifespan shutdown). An executor you pass is shut down, closing its
    connections, when the last loop it is installed on ends. Neither ever
    waits for the thread running the loop: a loop started inside a pool call
    (`asyncio.to_thread(asyncio.run, main())`) ends without a deadlock.

    Args:
        executor: The executor to install; by default the process-wide bridge.
        loop: The loop; by default the running one.

    Returns:
        The executor whose threads now run the loop's default calls. Calling
            again with the same executor does nothing. The previous default (unless
            it is the process-wide bridge, which other loops share) is shut down
            without waiting: its running calls finish and its connections close,
            but waiting would block the loop.

    Raises:
        RuntimeError: `loop` is not given and no event loop is running.
        TypeError: `executor` is not a [`DBExecutor`][async_dbbridge.DBExecutor].
    """
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "install_default_executor() needs a running event loop, or pass loop="
            ) from None
    if executor is not None and not isinstance(executor, DBExecutor):
        raise TypeError(
            f"install_default_executor() takes a DBExecutor, not {type(executor).__name__}"
        )
    bridge = _bridge
    # The bridge passed explicitly is still the shared bridge: a loop must not
    # take it down with it.
    target = None if executor is None or executor is bridge else executor
    previous = _loop_default(loop)
    if isinstance(previous, LoopExecutor) and not previous.closed and previous._target is target:
        _installed[loop] = previous
        return previous.executor
    handle = LoopExecutor(loop, target)
    with _lock:
        _open_handles.add(handle)
    loop.set_default_executor(handle)
    _installed[loop] = handle
    if previous is not None and previous is not executor and previous is not bridge:
        # The loop would have shut its default down when it ended; now that it
        # is replaced nobody will, so do it here. A previous handle onto the
        # shared bridge only stops taking calls; one onto an executor of the
        # caller's shuts it down if no other loop uses it.
        previous.shutdown(wait=False)
    return handle.executor
