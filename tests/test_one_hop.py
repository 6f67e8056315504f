"""One hop per sync request: the same behaviour as Django's ASGI handler, in two thread calls.

Every scenario runs through Django's own `ASGIHandler` and through the wrapper
with `ONE_HOP` on, and must log the same middleware hooks, signals and view
calls, in the same order, seeing the same statuses, and answer with the same
status, headers and body. The one-hop side must also run all of it on one
request thread, in two thread-sensitive calls.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar

import pytest
from asgiref.sync import iscoroutinefunction, sync_to_async
from django.core import signals
from django.core.handlers.asgi import ASGIHandler
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    StreamingHttpResponse,
)
from django.template import engines
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.deprecation import MiddlewareMixin
from pytest_django.fixtures import Settings as SettingsWrapper

from async_dbbridge import _compat
from async_dbbridge._compat import REQUEST_THREADS_SUPPORTED
from async_dbbridge._one_hop import OneHop, install_one_hop, uninstall_one_hop
from async_dbbridge.asgi import DBBridgeASGIApp
from async_dbbridge.conf import parse_settings
from tests.e2e_project.driver import Lifespan, Response, call_http
from tests.testapp.models import Item

pytestmark = pytest.mark.skipif(
    not REQUEST_THREADS_SUPPORTED, reason="request threads need asgiref >= 3.13"
)

# (who, what, status seen or None, thread name)
Entry = tuple[str, str, int | None, str]
LOG: list[Entry] = []
SCRIPT: dict[tuple[str, str], str] = {}


def _log(who: str, what: str, response: HttpResponseBase | None = None) -> None:
    status = None if response is None else response.status_code
    LOG.append((who, what, status, threading.current_thread().name))


def _act(who: str, what: str) -> HttpResponse | None:
    action = SCRIPT.get((who, what))
    if action == "respond":
        return HttpResponse(f"{who}.{what}", status=299, headers={"X-By": who})
    if action == "raise":
        raise ValueError(f"{who}.{what} failed")
    return None


class _Logged(MiddlewareMixin):
    name = "?"

    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        _log(self.name, "request")
        return _act(self.name, "request")

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> Any:
        _log(self.name, "response", response)
        replaced = _act(self.name, "response")
        response["X-Seen-By-" + self.name] = "yes"
        return response if replaced is None else replaced


class A(_Logged):
    name = "A"


class B(_Logged):
    name = "B"


class C(_Logged):
    name = "C"

    def process_view(self, request: HttpRequest, *args: Any) -> HttpResponse | None:
        _log(self.name, "view")
        return _act(self.name, "view")

    def process_exception(self, request: HttpRequest, exception: Exception) -> Any:
        _log(self.name, "exception")
        return _act(self.name, "exception")

    def process_template_response(self, request: HttpRequest, response: Any) -> Any:
        _log(self.name, "template", response)
        response.context_data = {"who": "C"}
        return response


def old_style(get_response: Callable[[HttpRequest], Any]) -> Callable[[HttpRequest], Any]:
    """A function middleware, sync only (Django adapts it under ASGI)."""

    def middleware(request: HttpRequest) -> Any:
        _log("F", "request")
        response = get_response(request)
        _log("F", "response", response)
        return response

    return middleware


class SwitchUrlconf(MiddlewareMixin):
    """Points the request at another URLconf whose view is async."""

    def process_request(self, request: HttpRequest) -> None:
        if request.path == "/switch/":
            request.urlconf = switched  # type: ignore[assignment]  # a URLconf module stand-in


class AsyncOnly:
    """An async-only middleware: the one-hop path must stand aside."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    async def __call__(self, request: HttpRequest) -> Any:
        _log("X", "request")
        return await self.get_response(request)


# -- views -----------------------------------------------------------------------------------


def sync_view(request: HttpRequest) -> HttpResponse:
    _log("view", "sync")
    response = HttpResponse("sync view", headers={"X-View": "sync"})
    response.set_cookie("flavour", "oatmeal")
    return response


async def async_view(request: HttpRequest) -> HttpResponse:
    _log("view", "async")
    return HttpResponse("async view")


def raising_view(request: HttpRequest) -> HttpResponse:
    _log("view", "raise")
    raise ValueError("the view failed")


def query_view(request: HttpRequest) -> HttpResponse:
    _log("view", "query")
    return HttpResponse(str(Item.objects.count()))


def template_view(request: HttpRequest) -> TemplateResponse:
    _log("view", "template")
    template = engines["django"].from_string("rendered by {{ who }}")
    return TemplateResponse(request, template, {"who": "the view"})


def streaming_sync_view(request: HttpRequest) -> StreamingHttpResponse:
    _log("view", "stream")
    return StreamingHttpResponse(iter([b"one ", b"two"]))


async def _chunks() -> AsyncIterator[bytes]:
    yield b"async "
    yield b"chunks"


