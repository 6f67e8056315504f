"""The ASGI wrapper: lifespan and request lanes around Django's `ASGIHandler`.

In `asgi.py`, replace Django's `get_asgi_application` with this one:

```python
# asgi.py
from async_dbbridge.asgi import get_asgi_application

application = get_asgi_application()
```

Each HTTP request then runs its sync work (request signals, sync middleware and
views, async ORM calls) on a *lane*: a long-lived thread borrowed for the
request, whose connections the next request reuses under `CONN_MAX_AGE`. On
lifespan startup the process-wide bridge becomes the loop's default executor;
on shutdown every lane and bridge thread closes its connections.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async

from ._connections import TransactionLeftOpenWarning
from ._executor import DBExecutor, _deliver
from ._install import get_bridge_executor, install_default_executor
from ._lanes import LANES_SUPPORTED, LaneSet, current_request_lane, end_request_cleanup
from .conf import DEFAULT_SHUTDOWN_TIMEOUT, BridgeSettings, get_settings

__all__ = ("DBBridgeASGIApp", "get_asgi_application")

logger = logging.getLogger("async_dbbridge")

Scope = dict[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: How the wrapper serves HTTP requests: on lanes, or (asgiref < 3.13, or
#: ``LANES=0``) on asgiref's per-request thread, closed at request end.
Mode = Literal["lanes", "per-request"]


def get_asgi_application() -> DBBridgeASGIApp:
    """Django's `get_asgi_application()`, wrapped in a `DBBridgeASGIApp`.

    Sets Django up exactly as Django's own function does (`django.setup(set_prefix=False)`,
    the script prefix comes from each request's `root_path`), and wraps its
    handler in [`DBBridgeASGIApp`][async_dbbridge.asgi.DBBridgeASGIApp].
    """
    import django
    from django.core.handlers.asgi import ASGIHandler

    django.setup(set_prefix=False)
    return DBBridgeASGIApp(ASGIHandler())


class DBBridgeASGIApp:
    """Wrap an ASGI application so its requests never strand a database connection.

    These two are equivalent, except that the second reuses connections under
    `CONN_MAX_AGE` and leaves none behind:

    ```python
    # Not runnable: two versions of one line of asgi.py, where django is imported.
    application = django.core.asgi.get_asgi_application()
    application = DBBridgeASGIApp(django.core.asgi.get_asgi_application())
    ```

    **HTTP:** each request runs inside `ThreadSensitiveContext(executor=lane)`:
    every thread-sensitive `sync_to_async` call it makes — sync middleware
    (`MiddlewareMixin` included), sync views, `aget()`/`acreate()`, the
    project's request-signal receivers... — runs on one lane thread, borrowed
    lazily on the request's first such call and given back as soon as
    Django's `response.close()` (which sends `request_finished`) returns.
    Django's own request-signal receivers stand aside in lane requests (the
    lane does their work when bound and given back), so a request with no
    sync work of its own — a streaming or long-polling async view — takes no
    lane at all. A transaction the request left open is rolled back and
    reported with
    [`TransactionLeftOpenWarning`][async_dbbridge.TransactionLeftOpenWarning].
    [`db_call`][async_dbbridge.db_call] and the
    default executor use the bridge, a separate pool, so they never wait for
    a lane; so do the sync calls of a request that has no lane left to share
    (after its lane was given back, or, without one, once its response is
    complete).

    **All lanes busy** (`LANE_FULL`): `"wait"` (the default) queues the
    request, without blocking the loop, until a lane is free: a warm lane
    beats a new connection, and connections stay within `LANES` +
    `MAX_WORKERS` per alias. A request holds its lane from its first sync
    call to its end, though, so a few long ones (streaming to slow clients,
    long polls behind sync middleware) could stall the others: a request that
    has waited `LANE_WAIT_TIMEOUT`
    seconds (default 1; `None`: for ever) runs on a temporary thread whose
    connections are closed when it ends. `"temporary"` does that at once,
    never waiting, at the price of a connect per request beyond the lanes.

    **Lifespan:** answered here, not passed on (Django's handler rejects it).
    Startup installs the process-wide bridge as the loop's default executor
    and sets up the lanes; shutdown stops lending lanes, waits up to
    `SHUTDOWN_TIMEOUT` seconds for in-flight work without blocking the loop,
    and closes every lane's and bridge worker's connections. Without lifespan
    (`--lifespan off`) the same setup happens on the first HTTP request of
    each event loop; call [`aclose`][async_dbbridge.asgi.DBBridgeASGIApp.aclose]
    yourself to shut down.

    **Other scopes** (`websocket`...) go to the wrapped app untouched.

    With asgiref < 3.13 (no `ThreadSensitiveContext(executor=...)`) or
    `LANES=0` there are no lanes: each request keeps asgiref's own
    per-request thread, and its connections are closed when the request ends.
    The keys named here are described in [Settings](settings.md).

    Args:
        app: The ASGI application to wrap, usually Django's `ASGIHandler`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._mode: Mode | None = None
        self._lanes: LaneSet | None = None
        self._shutdown_timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT
        # The executor this app installed on each loop it has served. Weak
        # keys: a finished loop must not be kept alive by a long-lived app.
        self._executors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DBExecutor] = (
            weakref.WeakKeyDictionary()
        )

    # -- public API ---------------------------------------------------------

    @property
    def mode(self) -> Mode | None:
        """`"lanes"`, `"per-request"`, or `None` before the first start."""
        return self._mode

    @property
    def lanes(self) -> LaneSet | None:
        """The lane set serving requests (its `stats()` describes it), if any."""
        return self._lanes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            loop = asyncio.get_running_loop()
            executor = self._executors.get(loop)
            if executor is None:
                # No lifespan (or a loop it did not run on): set up now, once.
                executor = self._start(loop, fresh=False)
            lanes = self._lanes
            if lanes is None:
                await self._serve_on_request_thread(scope, receive, send)
            else:
                await self._serve_in_lane(lanes, executor, scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.app(scope, receive, send)

    async def aclose(self) -> None:
        """Stop lending lanes, drain in-flight work, close every connection.

        What lifespan shutdown does; call it yourself when the server runs
        without lifespan. The lane set and the executor this app installed on
        the running loop are shut down. Waiting happens in a dedicated thread,
        bounded by `SHUTDOWN_TIMEOUT`: past it this returns, and work still
        running closes its connections when it ends. One log line says how it
        went: INFO when everything was closed, WARNING when work was still in
        flight.
        """
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        with self._lock:
            lanes = self._lanes
            started_here = self._mode is not None
            timeout = self._shutdown_timeout
        # The process-wide bridge, whichever loop started it: loops ending no
        # longer shut it down, so the explicit close is where it closes.
        executor = get_bridge_executor() if started_here else None
        open_before = _open_connections(lanes, executor)
        # Refuse new work at once (on the loop, both calls only flip flags and
        # queue stop markers); the joins happen below, off the loop.
        if lanes is not None:
            lanes.close()
        if executor is not None:
            executor.shutdown(wait=False)
        if lanes is None and executor is None:
            return
        done: asyncio.Future[bool] = loop.create_future()

        def drain() -> None:
            drained = True
            error: BaseException | None = None
            try:
                if lanes is not None:
                    drained = lanes.join(timeout)
                if executor is not None:
                    executor.shutdown(wait=True)
            except BaseException as exc:
                error = exc
            try:
                loop.call_soon_threadsafe(_deliver, done, drained, error)
            except RuntimeError:
                pass  # the loop is gone (we timed out and it ended): nobody waits

        # A dedicated thread, not the loop's default executor: that executor
        # is one of the things being shut down, and a join there would wait
        # for itself.
        threading.Thread(target=drain, name="dbbridge-shutdown", daemon=True).start()
        try:
            drained = await asyncio.wait_for(asyncio.shield(done), timeout)
        except asyncio.TimeoutError:
            drained = False
        _log_shutdown(
            lanes,
            executor,
            drained=drained,
            timeout=timeout,
            open_before=open_before,
            elapsed=time.monotonic() - started,
        )

    # -- lifecycle ------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop, *, fresh: bool) -> DBExecutor:
        settings = get_settings()
        with self._lock:
            if fresh or self._mode is None:
                old = self._lanes
                lanes_wanted = settings.lanes
                if lanes_wanted and not LANES_SUPPORTED:
                    # Said once, in the startup line below (at WARNING).
                    lanes_wanted = 0
                if lanes_wanted:
                    self._lanes = LaneSet(
                        lanes_wanted,
                        full="wait" if settings.lane_full == "wait" else "temporary",
                        wait_timeout=settings.lane_wait_timeout,
                        idle_timeout=settings.lane_idle_timeout,
                        thread_name_prefix=settings.thread_name_prefix,
                    )
                    self._mode = "lanes"
                else:
                    self._lanes = None
                    self._mode = "per-request"
                self._shutdown_timeout = settings.shutdown_timeout
                if old is not None:
                    # A second startup (a reused app): the old set must not
                    # keep threads and connections nobody will lend again.
                    old.close()
            lanes = self._lanes
            executor = install_default_executor(loop=loop)
            # stats() on the bridge reports the lanes.
            executor.lane_counts = lanes.counts if lanes is not None else None
            executor.request_mode = self._mode
            self._executors[loop] = executor
        # Once per event loop served (lifespan startup, or the first request
        # without lifespan), never per request.
        _log_startup(settings, lanes)
        return executor

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "lifespan.startup":
                try:
                    self._start(loop, fresh=True)
                except Exception as exc:
                    logger.exception("async_dbbridge: lifespan startup failed")
                    await send(
                        {"type": "lifespan.startup.failed", "message": f"async_dbbridge: {exc}"}
                    )
                    return
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                try:
                    await self.aclose()
                except Exception as exc:
                    logger.exception("async_dbbridge: lifespan shutdown failed")
                    await send(
                        {"type": "lifespan.shutdown.failed", "message": f"async_dbbridge: {exc}"}
                    )
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- requests -------------------------------------------------------------

    async def _serve_in_lane(
        self, lanes: LaneSet, bridge: DBExecutor, scope: Scope, receive: Receive, send: Send
    ) -> None:
        request_lane = lanes.request_lane(fallback=bridge)

        async def send_and_watch(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                request_lane.response_complete()

        leftovers: list[str] = []
        error: BaseException | None = None
        # Marks the request's context (its tasks, its calls on the lane) as a
        # lane request: Django's own request-signal receivers stand aside.
        token = current_request_lane.set(request_lane)
        try:
            # Entered around the whole app call, so Django's own inner
            # ThreadSensitiveContext() finds this one and adds none, and the
            # response (streaming content included) and request_finished run
            # inside it.
            async with ThreadSensitiveContext(executor=request_lane):
                await self.app(scope, receive, send_and_watch)
        except BaseException as exc:
            error = exc
            raise
        finally:
            current_request_lane.reset(token)
            # The app has returned: every sync call of the request is done or
            # queued on the lane, and the release is queued behind them — the
            # lane cleans up only after the request's last call. Under Django
            # the lane usually released itself already, right after
            # response.close(), and the future is done: no round trip.
            released = request_lane.release()
            if released is not None:
                if released.done():
                    leftovers = released.result()
                else:
                    leftovers = await asyncio.wrap_future(released)
            if leftovers:
                # Reported here, on the loop, where the request ran.
                _report_leftovers(_leftover_message(scope, leftovers), error)
            error = None  # no cycle: exception -> traceback -> this frame -> exception

    async def _serve_on_request_thread(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = ThreadSensitiveContext()
        leftovers: list[str] = []
        error: BaseException | None = None
        try:
            async with context:
                try:
                    await self.app(scope, receive, send)
                finally:
                    if _has_own_thread(context):
                        # Thread-sensitive, inside the same context: runs on
                        # the request's own thread, the only one that may close
                        # its connections — and that dies when the context exits.
                        leftovers = await sync_to_async(end_request_cleanup)(final=True)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if leftovers:
                _report_leftovers(_leftover_message(scope, leftovers), error)
            error = None  # no cycle: exception -> traceback -> this frame -> exception

    def __repr__(self) -> str:
        return f"<{type(self).__name__} mode={self._mode} app={self.app!r}>"


def _has_own_thread(context: ThreadSensitiveContext) -> bool:
    """Did this request's context create a thread (so there is one to clean)?

    No token: an enclosing context owns the thread, and cleans it. Not in
    asgiref's map: the request made no thread-sensitive call, so no thread
    exists, and asking for one just to close nothing would create it.
    """
    executors: Mapping[object, object] = getattr(SyncToAsync, "context_to_thread_executor", {})
    return getattr(context, "token", None) is not None and context in executors


def _log_startup(settings: BridgeSettings, lanes: LaneSet | None) -> None:
    """One line: how requests and bridge calls will run, and the versions that decided it."""
    import asgiref
    import django

    if lanes is not None:
        requests = f"requests on lanes (LANES={lanes.size}, LANE_FULL={lanes.full!r})"
    elif settings.lanes:
        requests = (
            f"requests on per-request threads, closed at request end: LANES={settings.lanes} "
            "but request lanes need asgiref >= 3.13"
        )
    else:
        requests = "requests on per-request threads, closed at request end (LANES=0)"
    logger.log(
        # Lanes asked for and impossible: the one line says so, louder.
        logging.WARNING if lanes is None and settings.lanes else logging.INFO,
        "async_dbbridge started (pid %d): %s; db_call on bridge workers "
        "(MAX_WORKERS=%d, POLICY=%r); asgiref %s, Django %s",
        os.getpid(),
        requests,
        settings.max_workers,
        settings.policy.kind,
        asgiref.__version__,
        django.get_version(),
    )


def _open_connections(lanes: LaneSet | None, executor: DBExecutor | None) -> tuple[int, int]:
    """(held by lanes, held by bridge workers), over every alias."""
    return (
        lanes.stats().open_connections if lanes is not None else 0,
        executor.stats().open_connections if executor is not None else 0,
    )


def _log_shutdown(
    lanes: LaneSet | None,
    executor: DBExecutor | None,
    *,
    drained: bool,
    timeout: float | None,
    open_before: tuple[int, int],
    elapsed: float,
) -> None:
    """One line: what shutdown closed, how long it took, and what it left running."""
    open_after = _open_connections(lanes, executor)
    # Per pool, never below 0: in-flight work may have opened some meanwhile.
    closed = max(0, open_before[0] - open_after[0]) + max(0, open_before[1] - open_after[1])
    if drained:
        logger.info(
            "async_dbbridge stopped in %.2fs: closed %d connection(s), nothing in flight",
            elapsed,
            closed,
        )
        return
    lane_stats = lanes.stats() if lanes is not None else None
    bridge_stats = executor.stats() if executor is not None else None
    requests = lane_stats.in_use + lane_stats.waiting if lane_stats is not None else 0
    calls = bridge_stats.busy + bridge_stats.queued if bridge_stats is not None else 0
    logger.warning(
        "async_dbbridge stopped after SHUTDOWN_TIMEOUT=%ss with work in flight: "
        "%d request(s) on lanes, %d bridge call(s), holding %d connection(s) that close "
        "when that work ends; closed %d connection(s)",
        timeout,
        requests,
        calls,
        sum(open_after),
        closed,
    )


def _report_leftovers(message: str, error: BaseException | None) -> None:
    """Report a transaction a request left open, once: as a warning, never a log record too.

    A warning is the channel users can filter, turn into an error, or route
    into logging (``logging.captureWarnings``); a log line beside it would
    say the same thing twice. When the app raised, the warning must not
    replace its exception: if a filter turns the warning into an error, the
    report rides on the app's exception as a note instead.
    """
    if error is None:
        warnings.warn(message, TransactionLeftOpenWarning, stacklevel=3)
        return
    try:
        warnings.warn(message, TransactionLeftOpenWarning, stacklevel=3)
    except TransactionLeftOpenWarning:
        error.add_note(message)


def _leftover_message(scope: Scope, aliases: list[str]) -> str:
    request = f"{scope.get('method', '?')} {scope.get('path', '?')}"
    return (
        f"request {request} ended inside a transaction on database "
        f"{', '.join(repr(a) for a in aliases)}: its uncommitted work was rolled back "
        "and the connection closed. Use 'with transaction.atomic():' so the "
        "transaction ends inside the view."
    )
