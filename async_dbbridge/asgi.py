"""The ASGI wrapper: lifespan, request threads and the connection pools around Django.

In `asgi.py`, replace Django's `get_asgi_application` with this one:

```python
# asgi.py
from async_dbbridge.asgi import get_asgi_application

application = get_asgi_application()
```

Each HTTP request then runs its sync work (request signals, sync middleware and
views, async ORM calls) on one *request thread*, taken from an elastic set of
reused threads for the request's life; its connections come from one bounded
pool per database alias and go back as soon as they are idle. On lifespan
startup the process-wide bridge becomes the loop's default executor; on
shutdown the threads end and every pooled connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections

from . import _compat, _install, _signals, _startup
from ._affinity import pin_loop_thread
from ._binding import RequestBinding, RequestState, current_request_state
from ._completions import deliver
from ._connections import TransactionLeftOpenWarning, end_request_cleanup
from ._executor import DBExecutor
from ._gate import SyncRequestsBusy
from ._install import install_default_executor
from ._lending import PoolTimeout, close_pools, pools
from ._middleware import Verdict, fuse, unfuse_middleware
from ._one_hop import OneHop, install_one_hop, uninstall_one_hop
from ._pool import ConnectionPool
from ._request_threads import RequestThreads
from ._startup import announce
from .conf import DEFAULT_POOL_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT, BridgeSettings, get_settings

__all__ = ("DBBridgeASGIApp", "get_asgi_application")

logger = logging.getLogger("async_dbbridge")

Scope = dict[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: How the wrapper serves HTTP requests: on request threads with pooled
#: connections, or (asgiref < 3.13) on asgiref's per-request thread, whose
#: connections are closed at request end.
Mode = Literal["request-threads", "per-request"]


def get_asgi_application() -> DBBridgeASGIApp:
    """Django's `get_asgi_application()`, wrapped in a `DBBridgeASGIApp`.

    Sets Django up exactly as Django's own function does (`django.setup(set_prefix=False)`,
    the script prefix comes from each request's `root_path`), validates the
    `ASYNC_DBBRIDGE` setting, and wraps its handler in
    [`DBBridgeASGIApp`][async_dbbridge.asgi.DBBridgeASGIApp].

    Raises:
        ImproperlyConfigured: `ASYNC_DBBRIDGE` is invalid (a `SettingsError`
            naming every problem), so the server does not start.
    """
    import django
    from django.core.handlers.asgi import ASGIHandler

    django.setup(set_prefix=False)
    # Validated here, when the server imports the application: a bad setting
    # stops the server before it listens, under any lifespan mode, naming
    # every problem (SettingsError), instead of a server that answers 500.
    get_settings()
    return DBBridgeASGIApp(ASGIHandler())


class DBBridgeASGIApp:
    """Wrap an ASGI application so its requests never strand a database connection.

    These two are equivalent, except that the second bounds the connections
    each process opens and leaves none behind:

    ```python
    # Not runnable: two versions of one line of asgi.py, where django is imported.
    application = django.core.asgi.get_asgi_application()
    application = DBBridgeASGIApp(django.core.asgi.get_asgi_application())
    ```

    **HTTP:** each request runs inside `ThreadSensitiveContext(executor=...)`:
    every thread-sensitive `sync_to_async` call it makes — Django's request
    signals, sync middleware (`MiddlewareMixin` included), sync views,
    `aget()`/`acreate()`... — runs on one *request thread*, taken on the
    request's first such call from an elastic set of reused threads (never
    waiting: a new thread starts when all are busy; idle ones retire after
    `IDLE_TIMEOUT`) and kept until the request ends, so request-scoped
    `threading.local` state works as under Django. A request that makes no
    such call takes no thread.

    **Connections** come from one bounded pool per database alias per process
    (`POOL_SIZE`), shared with [`db_call`][async_dbbridge.db_call] and the
    default executor. A request thread takes a connection at its first query
    and, with `HOLD = "transaction"` (the default), gives it back after each
    sync call that leaves it idle (autocommit, outside `atomic()` and any open
    `.iterator()`); with `HOLD = "request"` at the request's end. At the end
    in any case a transaction left open is rolled back and reported with
    [`TransactionLeftOpenWarning`][async_dbbridge.TransactionLeftOpenWarning].
    A thread that finds every connection of an alias in use waits (never
    blocking the event loop) up to `POOL_TIMEOUT`, then gets
    [`PoolTimeout`][async_dbbridge.PoolTimeout]: the request is answered
    `503 Service Unavailable` with `Retry-After` instead of Django's 500.
    `CONN_MAX_AGE` is a pooled connection's lifetime, and `CONN_HEALTH_CHECKS`
    checks a connection taken after it sat idle.

    **Lifespan:** answered here, not passed on (Django's handler rejects it).
    Startup installs the process-wide bridge as the loop's default executor
    and sets up the request threads; shutdown stops keeping threads, waits up
    to `SHUTDOWN_TIMEOUT` seconds for in-flight work without blocking the
    loop, and closes the pools' connections. Without lifespan (Daphne,
    `--lifespan off`) the same setup happens on the first HTTP request of
    each event loop, and the pools are closed when the server is signalled to
    stop (its SIGTERM / SIGINT handlers are chained) or at process exit;
    call [`aclose`][async_dbbridge.asgi.DBBridgeASGIApp.aclose] yourself to
    shut down earlier. A request the server cancels (a graceful
    timeout) ends as after a client's disconnect once its thread's call
    returns, its late messages dropped.

    **Other scopes** (`websocket`...) go to the wrapped app untouched.

    With asgiref < 3.13 (no `ThreadSensitiveContext(executor=...)`) each
    request keeps asgiref's own per-request thread, and its connections are
    closed when the request ends. The keys named here are described in
    [Settings](settings.md).

    Args:
        app: The ASGI application to wrap, usually Django's `ASGIHandler`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._mode: Mode | None = None
        # Whether a lifespan startup was ever received (then shutdown will come too).
        self._lifespan_started = False
        # The one hop serving sync views, when installed (it ends cancelled requests itself).
        self._one_hop: OneHop | None = None
        self._threads: RequestThreads | None = None
        self._shutdown_timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT
        self._retry_after = math.ceil(DEFAULT_POOL_TIMEOUT)
        # The look at the servers' connection limits (_startup), when one runs.
        self._limits_checked: asyncio.Future[None] | None = None
        self._unavailable_log = _UnavailableLog()
        # The executor this app installed on each loop it has served. Weak
        # keys: a finished loop must not be kept alive by a long-lived app.
        self._executors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DBExecutor] = (
            weakref.WeakKeyDictionary()
        )

    # -- public API ---------------------------------------------------------

    @property
    def mode(self) -> Mode | None:
        """`"request-threads"`, `"per-request"`, or `None` before the first start."""
        return self._mode

    @property
    def request_threads(self) -> RequestThreads | None:
        """The request threads serving this app's requests (`stats()` describes them), if any."""
        return self._threads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            loop = asyncio.get_running_loop()
            executor = self._executors.get(loop)
            if executor is None:
                # No lifespan (or a loop it did not run on): set up now, once.
                executor = self._start(loop, fresh=False)
                if not self._lifespan_started:
                    # Nothing will call aclose(): close the pools as the
                    # server stops instead (see _signals).
                    _signals.drain_pools_on_shutdown_signals(loop)
                await _startup.wait_for(self._limits_checked)
            threads = self._threads
            if threads is None:
                await self._serve_on_request_thread(scope, receive, send)
            else:
                await self._serve_on_request_threads(threads, executor, scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.app(scope, receive, send)

    async def aclose(self) -> None:
        """Stop keeping request threads, drain in-flight work, close every pooled connection.

        What lifespan shutdown does; call it yourself when the server runs
        without lifespan. The request threads, the process-wide bridge and the
        connection pools are shut down. Waiting happens in a dedicated thread,
        bounded by `SHUTDOWN_TIMEOUT`: past it this returns, and work still
        running closes its connections when it ends. One log line says how it
        went: INFO when everything was closed, WARNING when work was still in
        flight.
        """
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        with self._lock:
            threads = self._threads
            started_here = self._mode is not None
            timeout = self._shutdown_timeout
        if not started_here:
            return
        # The process-wide bridge, whichever loop started it (loops ending do
        # not shut it down), if it exists: closing must not build one.
        executor = _install._bridge
        pools = _live_pools()
        closed_before = sum(pool.stats().closed for pool in pools)
        # Refuse new work at once (on the loop, both calls only flip flags and
        # queue stop markers); the waiting happens below, off the loop.
        if threads is not None:
            threads.close(0)
        if executor is not None:
            executor.shutdown(wait=False)
        done: asyncio.Future[bool] = loop.create_future()

        def drain() -> None:
            deadline = None if timeout is None else time.monotonic() + timeout

            def remaining() -> float | None:
                return None if deadline is None else max(0.0, deadline - time.monotonic())

            drained = True
            error: BaseException | None = None
            try:
                # Request threads first: they give their connections back as
                # their requests end, then the bridge's workers, then the
                # pools close what came back (and the rest when it comes).
                if threads is not None:
                    drained = threads.close(remaining())
                if executor is not None:
                    drained = executor._join(remaining()) and drained
                drained = close_pools(remaining()) and drained
                drained = _startup.join_probes(remaining()) and drained
            except BaseException as exc:
                error = exc
            try:
                loop.call_soon_threadsafe(deliver, done, drained, error)
            except RuntimeError:
                pass  # the loop is gone (we timed out and it ended): nobody waits

        # A dedicated thread, not the loop's default executor: that executor
        # is one of the things being shut down, and a join there would wait
        # for itself.
        threading.Thread(target=drain, name="dbbridge-shutdown", daemon=True).start()
        try:
            drained = await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            drained = False
        _log_shutdown(
            threads,
            executor,
            pools,
            drained=drained,
            timeout=timeout,
            closed=sum(pool.stats().closed for pool in pools) - closed_before,
            elapsed=time.monotonic() - started,
        )

    # -- lifecycle ------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop, *, fresh: bool) -> DBExecutor:
        settings = get_settings()
        with self._lock:
            if fresh or self._mode is None:
                old = self._threads
                if _compat.REQUEST_THREADS_SUPPORTED:
                    self._threads = RequestThreads(
                        hold=settings.hold,
                        idle_timeout=settings.idle_timeout,
                        thread_name_prefix=settings.thread_name_prefix,
                    )
                    self._mode = "request-threads"
                else:
                    self._threads = None
                    self._mode = "per-request"
                self._shutdown_timeout = settings.shutdown_timeout
                # Never 0: "Retry-After: 0" invites an immediate retry storm.
                self._retry_after = max(1, math.ceil(settings.pool_timeout))
                if old is not None:
                    # A second startup (a reused app): the old set must not
                    # keep threads nobody will use again. Only flags and stop
                    # markers: nothing here may block the loop.
                    old.close(0)
            threads = self._threads
            # Before any request of this start: the chain and the handler's
            # handle() are read per request.
            if settings.fuse_middleware:
                fusion = fuse(self.app)[1]
            else:
                unfuse_middleware(self.app)
                fusion = Verdict(False, "FUSE_MIDDLEWARE is False")
            if not settings.one_hop:
                uninstall_one_hop(self.app)
                one_hop = Verdict(False, "ONE_HOP is False")
            elif threads is None:
                uninstall_one_hop(self.app)
                one_hop = Verdict(False, "request threads need asgiref >= 3.13")
            else:
                one_hop = install_one_hop(self.app)
            installed = _compat.instance_handle(self.app) if one_hop.applied else None
            self._one_hop = installed if isinstance(installed, OneHop) else None
            if self._one_hop is not None:
                self._one_hop.limit_sync_requests(
                    settings.effective_sync_requests,
                    timeout=settings.pool_timeout,
                    max_waiting=settings.effective_max_waiting,
                )
            # Before the loop starts any thread (request threads, the bridge's
            # workers): they inherit the loop thread's CPU (see _affinity).
            cpu = pin_loop_thread(settings.cpu_affinity)
            executor = install_default_executor(loop=loop)
            self._executors[loop] = executor
        # Once per event loop served (lifespan startup, or the first request
        # without lifespan), never per request.
        _log_startup(settings, threads, cpu, fusion, one_hop)
        self._limits_checked = _startup.check_server_limits(
            settings.databases if settings.databases is not None else tuple(connections),
            settings.effective_pool_size,
            loop,
        )
        return executor

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "lifespan.startup":
                self._lifespan_started = True
                try:
                    self._start(loop, fresh=True)
                    await _startup.wait_for(self._limits_checked)
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

    async def _serve_on_request_threads(
        self,
        threads: RequestThreads,
        bridge: DBExecutor,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        # Calls made after the request ended (a task it spawned and did not
        # await) go to the bridge, which cleans up after each call.
        binding = RequestBinding(threads, fallback=bridge)
        state = binding.request_state
        send_503_aware = _Send503OnPoolTimeout(
            send, state, self._retry_after, scope, self._unavailable_log
        )
        error: BaseException | None = None
        # The request's state, seen by its sync calls (asgiref copies the
        # context into them): the pool marks it when a checkout times out.
        token = current_request_state.set(state)
        try:
            # Entered around the whole app call, so Django's own inner
            # ThreadSensitiveContext() finds this one and adds none, and the
            # response (streaming content included) and request_finished run
            # inside it.
            async with ThreadSensitiveContext(executor=binding):
                one_hop = self._one_hop
                if one_hop is not None and one_hop.serves(scope):
                    # The one hop ends a cancelled request cleanly itself: no
                    # task of its own needed (see _call_app_until_it_returns).
                    await self.app(scope, receive, send_503_aware)
                else:
                    await _call_app_until_it_returns(
                        self.app, scope, receive, send_503_aware, self._shutdown_timeout
                    )
        except BaseException as exc:
            error = exc
            raise
        finally:
            current_request_state.reset(token)
            # The app has returned, after Django's response.close(): every
            # sync call of the request is done or queued on its thread, and
            # the end-of-request job (roll back a leftover transaction, give
            # every connection back) is queued behind them. A request that
            # took no thread is done at once: no round trip.
            ended = binding.end()
            leftovers = ended.result() if ended.done() else await asyncio.wrap_future(ended)
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
                    if _compat.context_has_own_thread(context):
                        # Thread-sensitive, inside the same context: runs on
                        # the request's own thread, the only one that may close
                        # its connections — and that dies when the context exits.
                        leftovers = await sync_to_async(end_request_cleanup)()
        except BaseException as exc:
            error = exc
            raise
        finally:
            if leftovers:
                _report_leftovers(_leftover_message(scope, leftovers), error)
            error = None  # no cycle: exception -> traceback -> this frame -> exception

    def __repr__(self) -> str:
        return f"<{type(self).__name__} mode={self._mode} app={self.app!r}>"


async def _call_app_until_it_returns(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: _Send503OnPoolTimeout,
    finish_within: float | None,
) -> None:
    """`app(scope, receive, send)`, which a cancellation of this request ends cleanly.

    A server cancels a request still running when its graceful timeout
    expires (uvicorn's ``--timeout-graceful-shutdown``) and answers the client
    itself. Cancelled directly, Django's handler would leave its own tasks
    behind: ``handle()`` does not cancel the ones it started, and a sync call
    cannot be interrupted anyway (asgiref waits for the thread's call to
    end, then carries on). Those leftovers would send their response after
    the server's ("Unexpected ASGI message"), call into the request's
    `ThreadSensitiveContext` after it exited, and fail with nobody to
    retrieve their errors. So the app runs as a task of its own: on
    cancellation its later messages are dropped, it finishes as after a
    client's disconnect (the server sends ``http.disconnect``), still inside
    the request's context, and then the cancellation goes on. It gets up to
    `finish_within` seconds (`SHUTDOWN_TIMEOUT`) for that: an app that still runs then (a
    stream waiting for a disconnect that never comes) is cancelled, as is
    one whose wait a second cancellation (the loop ending) interrupts.
    """
    call = asyncio.ensure_future(app(scope, receive, send))
    try:
        await asyncio.shield(call)
    except asyncio.CancelledError:
        if call.done():
            raise
        send.abandon()
        try:
            # wait_for cancels the app's task past the timeout, or with this one.
            await asyncio.wait_for(call, finish_within)
        except BaseException:
            # What the abandoned request raised has no one to go to: the
            # server already answered, and the cancellation is what goes on.
            pass
        raise


class _Send503OnPoolTimeout:
    """The request's `send`, turning a 500 caused by `PoolTimeout` into a 503.

    Django answers an unhandled exception with a 500 (and logs it). When the
    request's state says a pooled checkout timed out, the client gets
    `503 Service Unavailable` with `Retry-After` instead — the server is busy,
    not broken, and a retry will likely succeed — and Django's 500 body is
    swallowed. Anything else passes through untouched.
    """

    __slots__ = ("_abandoned", "_log", "_replaced", "_retry_after", "_scope", "_send", "_state")

    def __init__(
        self,
        send: Send,
        state: RequestState,
        retry_after: int,
        scope: Scope,
        log: _UnavailableLog,
    ) -> None:
        self._send = send
        self._state = state
        self._retry_after = retry_after
        self._scope = scope
        self._log = log
        self._replaced = False
        self._abandoned = False

    def abandon(self) -> None:
        """The server cancelled the request and answered it: drop what the app sends from now."""
        self._abandoned = True

    async def __call__(self, message: Message) -> None:
        if self._replaced or self._abandoned:
            # The rest of Django's 500 (body, trailers), or a request the
            # server cancelled: the client has its answer already.
            return
        if (
            message["type"] == "http.response.start"
            and message.get("status") == 500
            and self._state.pool_timed_out
        ):
            self._replaced = True
            cause = _unavailable_cause(self._state.pool_timeout, self._state.unavailable_alias)
            self._log(self._scope, cause)
            body, content_type = unavailable_response(cause, self._retry_after)
            await self._send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", content_type),
                        (b"content-length", str(len(body)).encode("ascii")),
                        (b"retry-after", str(self._retry_after).encode("ascii")),
                    ],
                }
            )
            await self._send({"type": "http.response.body", "body": body})
            return
        await self._send(message)