def streaming_async_view(request: HttpRequest) -> StreamingHttpResponse:
    _log("view", "astream")
    return StreamingHttpResponse(_chunks())


class ClosingResponse(HttpResponse):
    def close(self) -> None:
        _log("response", "close")
        super().close()


def closing_view(request: HttpRequest) -> HttpResponse:
    _log("view", "closing")
    return ClosingResponse("closing")


def file_view(request: HttpRequest) -> FileResponse:
    _log("view", "file")
    return FileResponse(open(__file__, "rb"))


def switch_view(request: HttpRequest) -> HttpResponse:  # pragma: no cover - never reached
    _log("view", "unswitched")
    return HttpResponse("unswitched")


urlpatterns = [
    path("sync/", sync_view),
    path("async/", async_view),
    path("raise/", raising_view),
    path("query/", query_view),
    path("template/", template_view),
    path("stream/", streaming_sync_view),
    path("astream/", streaming_async_view),
    path("closing/", closing_view),
    path("file/", file_view),
    path("switch/", switch_view),
]


class switched:
    urlpatterns: ClassVar[list[Any]] = [path("switch/", async_view)]


HERE = __name__
CHAIN = [f"{HERE}.A", f"{HERE}.old_style", f"{HERE}.B", f"{HERE}.SwitchUrlconf", f"{HERE}.C"]


def _on_started(sender: object, **kwargs: object) -> None:
    _log("signal", "started")


def _on_finished(sender: object, **kwargs: object) -> None:
    _log("signal", f"finished:{getattr(sender, '__name__', sender)}")


@pytest.fixture
def project(settings: SettingsWrapper) -> Iterator[SettingsWrapper]:
    settings.ROOT_URLCONF = HERE
    settings.ALLOWED_HOSTS = ["testserver"]
    settings.MIDDLEWARE = CHAIN
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 2, "POOL_SIZE": 2}
    signals.request_started.connect(_on_started, dispatch_uid="test_one_hop.started")
    signals.request_finished.connect(_on_finished, dispatch_uid="test_one_hop.finished")
    LOG.clear()
    SCRIPT.clear()
    yield settings
    signals.request_started.disconnect(dispatch_uid="test_one_hop.started")
    signals.request_finished.disconnect(dispatch_uid="test_one_hop.finished")
    LOG.clear()
    SCRIPT.clear()


@pytest.fixture
def apps() -> Iterator[list[DBBridgeASGIApp]]:
    made: list[DBBridgeASGIApp] = []
    yield made
    for app in made:
        if app.request_threads is not None:
            assert app.request_threads.close(10)


Outcome = tuple[int, dict[bytes, bytes], bytes, list[tuple[str, str, int | None]]]


async def outcome(app: Any, url: str) -> tuple[Outcome, list[str]]:
    LOG.clear()
    response: Response = await call_http(app, url)
    headers = dict(response.headers)
    # A FileResponse's Last-Modified-free headers are stable; nothing else varies.
    calls = [(who, what, status) for who, what, status, _ in LOG]
    threads = [thread for *_, thread in LOG]
    return (response.status, headers, response.body, calls), threads


SCENARIOS: dict[str, tuple[str, dict[tuple[str, str], str]]] = {
    "sync view": ("/sync/", {}),
    "async view": ("/async/", {}),
    "view raises": ("/raise/", {}),
    "view raises, process_exception answers": ("/raise/", {("C", "exception"): "respond"}),
    "no such url": ("/nowhere/", {}),
    "outermost answers": ("/sync/", {("A", "request"): "respond"}),
    "middle answers": ("/sync/", {("B", "request"): "respond"}),
    "request raises": ("/sync/", {("B", "request"): "raise"}),
    "process_view answers": ("/sync/", {("C", "view"): "respond"}),
    "process_view raises": ("/sync/", {("C", "view"): "raise"}),
    "response raises": ("/sync/", {("C", "response"): "raise"}),
    "outermost response raises": ("/sync/", {("A", "response"): "raise"}),
    "template response": ("/template/", {}),
    "streaming, sync iterator": ("/stream/", {}),
    "streaming, async iterator": ("/astream/", {}),
    "response with its own close()": ("/closing/", {}),
    "file response": ("/file/", {}),
    "middleware switches to an async view": ("/switch/", {}),
}

