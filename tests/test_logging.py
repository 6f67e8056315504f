"""What reaches the user: one log line per start and stop, one report per leftover transaction.

The wrapper is driven through the lifespan protocol and real requests (see
``tests/test_asgi.py``); records are read from the ``async_dbbridge`` logger
with ``caplog``, warnings with ``warnings.catch_warnings(record=True)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import asgiref
import django
import pytest
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.db import transaction
from pytest_django.fixtures import Settings as SettingsWrapper

import async_dbbridge._compat
from async_dbbridge import TransactionLeftOpenWarning, db_call
from async_dbbridge._compat import REQUEST_THREADS_SUPPORTED
from async_dbbridge.asgi import DBBridgeASGIApp
from tests.conftest import SetSetting, eventually, sessions_become
from tests.e2e_project.driver import Lifespan, call_http
from tests.e2e_project.settings import OVERRIDES
from tests.e2e_project.views import probe
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

requires_request_threads = pytest.mark.skipif(
    not REQUEST_THREADS_SUPPORTED, reason="request threads need asgiref >= 3.13"
)
# Both ways the wrapper serves requests; "per-request" is what asgiref < 3.13 gets.
MODES = [pytest.param("request-threads", marks=requires_request_threads), "per-request"]


@pytest.fixture
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "per-request":
        # Failure injection: the wrapper's feature detection, as on asgiref < 3.13.
        monkeypatch.setattr(async_dbbridge._compat, "REQUEST_THREADS_SUPPORTED", False)
    return str(request.param)


@pytest.fixture
def apps(settings: SettingsWrapper) -> Iterator[list[DBBridgeASGIApp]]:
    """The e2e project's settings; the request threads of every app a test builds end after."""
    for key, value in OVERRIDES.items():
        setattr(settings, key, value)
    probe.reset()
    built: list[DBBridgeASGIApp] = []
    yield built
    for gate in list(probe.gates.values()):
        gate.set()
    for app in built:
        threads = app.request_threads
        if threads is not None:
            assert threads.close(10), f"{threads!r} did not end"


def make_app(
    settings: SettingsWrapper, apps: list[DBBridgeASGIApp], inner: Any = None, **bridge: Any
) -> DBBridgeASGIApp:
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 3, **bridge}
    # Built after the settings: the handler loads MIDDLEWARE when created.
    app = DBBridgeASGIApp(inner if inner is not None else ASGIHandler())
    apps.append(app)
    return app


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    # DEBUG, so that "nothing at INFO" is about the level, not a filter.
    caplog.set_level(logging.DEBUG, logger="async_dbbridge")
    return caplog


def visible(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The library's records a default logging setup shows: INFO and above."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("async_dbbridge") and r.levelno >= logging.INFO
    ]


# -- startup and shutdown ---------------------------------------------------------