class _UnavailableLog:
    """One WARNING per 503, at most one per `EVERY` seconds, counting the ones it skipped.

    A 503 comes in bursts (every waiter of a stall gets one): a line for each
    would flood the log, and writing them slows the overloaded process that
    should be answering. Django logs each one's exception anyway (the 500 it
    raised, on `django.request`).
    """

    EVERY: Final = 10.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last = -math.inf
        self._skipped = 0

    def __call__(self, scope: Scope, cause: str) -> None:
        now = self._clock()
        with self._lock:
            if now - self._last < self.EVERY:
                self._skipped += 1
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        logger.warning(
            "async_dbbridge: 503 Service Unavailable for %s %s: %s%s",
            scope.get("method", "?"),
            scope.get("path", "?"),
            cause,
            f" ({skipped} more 503s since the last such line, not logged)" if skipped else "",
        )


def _unavailable_cause(error: BaseException | None, alias: str | None) -> str:
    """Why a request got a 503, for the log (and the body only with `DEBUG = True`)."""
    if isinstance(error, PoolTimeout) and error.max_waiting is not None:
        return (
            f"all {error.max_size} connections to database {error.alias!r} were in use and "
            f"{error.max_waiting} requests were already waiting (ASYNC_DBBRIDGE MAX_WAITING)"
        )
    if isinstance(error, SyncRequestsBusy):
        return str(error)
    if isinstance(error, PoolTimeout):
        return (
            f"all {error.max_size} connections to database {error.alias!r} stayed in use "
            f"for {error.timeout:g}s (ASYNC_DBBRIDGE POOL_SIZE / POOL_TIMEOUT)"
        )
    if error is not None:
        # The driver's words ("sorry, too many clients already"), on one line.
        words = " ".join(str(error).split())
        return (
            f"the server of database {alias!r} refused a new connection, it is full "
            f"({words}); processes x ASYNC_DBBRIDGE POOL_SIZE must fit its max_connections"
        )
    return "no database connection became free in time (ASYNC_DBBRIDGE POOL_TIMEOUT)"