#: Scenarios whose work runs partly on the event loop in both paths.
ON_THE_LOOP = {"async view", "streaming, async iterator", "middleware switches to an async view"}


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous iterators")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_one_hop_behaves_as_djangos_asgi_handler(
    project: SettingsWrapper, apps: list[DBBridgeASGIApp], scenario: str
) -> None:
    url, script = SCENARIOS[scenario]
    SCRIPT.update(script)
    expected, _ = await outcome(ASGIHandler(), url)
    app = DBBridgeASGIApp(ASGIHandler())
    apps.append(app)
    got, threads = await outcome(app, url)
    assert isinstance(_compat.instance_handle(app.app), OneHop)
    assert got == expected
    assert expected[3], "the scenario logged nothing: it proves nothing"
    # Exactly one request_started and one request_finished, naming Django's handler.
    calls = got[3]
    assert calls[0] == ("signal", "started", None)
    assert [c for c in calls if c[0] == "signal"] == [
        ("signal", "started", None),
        ("signal", "finished:ASGIHandler", None),
    ]
    if scenario not in ON_THE_LOOP:
        assert len(set(threads)) == 1, threads
        assert threads[0].startswith("dbbridge-request-")


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous iterators")
@pytest.mark.django_db(transaction=True)
async def test_a_sync_request_is_one_thread_call_an_async_one_takes_djangos_path(
    project: SettingsWrapper, apps: list[DBBridgeASGIApp], count_submits: list[str]
) -> None:
    app = DBBridgeASGIApp(ASGIHandler())
    apps.append(app)
    response = await call_http(app, "/query/")
    assert (response.status, response.body) == (200, b"0")
    # The whole sync part in one call, response.close() after the send included.
    assert len(count_submits) == 1, count_submits
    assert "OneHop._respond_on_thread" in count_submits[0]
    count_submits.clear()
    # A streaming response is sent from the loop, which iterates it through
    # calls on the request's thread: its close is a call of its own.
    response = await call_http(app, "/stream/")
    assert response.status == 200
    assert "OneHop._respond_on_thread" in count_submits[0]
    assert "_close_after_send" in count_submits[-1]
    count_submits.clear()
    response = await call_http(app, "/async/")
    assert (response.status, response.body) == (200, b"async view")
    assert not any("OneHop" in name for name in count_submits)
    assert len(count_submits) > 2  # Django's own path: a call per sync hook


@pytest.mark.django_db(transaction=True)
async def test_debug_propagate_exceptions_raises_out_of_both(
    project: SettingsWrapper, apps: list[DBBridgeASGIApp]
) -> None:
    project.DEBUG_PROPAGATE_EXCEPTIONS = True
    with pytest.raises(ValueError, match="the view failed"):
        await call_http(ASGIHandler(), "/raise/")
    # Django 5.2's handle() leaves the request body open when an exception
    # propagates (6.1 closes it): collect it here, where its warning is Django's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    app = DBBridgeASGIApp(ASGIHandler())
    apps.append(app)
    with pytest.raises(ValueError, match="the view failed"):
        await call_http(app, "/raise/")
    gc.collect()  # the one-hop path closed its request body: no warning here


async def test_an_async_only_middleware_keeps_djangos_path(
    project: SettingsWrapper, apps: list[DBBridgeASGIApp], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="async_dbbridge")
    project.MIDDLEWARE = [f"{HERE}.AsyncOnly", *CHAIN]
    app = DBBridgeASGIApp(ASGIHandler())
    apps.append(app)
    lifespan = Lifespan(app)
    assert (await lifespan.startup())["type"] == "lifespan.startup.complete"
    try:
        assert _compat.instance_handle(app.app) is None
        started = [r.getMessage() for r in caplog.records if "started" in r.getMessage()]
        assert (
            f"sync views in one thread hop (ONE_HOP): no, middleware {HERE}.AsyncOnly is "
            "async-only (sync_capable = False)"
        ) in started[0]
        response = await call_http(app, "/sync/")
        assert (response.status, response.body) == (200, b"sync view")
        assert LOG[1][:2] == ("X", "request")
    finally:
        assert (await lifespan.shutdown())["type"] == "lifespan.shutdown.complete"


async def test_the_setting_turns_it_off_and_the_startup_line_says_so(
    project: SettingsWrapper, apps: list[DBBridgeASGIApp], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="async_dbbridge")
    app = DBBridgeASGIApp(ASGIHandler())
    apps.append(app)
    lifespan = Lifespan(app)
    assert (await lifespan.startup())["type"] == "lifespan.startup.complete"
    assert (await lifespan.shutdown())["type"] == "lifespan.shutdown.complete"
    assert isinstance(_compat.instance_handle(app.app), OneHop)
    project.ASYNC_DBBRIDGE = {"MAX_WORKERS": 2, "ONE_HOP": False}
    lifespan = Lifespan(app)
    assert (await lifespan.startup())["type"] == "lifespan.startup.complete"
    try:
        assert _compat.instance_handle(app.app) is None
    finally:
        assert (await lifespan.shutdown())["type"] == "lifespan.shutdown.complete"
    started = [r.getMessage() for r in caplog.records if "started" in r.getMessage()]
    assert (
        "sync views in one thread hop (ONE_HOP): yes, 5 middleware in one sync chain"
        in (started[0])
    )
    assert "sync views in one thread hop (ONE_HOP): no, ONE_HOP is False" in started[1]


