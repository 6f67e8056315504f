"""The ASGI wrapper, driven directly with scope/receive/send, against the real database."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import pytest
from asgiref.sync import SyncToAsync, sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished, request_started
from django.db import connections
from pytest_django.fixtures import Settings as SettingsWrapper

import async_dbbridge._compat
import async_dbbridge._pool
from async_dbbridge import TransactionLeftOpenWarning, get_bridge_executor, stats
from async_dbbridge._compat import REQUEST_THREADS_SUPPORTED
from async_dbbridge.asgi import UNAVAILABLE_BODY, DBBridgeASGIApp, get_asgi_application
from tests.conftest import SetSetting, eventually, kill_backend, off_loop, sessions_become
from tests.e2e_project.driver import Lifespan, Response, call_http
from tests.e2e_project.settings import OVERRIDES
from tests.e2e_project.views import probe
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

_T = TypeVar("_T")


def _then_close(fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    finally:
        connections.close_all()


async def orm(fn: Callable[[], _T]) -> _T:
    """A query of the test's own, on a thread that closes its connection after."""
    return await off_loop(_then_close, fn)


async def entered(name: str) -> None:
    await eventually(probe.entered[name].is_set)


MakeApp = Callable[..., DBBridgeASGIApp]

requires_request_threads = pytest.mark.skipif(
    not REQUEST_THREADS_SUPPORTED, reason="request threads need asgiref >= 3.13"
)


@pytest.fixture
def project(settings: SettingsWrapper) -> Iterator[SettingsWrapper]:
    for key, value in OVERRIDES.items():
        setattr(settings, key, value)
    probe.reset()
    yield settings
    open_all_gates()


def open_all_gates() -> None:
    """Never leave a view blocked on a gate (its thread could not end)."""
    for gate in list(probe.gates.values()):
        gate.set()
    for async_gate in list(probe.async_gates.values()):
        async_gate.set()


@pytest.fixture
def make_app(project: SettingsWrapper) -> Iterator[MakeApp]:
    """Build wrapped Django apps with ASYNC_DBBRIDGE settings; end their request threads after."""
    apps: list[DBBridgeASGIApp] = []

    def make(inner: Any = None, **bridge: Any) -> DBBridgeASGIApp:
        # SYNC_REQUESTS=0: these tests drive the pool itself with more concurrent
        # sync requests than connections (test_sync_gate.py tests the gate).
        project.ASYNC_DBBRIDGE = {"MAX_WORKERS": 4, "SYNC_REQUESTS": 0, **bridge}
        # Built after the settings: the handler loads MIDDLEWARE when created.
        app = DBBridgeASGIApp(inner if inner is not None else ASGIHandler())
        apps.append(app)
        return app

    yield make
    open_all_gates()
    for app in apps:
        threads = app.request_threads
        if threads is not None:
            assert threads.close(10), f"{threads!r} did not end"


def request_thread_names() -> list[str]:
    return [t.name for t in threading.enumerate() if "-request-" in t.name]


def pool(alias: str = "default") -> async_dbbridge.PoolStats:
    return stats().pools[alias]


# -- lifespan ------------------------------------------------------------------