#: The 503's body for clients when `DEBUG` is off and the project has no `503.html`.
UNAVAILABLE_BODY: Final = b"503 Service Unavailable: the server is busy. Please retry.\n"
_TEXT: Final = b"text/plain; charset=utf-8"


def unavailable_response(cause: str, retry_after: int) -> tuple[bytes, bytes]:
    """The 503's body and content type.

    With `DEBUG = True`, the cause (pool size, timeout, alias): what a
    developer needs. Otherwise nothing about the configuration: the project's
    `503.html` template if it has one (rendered without a request, like
    Django's `500.html`, with `retry_after` in its context), else one plain
    line. The cause is in the log either way.
    """
    from django.conf import settings
    from django.template import TemplateDoesNotExist, loader

    if settings.DEBUG:
        return f"503 Service Unavailable: {cause}. Please retry.\n".encode(), _TEXT
    try:
        page = loader.render_to_string("503.html", {"retry_after": retry_after})
    except TemplateDoesNotExist:
        return UNAVAILABLE_BODY, _TEXT
    except Exception:
        # A broken error page must not turn a 503 into a crash.
        logger.exception("async_dbbridge: rendering 503.html failed; sent the plain 503")
        return UNAVAILABLE_BODY, _TEXT
    return page.encode(), b"text/html; charset=utf-8"