def test_a_django_it_was_not_checked_against_keeps_djangos_path(
    project: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    import django

    series = django.VERSION[:2]
    table = dict(_compat.FINGERPRINTS[series])
    table["django.core.handlers.asgi.ASGIHandler.handle"] = "0" * 16
    monkeypatch.setitem(_compat.FINGERPRINTS, series, table)
    handler = ASGIHandler()
    verdict = install_one_hop(handler)
    assert not verdict.applied
    assert "ASGIHandler.handle differ from the code it was checked against" in verdict.reason
    assert _compat.instance_handle(handler) is None
    monkeypatch.delitem(_compat.FINGERPRINTS, series)
    verdict = install_one_hop(handler)
    assert not verdict.applied
    assert "is not a series it was checked on" in verdict.reason


def test_install_is_idempotent_and_reversible(project: SettingsWrapper) -> None:
    handler = ASGIHandler()
    assert install_one_hop(handler).applied
    hop = _compat.instance_handle(handler)
    assert isinstance(hop, OneHop)
    assert install_one_hop(handler).applied
    assert _compat.instance_handle(handler) is hop
    uninstall_one_hop(handler)
    assert _compat.instance_handle(handler) is None
    assert handler.handle.__func__ is ASGIHandler.handle  # type: ignore[attr-defined]
    assert not install_one_hop(object()).applied


def test_the_one_hop_setting_is_validated() -> None:
    assert parse_settings({}).one_hop is True
    assert parse_settings({"ONE_HOP": False}).one_hop is False
    with pytest.raises(Exception, match=r"\['ONE_HOP'\] is 1; expected True or False"):
        parse_settings({"ONE_HOP": 1})


def test_views_are_told_apart_as_django_does() -> None:
    assert not iscoroutinefunction(sync_view)
    assert iscoroutinefunction(async_view)


@pytest.mark.django_db(transaction=True)
async def test_a_library_wrapping_what_the_path_calls_keeps_its_wrapper(
    project: SettingsWrapper, apps: list[DBBridgeASGIApp], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sentry's DjangoIntegration wraps get_response, load_middleware and __call__: the
    one-hop path calls them, so it stays on, and the wrappers run."""
    from django.core.handlers.base import BaseHandler

    original_get_response = BaseHandler.get_response
    original_call = ASGIHandler.__call__

    def get_response(self: BaseHandler, request: HttpRequest) -> Any:
        _log("wrapper", "get_response")
        return original_get_response(self, request)

    async def call(self: ASGIHandler, scope: Any, receive: Any, send: Any) -> None:
        _log("wrapper", "__call__")
        await original_call(self, scope, receive, send)

    monkeypatch.setattr(BaseHandler, "get_response", get_response)
    monkeypatch.setattr(ASGIHandler, "__call__", call)
    app = DBBridgeASGIApp(ASGIHandler())
    apps.append(app)
    response = await call_http(app, "/sync/")
    assert (response.status, response.body) == (200, b"sync view")
    assert isinstance(_compat.instance_handle(app.app), OneHop)
    calls = [(who, what) for who, what, *_ in LOG]
    assert calls[:2] == [("wrapper", "__call__"), ("signal", "started")]
    assert ("wrapper", "get_response") in calls


@pytest.mark.django_db(transaction=True)
async def test_a_thread_sensitive_call_made_while_the_response_is_sent_runs_on_the_waiting_thread(
    project: SettingsWrapper, apps: list[DBBridgeASGIApp]
) -> None:
    """An ASGI middleware around the wrapper may call sync code while it sends.

    The one-hop call waits on the request thread until the response is sent;
    a thread-sensitive call the loop makes for the request meanwhile is queued
    on that same thread. The thread runs it as it waits: a plain wait would
    deadlock, which the timeout turns into a failure here.
    """
    app = DBBridgeASGIApp(ASGIHandler())
    apps.append(app)
    seen: list[str] = []

    def where() -> str:
        return threading.current_thread().name

    async def sending_middleware(scope: Any, receive: Any, send: Any) -> None:
        async def send_and_call(message: Any) -> None:
            if message["type"] == "http.response.start":
                seen.append(await sync_to_async(where)())
            await send(message)

        await app(scope, receive, send_and_call)

    LOG.clear()
    response = await asyncio.wait_for(call_http(sending_middleware, "/sync/"), timeout=30)
    assert response.status == 200
    view_thread = [thread for who, what, _, thread in LOG if (who, what) == ("view", "sync")]
    assert seen == view_thread, (seen, LOG)
    assert seen[0].startswith("dbbridge-request-")
    # The response was closed after the send, in that same call.
    assert [c[:2] for c in LOG if c[0] == "signal"][-1] == ("signal", "finished:ASGIHandler")
