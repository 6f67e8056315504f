"""A request's binding to one request thread: the executor of its `ThreadSensitiveContext`.

The ASGI wrapper runs each request inside
``ThreadSensitiveContext(executor=RequestBinding(...))`` (asgiref >= 3.13), so
every thread-sensitive ``sync_to_async`` call of the request — Django's request
signals, sync middleware and views, async ORM methods — is submitted here. The
binding takes a thread from the elastic `RequestThreads` set on the first such
call (a request with no sync work takes none), runs every later call on that
same thread in submission order (what ``ThreadSensitiveContext`` requires of its
executor, and what keeps request-scoped ``threading.local`` state working), and
at the end queues the end-of-request cleanup as the thread's last job, after
which the thread goes back to the set by itself — or, when that job would find
nothing to do, gives the thread back at once.

The binding's life is an explicit state machine (`BindingState`), advanced
in one method (`RequestBinding._advance`) under one lock:

```
UNBOUND --first call--> BOUND --end()--> ENDING --cleanup ran on the thread--> DONE
   |                      |                                                     ^
   |                      +--end(), nothing queued, no connection held----------+
   +-------------------------------end()----------------------------------------+
```

The middle path is the common one (hold mode "transaction", every call
awaited): the cleanup would find nothing to do, so the thread goes back to the
set from `end()` itself, without a job on it and a round trip to the loop.

This module imports nothing of the library at run time: the pool imports
`current_request_state` from here, and the request threads import the pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

if TYPE_CHECKING:
    from ._request_threads import RequestThread, RequestThreads

__all__ = ("BindingState", "RequestBinding", "RequestState", "current_request_state")

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(slots=True)
class RequestState:
    """What the library learns about one ASGI request while it runs (mutable).

    The ASGI wrapper makes one per request and sets it in
    `current_request_state` around the app; asgiref copies the context into
    every sync call, so code on the request thread (the pool's checkout) sees
    the same object and marks it, and the wrapper reads the marks on the loop.

    Attributes:
        pool_timed_out: A sync call of this request waited for a pooled
            connection longer than the checkout timeout (the pool raised
            `PoolTimeout`): the wrapper turns Django's 500 into a 503. Also
            set, with a 500 of its own, by a sync request that could not
            start because `SYNC_REQUESTS` were running (`_gate`).
        pool_timeout: That `PoolTimeout` (the first, if several), whose
            alias, pool size and timeout the 503's log line names; or the
            driver's error when the server refused a new connection because
            it was full ("too many clients"), the same 503; or the gate's
            `SyncRequestsBusy`.
        unavailable_alias: The alias whose connection could not be had.
    """

    pool_timed_out: bool = False
    #: The `PoolTimeout` itself (the first one), for the 503's log line.
    pool_timeout: BaseException | None = None
    unavailable_alias: str | None = None


#: The state of the ASGI request running in this context; `None` outside one.
current_request_state: contextvars.ContextVar[RequestState | None] = contextvars.ContextVar(
    "async_dbbridge_request_state", default=None
)


class BindingState(enum.Enum):
    """Where a [`RequestBinding`][async_dbbridge._binding.RequestBinding] is in its life."""

    #: No sync call yet, so no thread: a request may never need one.
    UNBOUND = "unbound"
    #: A request thread runs the request's calls, one at a time, in order.
    BOUND = "bound"
    #: ``end()`` queued the cleanup behind the request's last call; the thread
    #: has not run it yet. Calls submitted now go to the fallback.
    ENDING = "ending"
    #: The request is over: the cleanup ran and the thread went back (or the
    #: request never had one). Calls submitted now go to the fallback.
    DONE = "done"


class _Event(enum.Enum):
    CALL = "call"  # submit(): a sync call of the request
    END = "end"  # end(): the app returned
    FINISHED = "finished"  # on the thread: cleanup done, the thread is leaving


def _completed(result: list[str]) -> Future[list[str]]:
    future: Future[list[str]] = Future()
    future.set_result(result)
    return future


class RequestBinding(Executor):
    """The executor of one request's `ThreadSensitiveContext`: one thread, taken lazily.

    These two run a request's sync work the same way, on one thread, in
    order, except that the second takes the thread from a reused elastic set
    (no thread started per request) and gives the request's connections back
    to the pool when it ends:

    ```python
    # Not runnable as is: two versions of the wrapper's call into the app.
    async with ThreadSensitiveContext():
        await app(scope, receive, send)

    binding = RequestBinding(request_threads, fallback=bridge)
    async with ThreadSensitiveContext(executor=binding):
        await app(scope, receive, send)
    await asyncio.wrap_future(binding.end())
    ```

    **Lazy:** the thread is acquired on the first `submit()`; acquiring never
    waits for a busy thread (the set starts one). A request that makes no
    thread-sensitive call takes no thread.

    **Late calls:** once `end()` has been called (states `ENDING` and
    `DONE`), calls go to `fallback` — the process-wide bridge, which cleans up
    after each call — or, without one, raise `RuntimeError`. They cannot
    queue behind the cleanup: the thread goes back to the set right after it.
    The request's own calls all come before `end()`, which the wrapper calls
    once the app has returned, so after Django's `response.close()` ran on
    the thread. Late calls come from:

    * a task the request spawned and did not await (`asyncio.create_task()`
      in an async view) making a thread-sensitive call after `end()` while
      the `ThreadSensitiveContext` is still entered (once it has exited,
      asgiref itself rejects such calls with `RuntimeError`);
    * code that kept this executor and submits to it directly
      (`loop.run_in_executor(binding, ...)`).

    Args:
        threads: The [`RequestThreads`][async_dbbridge._request_threads.RequestThreads]
            set to take the thread from.
        fallback: Runs calls submitted after `end()`; `None`: they raise.
    """

    def __init__(self, threads: RequestThreads, *, fallback: Executor | None = None) -> None:
        self._threads = threads
        self._fallback = fallback
        #: The request's `RequestState`: the wrapper sets it in
        #: `current_request_state` around the app.
        self.request_state = RequestState()
        # One lock for the state, the thread and the queueing of calls on it:
        # a call is either queued before the end-of-request job, or it sees
        # ENDING/DONE and goes to the fallback — never behind the cleanup.
        self._lock = threading.Lock()
        self._phase = BindingState.UNBOUND
        self._thread: RequestThread | None = None
        self._thread_name: str | None = None
        self._ended: Future[list[str]] | None = None

    @property
    def state(self) -> BindingState:
        """The binding's current `BindingState`."""
        return self._phase

    @property
    def thread_name(self) -> str | None:
        """The name of the thread that serves (or served) this request, if it took one."""
        return self._thread_name

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        """Run `fn(*args, **kwargs)` on the request's thread, after its earlier calls.

        Never blocks: the thread is taken (or started) without waiting, and
        the call is queued on it. Called on an event loop — as
        `ThreadSensitiveContext` does, through `loop.run_in_executor()` — it
        returns the loop's own `asyncio.Future` (which `run_in_executor`
        passes through unchanged), completed by the thread with a single
        `call_soon_threadsafe`; called anywhere else, a
        `concurrent.futures.Future`.

        Raises:
            RuntimeError: The request has ended and there is no fallback, or
                no thread could be started.
        """
        future = self._advance(_Event.CALL, (fn, args, kwargs))
        if future is not None:
            return cast("Future[_T]", future)
        fallback = self._fallback
        if fallback is None:
            raise RuntimeError(
                f"this request has ended (binding {self._phase.value}); its thread takes "
                "no more calls and the binding has no fallback executor"
            )
        return fallback.submit(fn, *args, **kwargs)

    def end(self) -> Future[list[str]]:
        """The request is over: clean up on its thread after its last call, then release it.

        Call it once the app has returned (after Django's `response.close()`),
        from any thread; calling it again returns the same future. The
        cleanup rolls back a transaction the request left open and gives
        every connection back, on the request's thread (the only one that
        may touch them); then the thread goes back to the set — whether or not
        anybody waits for the future, so a cancelled request loses no thread.
        When every call of the request is finished and its thread holds no
        connection (the usual case with hold mode "transaction"), there is
        nothing to clean up: the thread goes back at once, without a job.

        Returns:
            A future for the aliases whose transaction was left open and
            rolled back, done once the thread has gone back (at once if the
            request never took a thread or left nothing to clean up). It is
            never cancelled.
        """
        ended = self._advance(_Event.END)
        assert ended is not None  # END always has an outcome
        return ended

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """`end()` the request (the `Executor` API); `ThreadSensitiveContext` never calls it.

        With `wait`, blocks until the thread has cleaned up and gone back. Calls
        already queued always run: they belong to the request, in order.

        Raises:
            RuntimeError: `wait=True` on a thread running an event loop: a
                queued call may be waiting for that loop (`async_to_sync`), so
                blocking it could deadlock; await `end()`'s future instead.
        """
        if wait:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                raise RuntimeError(
                    "RequestBinding.shutdown(wait=True) would block the event loop; "
                    "use 'await asyncio.wrap_future(binding.end())'"
                )
        ended = self.end()
        if wait:
            ended.result()

    def _advance(
        self, event: _Event, call: tuple[Callable[..., Any], tuple[Any, ...], Any] | None = None
    ) -> Future[Any] | None:
        """Every state transition, under the lock.

        CALL returns the call's future, or `None` when it must go to the
        fallback; END returns the end future; FINISHED returns `None`.
        """
        with self._lock:
            phase = self._phase
            if event is _Event.CALL:
                assert call is not None
                if phase is BindingState.UNBOUND:
                    # Never waits for a free thread: starts one if none is
                    # idle. If that fails it raises, and the binding stays
                    # UNBOUND so the request's next call tries again.
                    thread = self._threads.acquire()
                    self._thread, self._thread_name = thread, thread.name
                    self._phase = BindingState.BOUND
                elif phase is not BindingState.BOUND:
                    return None
                assert self._thread is not None
                # Queued under the lock, so END cannot slip in between the
                # phase check and the put.
                return self._thread.submit(*call)
            if event is _Event.END:
                if phase is BindingState.UNBOUND:
                    self._phase = BindingState.DONE
                    self._ended = _completed([])
                elif phase is BindingState.BOUND:
                    bound = self._thread
                    assert bound is not None
                    if bound.done_with_request():
                        # The common case: every call delivered, connections
                        # already back in the pool. Waking the thread for an
                        # empty cleanup would cost a round trip per request.
                        self._phase = BindingState.DONE
                        self._thread = None
                        self._threads.release(bound)
                        self._ended = _completed([])
                    else:
                        self._phase = BindingState.ENDING
                        self._ended = bound.end_request(self._finished)
                assert self._ended is not None
                return self._ended
            # FINISHED, on the thread: its cleanup ran and it is about to go
            # back to the set, where another request may take it at once.
            if phase is BindingState.ENDING:
                self._phase = BindingState.DONE
                self._thread = None
            return None

    def _finished(self) -> None:
        self._advance(_Event.FINISHED)

    def __repr__(self) -> str:
        thread = f" thread={self._thread_name}" if self._thread_name else ""
        return f"<{type(self).__name__} {self._phase.value}{thread}>"