def _live_pools() -> list[ConnectionPool]:
    """The pools that exist now (closing them removes them from the registry)."""
    return pools()


def _log_startup(
    settings: BridgeSettings,
    threads: RequestThreads | None,
    cpu: int | None,
    fusion: Verdict,
    one_hop: Verdict,
) -> None:
    """One line: how requests and bridge calls will run, and the versions that decided it."""
    import asgiref
    import django

    aliases = settings.databases if settings.databases is not None else tuple(connections)
    if threads is not None:
        requests = f"requests on request threads (HOLD={settings.hold!r})"
    else:
        requests = (
            "requests on per-request threads, closed at request end: request threads "
            "need asgiref >= 3.13"
        )
    # To stderr when logging is not configured: the line that says the wrapper
    # serves must be seen without a LOGGING setting.
    announce(
        # Request threads impossible: the one line says so, louder.
        logging.INFO if threads is not None else logging.WARNING,
        "async_dbbridge started (pid %d): %s; one connection pool per alias "
        "(POOL_SIZE=%d for %s, POOL_TIMEOUT=%gs); db_call on bridge workers "
        "(MAX_WORKERS=%d, POLICY=%r)%s; sync views in one thread hop (ONE_HOP): %s%s; "
        "fused middleware (FUSE_MIDDLEWARE): %s; asgiref %s, Django %s",
        os.getpid(),
        requests,
        settings.effective_pool_size,
        ", ".join(repr(alias) for alias in aliases),
        settings.pool_timeout,
        settings.max_workers,
        settings.policy.kind,
        "" if cpu is None else f"; event loop and its threads on CPU {cpu} (CPU_AFFINITY)",
        ("yes, " if one_hop.applied else "no, ") + one_hop.reason,
        _sync_requests_clause(settings) if one_hop.applied else "",
        ("yes, " if fusion.applied else "no, ") + fusion.reason,
        asgiref.__version__,
        django.get_version(),
    )