@requires_request_threads
async def test_lifespan_startup_installs_bridge_and_shutdown_closes_everything(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(POOL_SIZE=2)
    lifespan = Lifespan(app)
    assert await lifespan.startup() == {"type": "lifespan.startup.complete"}
    assert app.mode == "request-threads"
    threads = app.request_threads
    assert threads is not None

    # The loop's default executor is now the bridge.
    response = await call_http(app, "/default-executor/")
    assert response.json()["thread"].startswith("dbbridge-")
    response = await call_http(app, "/db-call/")
    assert response.status == 200
    response = await call_http(app, "/sync-query/")
    assert response.json()["thread"].startswith("dbbridge-request-")
    # The bridge and the request threads share one pool: /db-call/ needed two
    # connections at once (the sync middleware's, held across the view, and
    # the bridge's); /sync-query/ reused one (CONN_MAX_AGE=60 keeps them).
    assert await sessions_become(2) == 2
    assert (pool().opened, pool().in_use, pool().idle) == (2, 0, 2)
    snapshot = stats()
    assert snapshot.request_threads is not None
    assert (snapshot.request_threads.busy, snapshot.request_threads.idle) == (0, 1)
    bridge = get_bridge_executor()
    assert snapshot.bridge is not None
    assert snapshot.bridge.pooled

    assert await lifespan.shutdown() == {"type": "lifespan.shutdown.complete"}
    # Ended before shutdown.complete: no request or bridge thread is left, and
    # the pools are closed.
    assert threads.stats().idle == 0
    assert bridge.stats().workers == 0
    assert bridge.stats().shutdown
    assert request_thread_names() == []
    assert stats().pools == {}
    await sessions_become(0)


async def test_lifespan_startup_failure_names_the_setting(make_app: MakeApp) -> None:
    app = make_app(HOLD="sometimes")
    message = await Lifespan(app).startup()
    assert message["type"] == "lifespan.startup.failed"
    assert "HOLD" in message["message"]
    assert "'transaction' or 'request'" in message["message"]


async def test_an_unknown_setting_fails_startup_naming_it(make_app: MakeApp) -> None:
    app = make_app(LANES=4)
    message = await Lifespan(app).startup()
    assert message["type"] == "lifespan.startup.failed"
    assert "has no key 'LANES'" in message["message"]
    assert "POOL_SIZE" in message["message"]


async def test_lifespan_is_not_passed_on() -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    app = DBBridgeASGIApp(inner)
    lifespan = Lifespan(app)
    assert (await lifespan.startup())["type"] == "lifespan.startup.complete"
    assert (await lifespan.shutdown())["type"] == "lifespan.shutdown.complete"
    assert seen == []


@requires_request_threads
async def test_shutdown_drain_is_bounded_and_does_not_block_the_loop(
    make_app: MakeApp, db_settings: SetSetting, caplog: pytest.LogCaptureFixture
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(POOL_SIZE=2, SHUTDOWN_TIMEOUT=0.3)
    lifespan = Lifespan(app)
    await lifespan.startup()
    request = asyncio.create_task(call_http(app, "/gate/stuck/"))
    await entered("stuck")

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        message = await lifespan.shutdown()
    ticking.cancel()
    assert message == {"type": "lifespan.shutdown.complete"}
    # The loop kept running while the drain waited (in its own thread).
    assert ticks >= 10
    assert "SHUTDOWN_TIMEOUT=0.3" in caplog.text
    assert "1 request(s) on request threads" in caplog.text
    assert not request.done()

    # The stuck request still finishes; its connection goes back to a closed
    # pool, which closes it, and its thread ends instead of going back.
    probe.gates["stuck"].set()
    response = await request
    assert response.status == 200
    threads = app.request_threads
    assert threads is not None
    assert await off_loop(threads.close, 10)
    await sessions_become(0)


@requires_request_threads
async def test_second_startup_replaces_closed_request_threads(make_app: MakeApp) -> None:
    app = make_app(POOL_SIZE=1)
    first = Lifespan(app)
    await first.startup()
    old_threads = app.request_threads
    await first.shutdown()
    second = Lifespan(app)
    await second.startup()
    assert app.request_threads is not None
    assert app.request_threads is not old_threads
    assert not app.request_threads.closing
    assert (await call_http(app, "/sync-query/")).status == 200
    await second.shutdown()


# -- scopes ----------------------------------------------------------------------


async def test_websocket_and_other_scopes_pass_through_untouched() -> None:
    seen: list[tuple[Mapping[str, Any], object]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        # No request thread, no thread-sensitive context of ours around it.
        seen.append((scope, SyncToAsync.thread_sensitive_context.get(None)))
        await send({"type": "websocket.close"})

    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    app = DBBridgeASGIApp(inner)
    scope = {"type": "websocket", "path": "/ws/"}
    await app(scope, receive, send)
    await app({"type": "custom"}, receive, send)
    assert seen[0] == (scope, None)
    assert seen[1][0]["type"] == "custom"
    assert sent == [{"type": "websocket.close"}] * 2
    assert app.mode is None  # nothing was set up for them


@requires_request_threads
async def test_without_lifespan_first_request_sets_up_once_per_loop(make_app: MakeApp) -> None:
    app = make_app(POOL_SIZE=2)
    assert app.mode is None
    response = await call_http(app, "/default-executor/")
    assert response.json()["thread"].startswith("dbbridge-")
    threads = app.request_threads
    assert threads is not None
    await call_http(app, "/sync-query/")
    assert app.request_threads is threads
    snapshot = stats().request_threads
    assert snapshot is not None
    assert snapshot.started == 1


def test_get_asgi_application_wraps_djangos_handler(project: SettingsWrapper) -> None:
    app = get_asgi_application()
    assert isinstance(app, DBBridgeASGIApp)
    assert isinstance(app.app, ASGIHandler)


# -- request threads -------------------------------------------------------------


@requires_request_threads
async def test_a_request_runs_all_its_sync_work_on_one_request_thread(make_app: MakeApp) -> None:
    signal_threads: list[str] = []

    def record(**kwargs: object) -> None:
        signal_threads.append(threading.current_thread().name)

    request_started.connect(record, dispatch_uid="test-record-start")
    request_finished.connect(record, dispatch_uid="test-record-finish")
    try:
        app = make_app(POOL_SIZE=2)
        response = await call_http(app, "/threads/")
    finally:
        request_started.disconnect(dispatch_uid="test-record-start")
        request_finished.disconnect(dispatch_uid="test-record-finish")
    assert response.status == 200
    names = response.json()
    thread = names["sync_to_async"]
    assert thread.startswith("dbbridge-request-")
    assert names["orm"] == names["sync_to_async_again"] == thread
    assert response.headers[b"x-middleware-thread"].decode() == thread
    assert signal_threads == [thread, thread]
    # db_call goes to the bridge: other threads, the same pool.
    assert names["db_call"].startswith("dbbridge-")
    assert "-request-" not in names["db_call"]


@requires_request_threads
async def test_async_to_sync_inside_a_sync_view_comes_back_to_its_thread(
    make_app: MakeApp,
) -> None:
    app = make_app(POOL_SIZE=1)
    response = await asyncio.wait_for(call_http(app, "/nested/"), timeout=10)
    names = response.json()
    assert names["view"] == names["inner"]
    assert names["view"].startswith("dbbridge-request-")


@requires_request_threads
async def test_connections_and_threads_are_reused_across_requests(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(POOL_SIZE=2)
    for _ in range(5):
        response = await call_http(app, "/sync-query/")
        assert response.status == 200
    threads = app.request_threads
    assert threads is not None
    assert threads.stats().started == 1
    assert (pool().opened, pool().checkouts >= 5, pool().idle) == (1, True, 1)
    assert await sessions_become(1) == 1


@requires_request_threads
async def test_conn_max_age_zero_closes_when_given_back(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=0)
    app = make_app(POOL_SIZE=2)
    for _ in range(3):
        assert (await call_http(app, "/sync-query/")).status == 200
    # Opened per checkout (it did connect), closed when given back.
    assert pool().opened >= 3
    assert pool().closed == pool().opened
    assert (pool().in_use, pool().idle) == (0, 0)
    await sessions_become(0)


@requires_request_threads
async def test_a_pure_async_app_takes_no_thread(make_app: MakeApp) -> None:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = make_app(inner, POOL_SIZE=2)
    assert (await call_http(app, "/")).status == 204
    threads = app.request_threads
    assert threads is not None
    assert threads.stats().started == 0
    assert request_thread_names() == []


@requires_request_threads
async def test_streaming_response_keeps_its_thread_until_the_body_is_sent(
    make_app: MakeApp,
) -> None:
    app = make_app(POOL_SIZE=2)
    probe.async_gates["s"] = asyncio.Event()
    started = asyncio.Event()
    request = asyncio.create_task(call_http(app, "/stream/s/", on_start=started.set))
    await entered("s")
    assert started.is_set()
    threads = app.request_threads
    assert threads is not None
    # The view has returned, the response has started: the thread is still taken.
    assert threads.stats().busy == 1
    probe.async_gates["s"].set()
    response = await request
    assert response.body == b"start;count=0"
    assert threads.stats().busy == 0
    view_thread, body_thread = probe.threads["s"]
    assert view_thread == body_thread
    assert view_thread.startswith("dbbridge-request-")


@requires_request_threads
async def test_transaction_left_open_is_rolled_back_and_reported_once(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(POOL_SIZE=1)
    with pytest.warns(TransactionLeftOpenWarning) as record:
        response = await call_http(app, "/leave-atomic/")
    assert response.status == 200
    assert len(record) == 1
    assert re.search(r"GET /leave-atomic/.*'default'.*rolled back", str(record[0].message))
    # The connection is back (or closed): nothing is held after the request.
    assert pool().in_use == 0
    # The next request runs in a clean state.
    response = await call_http(app, "/sync-query/")
    assert response.json()["count"] == 0
    assert not await orm(Item.objects.filter(name="leftover").exists)
    await sessions_become(lambda n: n <= 1)


@requires_request_threads
async def test_no_deadlock_with_more_requests_than_pooled_connections(
    make_app: MakeApp, project: SettingsWrapper, db_settings: SetSetting
) -> None:
    # Async ORM (the request thread) + db_call (the bridge) in each of 40
    # concurrent requests, over 2 connections: a thread holds a connection
    # only during a sync call and gives it back after, so nobody waits for a
    # connection held by someone who waits for them. Requests queue for
    # connections (never for threads) and all succeed; the generous
    # POOL_TIMEOUT is never reached.
    project.MIDDLEWARE = []
    db_settings(CONN_MAX_AGE=60)
    app = make_app(POOL_SIZE=2, MAX_WORKERS=2, POOL_TIMEOUT=60)
    lifespan = Lifespan(app)
    await lifespan.startup()
    responses: list[Response] = await asyncio.wait_for(
        asyncio.gather(*(call_http(app, "/combo/") for _ in range(40))), timeout=120
    )
    assert {r.status for r in responses} == {200}
    assert pool().timeouts == 0
    # The bound is a bound: never more than 2 opened (none were closed).
    assert 1 <= pool().opened <= 2
    await lifespan.shutdown()
    await sessions_become(0)


@requires_request_threads
async def test_a_sync_middleware_holding_the_last_connection_across_db_call_ends_in_503(
    make_app: MakeApp, db_settings: SetSetting, caplog: pytest.LogCaptureFixture
) -> None:
    # The project's sync middleware queries inside a transaction that spans
    # the rest of the request, so the request thread holds its connection
    # while the view awaits db_call, which needs a second one. With a single
    # pooled connection that is a wait nobody can end: it must end after
    # POOL_TIMEOUT as a 503, never hang.
    db_settings(CONN_MAX_AGE=60)
    app = make_app(POOL_SIZE=1, POOL_TIMEOUT=0.3)
    with caplog.at_level(logging.ERROR, logger="django.request"):
        response = await asyncio.wait_for(call_http(app, "/in-transaction/combo/"), timeout=30)
    assert response.status == 503
    assert pool().timeouts == 1
    assert pool().in_use == 0


@requires_request_threads
async def test_a_sync_middlewares_idle_connection_is_free_while_the_view_awaits_db_call(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    # The same middleware outside a transaction: its connection is idle once
    # the view's first query (a sync call nested in Django's async_to_sync,
    # on the request thread) is done, and goes back to the pool then, so
    # db_call gets the one pooled connection.
    db_settings(CONN_MAX_AGE=60)
    app = make_app(POOL_SIZE=1, POOL_TIMEOUT=5)
    response = await asyncio.wait_for(call_http(app, "/combo/"), timeout=30)
    assert response.status == 200, response.body
    assert json.loads(response.body)["counts"] == [0, 0]
    assert pool().timeouts == 0
    assert pool().in_use == 0


@requires_request_threads
async def test_pool_timeout_is_answered_503_with_retry_after(
    make_app: MakeApp, db_settings: SetSetting, caplog: pytest.LogCaptureFixture
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(POOL_SIZE=1, POOL_TIMEOUT=0.3)
    # The gate view holds the only connection inside its sync call.
    first = asyncio.create_task(call_http(app, "/gate/hold/"))
    await entered("hold")
    with (
        caplog.at_level(logging.ERROR, logger="django.request"),
        caplog.at_level(logging.WARNING, logger="async_dbbridge"),
    ):
        second = await asyncio.wait_for(call_http(app, "/sync-query/"), timeout=30)
    assert second.status == 503
    assert second.headers[b"retry-after"] == b"1"
    assert second.headers[b"content-type"] == b"text/plain; charset=utf-8"
    # DEBUG is off: the body says nothing about the configuration; the log does.
    assert second.body == UNAVAILABLE_BODY
    assert "503 Service Unavailable for GET /sync-query/: all 1 connections to database " in (
        caplog.text
    )
    assert "POOL_SIZE" in caplog.text
    assert "PoolTimeout" in caplog.text  # Django logged the exception, as for any 500
    assert pool().timeouts == 1
    probe.gates["hold"].set()
    assert (await first).status == 200
    # Once the connection is back, the next request gets it.
    assert (await call_http(app, "/sync-query/")).status == 200


@requires_request_threads
async def test_sync_requests_beyond_the_limit_wait_on_the_loop_then_get_the_503(
    make_app: MakeApp, db_settings: SetSetting, caplog: pytest.LogCaptureFixture
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(POOL_SIZE=2, POOL_TIMEOUT=0.3, SYNC_REQUESTS=1)
    first = asyncio.create_task(call_http(app, "/gate/hold/"))
    await entered("hold")
    threads = app.request_threads
    assert threads is not None
    # A free connection is there, but the one turn is taken: the second request
    # waits on the loop, takes no thread and never reaches Django.
    started: list[object] = []
    request_started.connect(started.append)
    try:
        with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
            second = await asyncio.wait_for(call_http(app, "/sync-query/"), timeout=30)
    finally:
        request_started.disconnect(started.append)
    assert second.status == 503
    assert second.headers[b"retry-after"] == b"1"
    assert second.body == UNAVAILABLE_BODY
    assert started == []
    assert threads.stats().busy == 1
    assert (
        "503 Service Unavailable for GET /sync-query/: all 1 sync requests stayed running "
        "for 0.3s (ASYNC_DBBRIDGE SYNC_REQUESTS / POOL_TIMEOUT)" in caplog.text
    )
    assert pool().timeouts == 0  # the pool never saw it
    # A request that waits while the first one ends is served in its turn.
    third = asyncio.create_task(call_http(app, "/sync-query/"))
    assert app._one_hop is not None
    gate = app._one_hop._gate(asyncio.get_running_loop())
    assert gate is not None
    await eventually(lambda: gate.waiting == 1)
    probe.gates["hold"].set()
    assert (await first).status == 200
    assert (await asyncio.wait_for(third, timeout=30)).status == 200


@requires_request_threads
async def test_sync_requests_zero_lets_every_sync_request_in(make_app: MakeApp) -> None:
    app = make_app(POOL_SIZE=2, POOL_TIMEOUT=10, SYNC_REQUESTS=0)
    first = asyncio.create_task(call_http(app, "/gate/hold/"))
    await entered("hold")
    # No gate: the second request runs beside the first, on a thread of its own.
    assert (await asyncio.wait_for(call_http(app, "/sync-query/"), timeout=30)).status == 200
    assert app._one_hop is not None
    assert not app._one_hop._gates
    probe.gates["hold"].set()
    assert (await first).status == 200


@requires_request_threads
async def test_idle_request_threads_retire(make_app: MakeApp) -> None:
    app = make_app(POOL_SIZE=2, IDLE_TIMEOUT=0.2)
    assert (await call_http(app, "/sync-query/")).status == 200
    threads = app.request_threads
    assert threads is not None
    await eventually(lambda: threads.stats().retired == 1)
    assert threads.stats().idle == 0
    await eventually(lambda: request_thread_names() == [])
    # A retired thread is replaced on demand.
    assert (await call_http(app, "/sync-query/")).status == 200
    assert threads.stats().started == 2


@requires_request_threads
async def test_cancelled_request_gives_its_thread_back(make_app: MakeApp) -> None:
    # A raw app, not Django: Django's handler leaks its request body file when
    # cancelled mid-view (a ResourceWarning at some later garbage collection).
    started, gate = threading.Event(), threading.Event()

    def blocking() -> None:
        Item.objects.count()
        started.set()
        gate.wait(10)

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await sync_to_async(blocking)()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = make_app(inner, POOL_SIZE=1)
    request = asyncio.create_task(call_http(app, "/"))
    await eventually(started.is_set)
    request.cancel()
    # The running call cannot be interrupted: the end of the request waits behind it.
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await request
    threads = app.request_threads
    assert threads is not None
    await eventually(lambda: threads.stats().busy == 0)
    assert pool().in_use == 0
    # The thread is reused by the next request.
    started.clear()
    response = await asyncio.wait_for(call_http(app, "/"), timeout=10)
    assert response.status == 204
    assert threads.stats().started == 1


def test_djangos_request_signals_are_not_patched() -> None:
    from django.db import close_old_connections, reset_queries
    from django.dispatch import Signal

    import async_dbbridge.asgi  # noqa: F401  # importing the wrapper changes nothing

    for signal in (request_started, request_finished):
        # No instance attribute shadows the Signal class's own methods.
        assert not {"_live_receivers", "asend", "send"} & set(vars(signal))
        assert type(signal) is Signal
    started, _ = request_started._live_receivers(None)
    finished, _ = request_finished._live_receivers(None)
    assert close_old_connections in started
    assert reset_queries in started
    assert close_old_connections in finished
    # No receiver of the library's own on either signal.
    for signal in (request_started, request_finished):
        live, async_live = signal._live_receivers(None)
        for receiver in [*live, *async_live]:
            assert not getattr(receiver, "__module__", "").startswith("async_dbbridge")


@requires_request_threads
@pytest.mark.requires_server
@pytest.mark.parametrize("health_checks", [True, False])
async def test_conn_health_checks_after_a_killed_backend_behave_like_wsgi(
    make_app: MakeApp,
    db_settings: SetSetting,
    monkeypatch: pytest.MonkeyPatch,
    health_checks: bool,
) -> None:
    # The pool pings a connection taken after it sat idle HEALTH_CHECK_IDLE
    # seconds; 0 here, so the check does not depend on how long the kill took.
    monkeypatch.setattr(async_dbbridge._pool, "HEALTH_CHECK_IDLE", 0.0)
    db_settings(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=health_checks)
    app = make_app(POOL_SIZE=1)
    first = await call_http(app, "/backend/")
    assert first.status == 200
    await orm(functools.partial(kill_backend, "default", first.json()["backend"]))
    statuses = [(await call_http(app, "/backend/")).status for _ in range(3)]
    if health_checks:
        # The dead connection is noticed before the request's first query.
        assert statuses == [200, 200, 200]
    else:
        # As under WSGI: the first request fails, and the broken connection is
        # closed rather than given back, so the next ones reconnect.
        assert statuses == [500, 200, 200]
    assert pool().opened == 2
    assert pool().timeouts == 0


# -- per-request threads (asgiref < 3.13) ---------------------------------------


@pytest.fixture
def old_asgiref(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(async_dbbridge._compat, "REQUEST_THREADS_SUPPORTED", False)


@pytest.mark.usefixtures("old_asgiref")
async def test_old_asgiref_closes_per_request_connections(
    make_app: MakeApp, db_settings: SetSetting, caplog: pytest.LogCaptureFixture
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(POOL_SIZE=4)
    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        response = await call_http(app, "/sync-query/")
    assert response.status == 200
    assert app.mode == "per-request"
    assert app.request_threads is None
    assert "asgiref >= 3.13" in caplog.text
    assert "-request-" not in response.json()["thread"]
    # Django alone would strand this connection (CONN_MAX_AGE=60, dead thread).
    await sessions_become(0)
    assert stats().request_threads is None


@pytest.mark.usefixtures("old_asgiref")
async def test_old_asgiref_reports_transaction_left_open(make_app: MakeApp) -> None:
    app = make_app()
    with pytest.warns(TransactionLeftOpenWarning, match="GET /leave-atomic/"):
        await call_http(app, "/leave-atomic/")
    assert not await orm(Item.objects.filter(name="leftover").exists)
    await sessions_become(0)


def test_request_thread_support_is_detected_from_asgiref() -> None:
    # Request-thread tests are skipped without support: make sure that only
    # happens on an asgiref that really lacks ThreadSensitiveContext(executor=...).
    import asgiref

    major, minor = (int(part) for part in asgiref.__version__.split(".")[:2])
    assert ((major, minor) >= (3, 13)) == REQUEST_THREADS_SUPPORTED


# -- what a 503 says, and to whom -----------------------------------------------------------


async def _a_503(app: DBBridgeASGIApp) -> Response:
    """A 503 from a real checkout timeout: the gate view holds the only connection."""
    first = asyncio.create_task(call_http(app, "/gate/hold/"))
    await entered("hold")
    try:
        return await asyncio.wait_for(call_http(app, "/sync-query/"), timeout=30)
    finally:
        probe.gates["hold"].set()
        assert (await first).status == 200


@requires_request_threads
@pytest.mark.parametrize("debug", [False, True], ids=["DEBUG=False", "DEBUG=True"])
async def test_the_503_body_shows_configuration_only_with_debug(
    make_app: MakeApp, project: SettingsWrapper, caplog: pytest.LogCaptureFixture, debug: bool
) -> None:
    project.DEBUG = debug
    app = make_app(POOL_SIZE=1, POOL_TIMEOUT=0.3)
    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        response = await _a_503(app)
    assert response.status == 503
    assert response.headers[b"content-type"] == b"text/plain; charset=utf-8"
    detail = "all 1 connections to database 'default' stayed in use for 0.3s"
    if debug:
        assert response.body.decode() == (
            f"503 Service Unavailable: {detail} (ASYNC_DBBRIDGE POOL_SIZE / POOL_TIMEOUT). "
            "Please retry.\n"
        )
    else:
        assert response.body == UNAVAILABLE_BODY
        assert b"POOL" not in response.body
        assert b"default" not in response.body
    # The log has the detail in both modes, once, with the request.
    [line] = [r.getMessage() for r in caplog.records if "503 Service Unavailable" in r.message]
    assert line == (
        f"async_dbbridge: 503 Service Unavailable for GET /sync-query/: {detail} "
        "(ASYNC_DBBRIDGE POOL_SIZE / POOL_TIMEOUT)"
    )


@requires_request_threads
async def test_a_project_renders_its_own_503_from_503_html(
    make_app: MakeApp, project: SettingsWrapper, tmp_path: Any
) -> None:
    (tmp_path / "503.html").write_text(
        "<h1>Busy</h1><p>Try again in {{ retry_after }} s.</p>", encoding="utf-8"
    )
    project.TEMPLATES = [
        {"BACKEND": "django.template.backends.django.DjangoTemplates", "DIRS": [str(tmp_path)]}
    ]
    app = make_app(POOL_SIZE=1, POOL_TIMEOUT=1.5)
    response = await _a_503(app)
    assert response.status == 503
    assert response.headers[b"content-type"] == b"text/html; charset=utf-8"
    assert response.headers[b"retry-after"] == b"2"
    assert response.body == b"<h1>Busy</h1><p>Try again in 2 s.</p>"


@pytest.fixture
def one_connection_user(db_settings: SetSetting) -> Iterator[None]:
    """Point 'default' at a database user the server lets open one session, no more.

    The server's own refusal ("too many connections for role", MySQL's
    max_user_connections) without filling the whole server, which other
    clients of this machine share.
    """
    conn = connections["default"]
    user = f"dbbridge_one_{threading.get_native_id()}"
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute(f"DROP ROLE IF EXISTS {user}")
            cursor.execute(f"CREATE ROLE {user} LOGIN CONNECTION LIMIT 1")
            cursor.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {user}")
        else:
            cursor.execute(f"DROP USER IF EXISTS '{user}'@'%'")
            cursor.execute(f"CREATE USER '{user}'@'%' WITH MAX_USER_CONNECTIONS 1")
            cursor.execute(f"GRANT SELECT ON `{conn.settings_dict['NAME']}`.* TO '{user}'@'%'")
    conn.close()
    db_settings(aliases=("default",), USER=user, PASSWORD="")
    yield
    connections["default"].close()
    # The fixture's own changes are undone by db_settings after this.
    admin = connections.create_connection("default")
    admin.settings_dict = {**admin.settings_dict, "USER": ADMIN_USER[admin.vendor]}
    try:
        with admin.cursor() as cursor:
            if admin.vendor == "postgresql":
                cursor.execute(f"DROP OWNED BY {user}")
                cursor.execute(f"DROP ROLE {user}")
            else:
                cursor.execute(f"DROP USER '{user}'@'%'")
    finally:
        admin.close()


ADMIN_USER = {"postgresql": "postgres", "mysql": "root"}


@requires_request_threads
@pytest.mark.requires_server
@pytest.mark.usefixtures("one_connection_user")
async def test_a_server_that_refuses_a_connection_is_the_same_503(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    # The pool has room for two; the server lets this user have one.
    app = make_app(POOL_SIZE=2, POOL_TIMEOUT=5)
    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        response = await _a_503(app)
    assert response.status == 503
    assert response.body == UNAVAILABLE_BODY
    assert response.headers[b"retry-after"] == b"5"
    [line] = [r.getMessage() for r in caplog.records if "503 Service Unavailable" in r.message]
    assert "the server of database 'default' refused a new connection, it is full" in line
    assert re.search(r"too many connections for role|max_user_connections", line), line
    assert pool().timeouts == 0  # the server refused; the pool never timed out


@requires_request_threads
@pytest.mark.requires_server
async def test_startup_says_when_the_server_cannot_hold_the_pool(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from async_dbbridge import _startup

    monkeypatch.setattr(_startup, "_probed", set())
    app = make_app(POOL_SIZE=10_000)
    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        assert (await Lifespan(app).startup())["type"] == "lifespan.startup.complete"
    lines = [r.getMessage() for r in caplog.records if "max_connections" in r.message]
    assert [line.split(" is more than")[0] for line in lines] == [
        f"async_dbbridge: POOL_SIZE=10000 for database {alias!r}" for alias in ("default", "other")
    ]
    # Once per alias per process: a second start does not ask again.
    caplog.clear()
    assert (await Lifespan(make_app(POOL_SIZE=10_000)).startup())["type"] == (
        "lifespan.startup.complete"
    )
    assert "max_connections" not in caplog.text
    await app.aclose()


def test_503s_are_logged_once_per_interval_with_the_count_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from async_dbbridge import asgi

    clock = [1000.0]
    log = asgi._UnavailableLog(clock=lambda: clock[0])
    scope = {"method": "GET", "path": "/x/"}
    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        for _ in range(5):  # a burst: one line
            log(scope, "the pool")
        clock[0] += log.EVERY
        log(scope, "the pool")
    assert [r.getMessage() for r in caplog.records] == [
        "async_dbbridge: 503 Service Unavailable for GET /x/: the pool",
        "async_dbbridge: 503 Service Unavailable for GET /x/: the pool "
        "(4 more 503s since the last such line, not logged)",
    ]
