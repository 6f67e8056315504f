"""The ASGI wrapper, driven directly with scope/receive/send, against the real database."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import pytest
from asgiref.sync import SyncToAsync, sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished, request_started
from django.db import connections
from pytest_django.fixtures import Settings as SettingsWrapper

import async_dbbridge.asgi
from async_dbbridge import TransactionLeftOpenWarning, get_bridge_executor
from async_dbbridge._lanes import LANES_SUPPORTED, LaneSet
from async_dbbridge.asgi import DBBridgeASGIApp, get_asgi_application
from async_dbbridge.testing import server_session_count
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

requires_lanes = pytest.mark.skipif(
    not LANES_SUPPORTED, reason="request lanes need asgiref >= 3.13"
)


@pytest.fixture
def project(settings: SettingsWrapper) -> Iterator[SettingsWrapper]:
    for key, value in OVERRIDES.items():
        setattr(settings, key, value)
    probe.reset()
    yield settings
    open_all_gates()


def open_all_gates() -> None:
    """Never leave a view blocked on a gate (its lane could not be joined)."""
    for gate in list(probe.gates.values()):
        gate.set()
    for async_gate in list(probe.async_gates.values()):
        async_gate.set()


@pytest.fixture
def make_app(project: SettingsWrapper) -> Iterator[MakeApp]:
    """Build wrapped Django apps with ASYNC_DBBRIDGE settings; close their lanes after."""
    apps: list[DBBridgeASGIApp] = []

    def make(inner: Any = None, **bridge: Any) -> DBBridgeASGIApp:
        project.ASYNC_DBBRIDGE = {"MAX_WORKERS": 4, **bridge}
        # Built after the settings: the handler loads MIDDLEWARE when created.
        app = DBBridgeASGIApp(inner if inner is not None else ASGIHandler())
        apps.append(app)
        return app

    yield make
    open_all_gates()
    for app in apps:
        lanes = app.lanes
        if lanes is not None:
            lanes.close()
            assert lanes.join(10), f"{lanes!r} did not exit"


def lane_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "-lane-" in t.name]


# -- lifespan ------------------------------------------------------------------


@requires_lanes
async def test_lifespan_startup_installs_bridge_and_shutdown_closes_everything(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(LANES=2)
    lifespan = Lifespan(app)
    assert await lifespan.startup() == {"type": "lifespan.startup.complete"}
    assert app.mode == "lanes"
    assert app.lanes is not None

    # The loop's default executor is now the bridge.
    response = await call_http(app, "/default-executor/")
    assert response.json()["thread"].startswith("dbbridge-")
    # A lane and a bridge worker each keep a connection (CONN_MAX_AGE=60).
    response = await call_http(app, "/db-call/")
    assert response.status == 200
    response = await call_http(app, "/sync-query/")
    assert response.json()["thread"].startswith("dbbridge-lane-")
    assert await sessions_become(2) == 2
    bridge = get_bridge_executor()
    stats = bridge.stats()
    assert (stats.lanes, stats.lanes_in_use) == (1, 0)
    assert stats.request_mode == "lanes"
    assert stats.open_connections == 1
    assert app.lanes.stats().connections_open == {"default": 1}

    assert await lifespan.shutdown() == {"type": "lifespan.shutdown.complete"}
    # Joined before shutdown.complete: no lane or bridge thread is left.
    assert app.lanes.stats().lanes == 0
    assert bridge.stats().workers == 0
    assert bridge.stats().shutdown
    assert lane_threads() == []
    await sessions_become(0)


async def test_lifespan_startup_failure_names_the_setting(make_app: MakeApp) -> None:
    app = make_app(LANE_FULL="sometimes")
    message = await Lifespan(app).startup()
    assert message["type"] == "lifespan.startup.failed"
    assert "LANE_FULL" in message["message"]
    assert "'temporary' or 'wait'" in message["message"]


async def test_lifespan_is_not_passed_on() -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    app = DBBridgeASGIApp(inner)
    lifespan = Lifespan(app)
    assert (await lifespan.startup())["type"] == "lifespan.startup.complete"
    assert (await lifespan.shutdown())["type"] == "lifespan.shutdown.complete"
    assert seen == []


@requires_lanes
async def test_shutdown_drain_is_bounded_and_does_not_block_the_loop(
    make_app: MakeApp, db_settings: SetSetting, caplog: pytest.LogCaptureFixture
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(LANES=2, SHUTDOWN_TIMEOUT=0.3)
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
    assert not request.done()

    # The stuck request still finishes; its lane then closes its connection
    # and exits instead of going back to the (closed) set.
    probe.gates["stuck"].set()
    response = await request
    assert response.status == 200
    assert app.lanes is not None
    assert await off_loop(app.lanes.join, 10)
    await sessions_become(0)


@requires_lanes
async def test_second_startup_replaces_closed_lanes(make_app: MakeApp) -> None:
    app = make_app(LANES=1)
    first = Lifespan(app)
    await first.startup()
    old_lanes = app.lanes
    await first.shutdown()
    second = Lifespan(app)
    await second.startup()
    assert app.lanes is not None
    assert app.lanes is not old_lanes
    assert not app.lanes.closing
    assert (await call_http(app, "/sync-query/")).status == 200
    await second.shutdown()


# -- scopes ----------------------------------------------------------------------


async def test_websocket_and_other_scopes_pass_through_untouched() -> None:
    seen: list[tuple[Mapping[str, Any], object]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        # No lane, no thread-sensitive context of ours around it.
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


@requires_lanes
async def test_without_lifespan_first_request_sets_up_once_per_loop(make_app: MakeApp) -> None:
    app = make_app(LANES=2)
    assert app.mode is None
    response = await call_http(app, "/default-executor/")
    assert response.json()["thread"].startswith("dbbridge-")
    lanes = app.lanes
    assert lanes is not None
    await call_http(app, "/sync-query/")
    assert app.lanes is lanes
    assert get_bridge_executor().stats().lanes == 1


def test_get_asgi_application_wraps_djangos_handler(project: SettingsWrapper) -> None:
    app = get_asgi_application()
    assert isinstance(app, DBBridgeASGIApp)
    assert isinstance(app.app, ASGIHandler)


# -- lanes -----------------------------------------------------------------------


@requires_lanes
async def test_a_request_runs_all_its_sync_work_on_one_lane(make_app: MakeApp) -> None:
    signal_threads: list[str] = []

    def record(**kwargs: object) -> None:
        signal_threads.append(threading.current_thread().name)

    request_started.connect(record, dispatch_uid="test-record-start")
    request_finished.connect(record, dispatch_uid="test-record-finish")
    try:
        app = make_app(LANES=2)
        response = await call_http(app, "/threads/")
    finally:
        request_started.disconnect(dispatch_uid="test-record-start")
        request_finished.disconnect(dispatch_uid="test-record-finish")
    assert response.status == 200
    names = response.json()
    lane = names["sync_to_async"]
    assert lane.startswith("dbbridge-lane-")
    assert names["orm"] == names["sync_to_async_again"] == lane
    assert response.headers[b"x-middleware-thread"].decode() == lane
    assert signal_threads == [lane, lane]
    # db_call goes to the bridge, a different pool: never waits for a lane.
    assert names["db_call"].startswith("dbbridge-")
    assert "-lane-" not in names["db_call"]


@requires_lanes
async def test_async_to_sync_inside_a_sync_view_comes_back_to_its_lane(
    make_app: MakeApp,
) -> None:
    app = make_app(LANES=1, LANE_FULL="wait")
    response = await asyncio.wait_for(call_http(app, "/nested/"), timeout=10)
    names = response.json()
    assert names["view"] == names["inner"]
    assert names["view"].startswith("dbbridge-lane-")


@requires_lanes
async def test_connections_are_reused_across_requests(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(LANES=1)
    for _ in range(5):
        response = await call_http(app, "/sync-query/")
        assert response.status == 200
    assert app.lanes is not None
    stats = app.lanes.stats()
    assert stats.requests == 5
    assert stats.connections_opened == {"default": 1}
    assert stats.connections_open == {"default": 1}
    assert await sessions_become(1) == 1


@requires_lanes
async def test_conn_max_age_zero_closes_at_request_end(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=0)
    app = make_app(LANES=1)
    for _ in range(3):
        assert (await call_http(app, "/sync-query/")).status == 200
    assert app.lanes is not None
    stats = app.lanes.stats()
    # Opened per request (it did connect), closed when the request ended.
    assert stats.connections_opened == {"default": 3}
    assert stats.connections_open == {"default": 0}
    await sessions_become(0)


@requires_lanes
async def test_a_pure_async_app_takes_no_lane(make_app: MakeApp) -> None:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = make_app(inner, LANES=2)
    assert (await call_http(app, "/")).status == 204
    assert app.lanes is not None
    stats = app.lanes.stats()
    assert (stats.lanes, stats.requests, stats.temporaries_started) == (0, 0, 0)
    assert lane_threads() == []


@requires_lanes
@pytest.mark.parametrize("view", ["async-stream", "long-poll"])
async def test_a_django_request_without_sync_work_takes_no_lane(
    make_app: MakeApp, project: SettingsWrapper, view: str
) -> None:
    # No sync middleware: the request's only thread-sensitive work would be
    # Django's own request-signal receivers (left to the lane) and, at the
    # end, response.close() — which runs on the bridge, as no lane is bound.
    project.MIDDLEWARE = []
    finished_on: list[str] = []

    def record(**kwargs: object) -> None:
        finished_on.append(threading.current_thread().name)

    app = make_app(LANES=1, LANE_FULL="wait", LANE_WAIT_TIMEOUT=None)
    request_finished.connect(record, dispatch_uid="test-record-finish")
    try:
        # The only lane is taken, and requests wait for a lane for ever: had
        # the request wanted one at any point, it could not finish.
        busy = asyncio.create_task(call_http(app, "/gate/busy/"))
        await entered("busy")
        probe.async_gates["poll"] = asyncio.Event()
        request = asyncio.create_task(call_http(app, f"/{view}/poll/"))
        await entered("poll")
        lanes = app.lanes
        assert lanes is not None
        stats = lanes.stats()
        assert (stats.lanes, stats.in_use, stats.waiting) == (1, 1, 0)
        probe.async_gates["poll"].set()
        response = await asyncio.wait_for(request, timeout=10)
        assert response.status == 200
        assert finished_on
        assert "-lane-" not in finished_on[0]
        assert finished_on[0].startswith("dbbridge-")
        assert lanes.stats().waiting == 0
        assert lanes.stats().temporaries_started == 0
    finally:
        request_finished.disconnect(dispatch_uid="test-record-finish")
        probe.gates["busy"].set()
    assert (await busy).status == 200
    assert lanes.stats().requests == 1  # only the one that queried


@requires_lanes
async def test_the_lane_goes_back_as_soon_as_response_close_returns(
    make_app: MakeApp,
) -> None:
    # Django sends request_finished from response.close(), its request's last
    # sync call: the lane cleans up and goes back right there, not when the
    # event loop next gets to the request. Sync work the request does after
    # that has no lane to share and runs on the bridge.
    seen: dict[str, Any] = {}
    django_app = ASGIHandler()

    def after_the_request() -> str:
        return (Item.objects.count(), threading.current_thread().name)[1]

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await django_app(scope, receive, send)
        lanes = app.lanes
        assert lanes is not None
        # The wrapper has not released anything yet: the lane did it itself.
        seen["stats"] = lanes.stats()
        seen["later"] = await sync_to_async(after_the_request)()

    app = make_app(inner, LANES=1)
    response = await call_http(app, "/sync-query/")
    assert response.json()["thread"].startswith("dbbridge-lane-")
    stats = seen["stats"]
    assert (stats.in_use, stats.idle, stats.requests) == (0, 1, 1)
    assert "-lane-" not in seen["later"]
    assert seen["later"].startswith("dbbridge-")


def test_djangos_own_request_signal_receivers_stand_aside_only_in_lane_requests() -> None:
    from django.db import close_old_connections, reset_queries

    from async_dbbridge._lanes import current_request_lane

    lanes = LaneSet(1)  # the first lane set installs the hooks
    try:
        started, _ = request_started._live_receivers(None)
        finished, _ = request_finished._live_receivers(None)
        assert close_old_connections in started
        assert reset_queries in started
        assert close_old_connections in finished
        token = current_request_lane.set(lanes.request_lane())
        try:
            started, _ = request_started._live_receivers(None)
            finished, _ = request_finished._live_receivers(None)
        finally:
            current_request_lane.reset(token)
        assert close_old_connections not in started
        assert reset_queries not in started
        assert close_old_connections not in finished
    finally:
        lanes.close()
        assert lanes.join(10)


@requires_lanes
@pytest.mark.requires_server
@pytest.mark.parametrize("health_checks", [True, False])
async def test_lanes_honour_conn_health_checks_like_wsgi(
    make_app: MakeApp, db_settings: SetSetting, health_checks: bool
) -> None:
    # Django's own request_started receiver (which re-arms the health check)
    # is left out of lane requests: the lane re-arms it when it is bound.
    db_settings(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=health_checks)
    app = make_app(LANES=1)
    first = await call_http(app, "/backend/")
    assert first.status == 200
    await orm(functools.partial(kill_backend, "default", first.json()["backend"]))
    statuses = [(await call_http(app, "/backend/")).status for _ in range(3)]
    if health_checks:
        # The dead connection is noticed before the request's first query.
        assert statuses == [200, 200, 200]
    else:
        # As under WSGI: the first request fails, and its end closes the
        # broken connection, so the next reconnect.
        assert statuses == [500, 200, 200]
    assert app.lanes is not None
    assert app.lanes.stats().connections_opened == {"default": 2}


@requires_lanes
async def test_streaming_response_keeps_its_lane_until_the_body_is_sent(
    make_app: MakeApp,
) -> None:
    app = make_app(LANES=2)
    probe.async_gates["s"] = asyncio.Event()
    started = asyncio.Event()
    request = asyncio.create_task(call_http(app, "/stream/s/", on_start=started.set))
    await entered("s")
    assert started.is_set()
    lanes = app.lanes
    assert lanes is not None
    # The view has returned, the response has started: the lane is still taken.
    assert lanes.stats().in_use == 1
    probe.async_gates["s"].set()
    response = await request
    assert response.body == b"start;count=0"
    assert lanes.stats().in_use == 0
    view_thread, body_thread = probe.threads["s"]
    assert view_thread == body_thread
    assert view_thread.startswith("dbbridge-lane-")


@requires_lanes
async def test_transaction_left_open_is_rolled_back_and_reported(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(LANES=1)
    with pytest.warns(TransactionLeftOpenWarning, match=r"GET /leave-atomic/.*'default'"):
        response = await call_http(app, "/leave-atomic/")
    assert response.status == 200
    # The same lane serves the next request in a clean state, on a new connection.
    response = await call_http(app, "/sync-query/")
    assert response.json()["count"] == 0
    assert not await orm(Item.objects.filter(name="leftover").exists)
    assert app.lanes is not None
    assert app.lanes.stats().connections_opened == {"default": 2}
    await sessions_become(1)


@requires_lanes
@pytest.mark.parametrize("full", ["wait", "temporary"])
async def test_no_deadlock_with_more_requests_than_lanes(
    make_app: MakeApp, db_settings: SetSetting, full: str
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(LANES=2, MAX_WORKERS=2, LANE_FULL=full)
    lifespan = Lifespan(app)
    await lifespan.startup()
    responses: list[Response] = await asyncio.wait_for(
        asyncio.gather(*(call_http(app, "/combo/") for _ in range(40))), timeout=60
    )
    assert {r.status for r in responses} == {200}
    assert app.lanes is not None
    stats = app.lanes.stats()
    assert stats.requests == 40
    if full == "wait":
        assert stats.temporaries_started == 0
        assert stats.connections_opened["default"] <= 2
    await lifespan.shutdown()
    await sessions_become(0)


@requires_lanes
async def test_wait_mode_queues_requests_for_a_lane(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(LANES=1, LANE_FULL="wait")
    first = asyncio.create_task(call_http(app, "/gate/first/"))
    await entered("first")
    second = asyncio.create_task(call_http(app, "/gate/second/"))
    lanes = app.lanes
    assert lanes is not None
    await eventually(lambda: lanes.stats().waiting == 1)
    assert not second.done()
    assert not probe.entered["second"].is_set()
    assert await off_loop(server_session_count) == 1

    probe.gates["first"].set()
    await entered("second")
    probe.gates["second"].set()
    a, b = await asyncio.gather(first, second)
    assert a.json()["thread"] == b.json()["thread"]
    assert lanes.stats().connections_opened == {"default": 1}


@requires_lanes
async def test_temporary_mode_closes_the_temporary_threads_connections(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(LANES=1, LANE_FULL="temporary")
    first = asyncio.create_task(call_http(app, "/gate/first/"))
    await entered("first")
    probe.gates["second"].set()
    second = await call_http(app, "/gate/second/")
    assert "-lane-tmp-" in second.json()["thread"]
    assert not first.done()
    lanes = app.lanes
    assert lanes is not None
    # The temporary thread had a connection and closed it when its request ended.
    assert lanes.stats().temporaries_started == 1
    assert lanes.stats().temporary == 0
    assert await sessions_become(1) == 1

    probe.gates["first"].set()
    assert (await first).json()["thread"].startswith("dbbridge-lane-")


@requires_lanes
async def test_idle_lanes_retire_and_close_their_connections(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(LANES=2, LANE_IDLE_TIMEOUT=0.2)
    assert (await call_http(app, "/sync-query/")).status == 200
    lanes = app.lanes
    assert lanes is not None
    assert lanes.stats().connections_opened == {"default": 1}
    await eventually(lambda: lanes.stats().lanes == 0)
    assert await off_loop(lanes.join, 10)  # the retired thread has ended
    assert lane_threads() == []
    await sessions_become(0)
    # A retired lane is replaced on demand.
    assert (await call_http(app, "/sync-query/")).status == 200
    assert lanes.stats().requests == 2


@requires_lanes
async def test_cancelled_request_gives_its_lane_back(make_app: MakeApp) -> None:
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

    app = make_app(inner, LANES=1, LANE_FULL="wait")
    request = asyncio.create_task(call_http(app, "/"))
    await eventually(started.is_set)
    request.cancel()
    # The running call cannot be interrupted: the release waits behind it.
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await request
    lanes = app.lanes
    assert lanes is not None
    assert lanes.stats().in_use == 0
    # The single lane is free again, for a request that would otherwise wait.
    started.clear()
    response = await asyncio.wait_for(call_http(app, "/"), timeout=10)
    assert response.status == 204
    assert lanes.stats().requests == 2


# -- without lanes ---------------------------------------------------------------


async def test_lanes_disabled_closes_per_request_connections(
    make_app: MakeApp, db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(LANES=0)
    response = await call_http(app, "/sync-query/")
    assert response.status == 200
    assert app.mode == "per-request"
    assert app.lanes is None
    assert "-lane-" not in response.json()["thread"]
    # Django alone would strand this connection (CONN_MAX_AGE=60, dead thread).
    await sessions_become(0)
    stats = get_bridge_executor().stats()
    assert stats.lanes == 0
    # How the fallback (asgiref < 3.13, or LANES=0) shows in stats().
    assert stats.request_mode == "per-request"


async def test_lanes_disabled_reports_transaction_left_open(make_app: MakeApp) -> None:
    app = make_app(LANES=0)
    with pytest.warns(TransactionLeftOpenWarning, match="GET /leave-atomic/"):
        await call_http(app, "/leave-atomic/")
    assert not await orm(Item.objects.filter(name="leftover").exists)
    await sessions_become(0)


async def test_old_asgiref_falls_back_to_per_request_threads(
    make_app: MakeApp,
    db_settings: SetSetting,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(async_dbbridge.asgi, "LANES_SUPPORTED", False)
    db_settings(CONN_MAX_AGE=60)
    app = make_app(LANES=4)
    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        response = await call_http(app, "/sync-query/")
    assert response.status == 200
    assert app.mode == "per-request"
    assert "asgiref >= 3.13" in caplog.text
    await sessions_become(0)


def test_lane_support_is_detected_from_asgiref() -> None:
    # Lane tests are skipped without support: make sure that only happens on
    # an asgiref that really lacks ThreadSensitiveContext(executor=...).
    import asgiref

    major, minor = (int(part) for part in asgiref.__version__.split(".")[:2])
    assert ((major, minor) >= (3, 13)) == LANES_SUPPORTED


def test_check_warns_when_lanes_are_unavailable(
    settings: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    import async_dbbridge._lanes
    from async_dbbridge.checks import check_settings

    settings.ASYNC_DBBRIDGE = {"LANES": 4}
    monkeypatch.setattr(async_dbbridge._lanes, "LANES_SUPPORTED", True)
    assert check_settings() == []
    monkeypatch.setattr(async_dbbridge._lanes, "LANES_SUPPORTED", False)
    [message] = check_settings()
    assert message.id == "async_dbbridge.W001"
    settings.ASYNC_DBBRIDGE = {"LANES": 0}
    assert check_settings() == []


def test_settings_are_validated(settings: SettingsWrapper) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from async_dbbridge.conf import get_settings

    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 3}
    parsed = get_settings()
    assert (parsed.lanes, parsed.lane_full) == (3, "wait")
    assert parsed.lane_idle_timeout == parsed.idle_timeout
    assert parsed.shutdown_timeout == 10.0
    assert parsed.lane_wait_timeout == 1.0
    settings.ASYNC_DBBRIDGE = {"LANE_FULL": "temporary"}
    assert get_settings().lane_wait_timeout is None
    settings.ASYNC_DBBRIDGE = {"LANE_WAIT_TIMEOUT": None}
    assert get_settings().lane_wait_timeout is None  # wait for ever
    settings.ASYNC_DBBRIDGE = {"LANE_FULL": "wait", "LANE_WAIT_TIMEOUT": 2}
    assert get_settings().lane_wait_timeout == 2.0
    for key, value, expected in [
        ("LANES", -1, "an integer >= 0"),
        ("LANES", True, "an integer >= 0"),
        ("LANE_FULL", "block", "'temporary' or 'wait'"),
        ("LANE_IDLE_TIMEOUT", 0, "> 0"),
        ("SHUTDOWN_TIMEOUT", "10", "a number of seconds"),
        ("LANE_WAIT_TIMEOUT", 0, "> 0"),
    ]:
        settings.ASYNC_DBBRIDGE = {key: value}
        with pytest.raises(ImproperlyConfigured, match=rf"\['{key}'\].*{expected}"):
            get_settings()
    settings.ASYNC_DBBRIDGE = {"LANE_FULL": "temporary", "LANE_WAIT_TIMEOUT": 1.0}
    with pytest.raises(ImproperlyConfigured, match="None unless LANE_FULL is 'wait'"):
        get_settings()