def _sync_requests_clause(settings: BridgeSettings) -> str:
    limit = settings.effective_sync_requests
    if not limit:
        return ", any number at once (SYNC_REQUESTS=0)"
    return f", {limit} at once, the others waiting on the event loop (SYNC_REQUESTS={limit})"


def _log_shutdown(
    threads: RequestThreads | None,
    executor: DBExecutor | None,
    pools: list[ConnectionPool],
    *,
    drained: bool,
    timeout: float | None,
    closed: int,
    elapsed: float,
) -> None:
    """One line: what shutdown closed, how long it took, and what it left running."""
    if drained:
        logger.info(
            "async_dbbridge stopped in %.2fs: closed %d connection(s), nothing in flight",
            elapsed,
            closed,
        )
        return
    requests = threads.stats().busy if threads is not None else 0
    bridge_stats = executor.stats() if executor is not None else None
    calls = bridge_stats.busy + bridge_stats.queued if bridge_stats is not None else 0
    in_use = sum(pool.stats().in_use for pool in pools)
    logger.warning(
        "async_dbbridge stopped after SHUTDOWN_TIMEOUT=%ss with work in flight: "
        "%d request(s) on request threads, %d bridge call(s), holding %d connection(s) that "
        "close when that work ends; closed %d connection(s)",
        timeout,
        requests,
        calls,
        in_use,
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
        f"{', '.join(repr(a) for a in aliases)}: its uncommitted work was rolled back. "
        "Use 'with transaction.atomic():' so the "
        "transaction ends inside the view."
    )