@requires_request_threads
async def test_lifespan_logs_one_line_at_startup_and_one_at_shutdown(
    settings: SettingsWrapper,
    apps: list[DBBridgeASGIApp],
    db_settings: SetSetting,
    log: pytest.LogCaptureFixture,
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(settings, apps, POOL_SIZE=2)
    lifespan = Lifespan(app)
    assert await lifespan.startup() == {"type": "lifespan.startup.complete"}
    [started] = visible(log)
    assert started.levelno == logging.INFO
    line = started.getMessage()
    assert line.startswith(f"async_dbbridge started (pid {os.getpid()}): ")
    assert "requests on request threads (HOLD='transaction')" in line
    assert "one connection pool per alias (POOL_SIZE=2 for 'default', 'other', " in line
    assert "POOL_TIMEOUT=5s)" in line
    assert "db_call on bridge workers (MAX_WORKERS=3, POLICY='request')" in line
    assert line.endswith(f"asgiref {asgiref.__version__}, Django {django.get_version()}")
    log.clear()

    # /db-call/ holds two pooled connections at once: the sync middleware's
    # on the request thread, the bridge's; both stay open (CONN_MAX_AGE=60).
    assert (await call_http(app, "/sync-query/")).status == 200
    assert (await call_http(app, "/db-call/")).status == 200
    assert await sessions_become(2) == 2
    assert visible(log) == []

    assert await lifespan.shutdown() == {"type": "lifespan.shutdown.complete"}
    [stopped] = visible(log)
    assert stopped.levelno == logging.INFO
    line = stopped.getMessage()
    assert line.startswith("async_dbbridge stopped in ")
    assert line.endswith("s: closed 2 connection(s), nothing in flight")
    await sessions_become(0)


@pytest.mark.parametrize("mode", ["per-request"], indirect=True)
async def test_without_asgiref_support_startup_is_one_warning_line(
    settings: SettingsWrapper, apps: list[DBBridgeASGIApp], log: pytest.LogCaptureFixture, mode: str
) -> None:
    app = make_app(settings, apps)
    lifespan = Lifespan(app)
    await lifespan.startup()
    # The startup line itself says it, louder; not a second line beside it.
    [started] = visible(log)
    assert started.levelno == logging.WARNING
    assert (
        "requests on per-request threads, closed at request end: request threads "
        "need asgiref >= 3.13" in started.getMessage()
    )
    await lifespan.shutdown()


@requires_request_threads
async def test_shutdown_with_work_in_flight_is_one_warning_line(
    settings: SettingsWrapper,
    apps: list[DBBridgeASGIApp],
    db_settings: SetSetting,
    log: pytest.LogCaptureFixture,
) -> None:
    db_settings(CONN_MAX_AGE=60)
    app = make_app(settings, apps, POOL_SIZE=2, SHUTDOWN_TIMEOUT=0.3)
    lifespan = Lifespan(app)
    await lifespan.startup()
    request = asyncio.create_task(call_http(app, "/gate/stuck/"))
    await eventually(probe.entered["stuck"].is_set)
    # The stuck request's thread holds its connection (the view queried first).
    assert await sessions_become(1) == 1
    log.clear()

    assert await lifespan.shutdown() == {"type": "lifespan.shutdown.complete"}
    [stopped] = visible(log)
    assert stopped.levelno == logging.WARNING
    assert stopped.getMessage() == (
        "async_dbbridge stopped after SHUTDOWN_TIMEOUT=0.3s with work in flight: "
        "1 request(s) on request threads, 0 bridge call(s), holding 1 connection(s) that "
        "close when that work ends; closed 0 connection(s)"
    )

    probe.gates["stuck"].set()
    assert (await request).status == 200
    await sessions_become(0)


@requires_request_threads
async def test_a_burst_of_requests_logs_nothing_at_info(
    settings: SettingsWrapper,
    apps: list[DBBridgeASGIApp],
    db_settings: SetSetting,
    log: pytest.LogCaptureFixture,
) -> None:
    # No sync middleware: it would hold a connection across /db-call/'s
    # db_call, which needs a second one (test_asgi shows how that ends).
    settings.MIDDLEWARE = []
    db_settings(CONN_MAX_AGE=60)
    app = make_app(settings, apps, POOL_SIZE=2, POOL_TIMEOUT=60)
    lifespan = Lifespan(app)
    await lifespan.startup()
    log.clear()
    # More requests than pooled connections, through every path: sync view,
    # async ORM, db_call.
    paths = ["/sync-query/", "/async-orm/", "/db-call/", "/combo/", "/pure-async/"]
    responses = await asyncio.wait_for(
        asyncio.gather(*(call_http(app, paths[i % len(paths)]) for i in range(40))),
        timeout=60,
    )
    assert {r.status for r in responses} == {200}
    assert visible(log) == []
    await lifespan.shutdown()
    await sessions_become(0)


# -- a transaction left open: reported once ----------------------------------------


def reports(caplog: pytest.LogCaptureFixture, caught: list[warnings.WarningMessage]) -> list[str]:
    """Every report of a leftover transaction the user gets: warnings and log records."""
    return [
        str(w.message) for w in caught if issubclass(w.category, TransactionLeftOpenWarning)
    ] + [r.getMessage() for r in visible(caplog)]


@pytest.mark.parametrize("mode", MODES, indirect=True)
async def test_request_leaving_a_transaction_open_is_reported_once(
    settings: SettingsWrapper,
    apps: list[DBBridgeASGIApp],
    log: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    app = make_app(settings, apps)
    lifespan = Lifespan(app)
    await lifespan.startup()
    log.clear()  # the startup line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every emission counts, none is deduplicated
        response = await call_http(app, "/leave-atomic/")
    assert response.status == 200
    [report] = reports(log, caught)
    assert "GET /leave-atomic/ ended inside a transaction on database 'default'" in report
    assert not await db_call(Item.objects.filter(name="leftover").exists)
    await lifespan.shutdown()


async def test_db_call_leaving_a_transaction_open_is_reported_once(
    log: pytest.LogCaptureFixture,
) -> None:
    def leave_open() -> None:
        transaction.atomic().__enter__()
        Item.objects.create(name="leftover", value=-1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await db_call(leave_open)
    [report] = reports(log, caught)
    assert "leave_open returned inside a transaction on database 'default'" in report
    assert not await db_call(Item.objects.filter(name="leftover").exists)


def leave_open_then_fail() -> None:
    transaction.atomic().__enter__()
    Item.objects.create(name="leftover", value=-1)


async def failing_app(scope: Any, receive: Any, send: Any) -> None:
    """Leaves a transaction open in a sync call, then raises: no response at all."""
    await sync_to_async(leave_open_then_fail)()
    raise RuntimeError("the app failed")


@pytest.mark.parametrize("mode", MODES, indirect=True)
async def test_app_error_keeps_its_exception_and_carries_the_report_once(
    settings: SettingsWrapper,
    apps: list[DBBridgeASGIApp],
    log: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    app = make_app(settings, apps, failing_app)
    lifespan = Lifespan(app)
    await lifespan.startup()
    log.clear()  # the startup line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="the app failed"):
            await call_http(app, "/fails/")
    [report] = reports(log, caught)
    assert "GET /fails/ ended inside a transaction on database 'default'" in report

    # Warnings turned into errors: the app's exception is still the one raised,
    # and the report rides on it as a note instead of replacing it.
    with warnings.catch_warnings():
        warnings.simplefilter("error", TransactionLeftOpenWarning)
        with pytest.raises(RuntimeError, match="the app failed") as raised:
            await call_http(app, "/fails/")
    [note] = raised.value.__notes__
    assert "GET /fails/ ended inside a transaction on database 'default'" in note
    assert visible(log) == []
    assert not await db_call(Item.objects.filter(name="leftover").exists)
    await lifespan.shutdown()
