"""Fused middleware: Django's MiddlewareMixin layers in two thread hops, same behaviour.

Every scenario runs through two handlers built from the same MIDDLEWARE — one
as Django built it, one fused — and must log the same middleware calls, in the
same order, seeing the same responses, and answer the same.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import iscoroutinefunction
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.test import AsyncRequestFactory
from django.urls import path
from django.utils.decorators import sync_and_async_middleware
from django.utils.deprecation import MiddlewareMixin
from pytest_django.fixtures import Settings as SettingsWrapper

from async_dbbridge import _compat
from async_dbbridge._compat import REQUEST_THREADS_SUPPORTED
from async_dbbridge._middleware import FusedMiddleware, fuse_middleware, unfuse_middleware
from async_dbbridge.asgi import DBBridgeASGIApp
from async_dbbridge.conf import parse_settings
from tests.e2e_project.driver import Lifespan, call_http
from tests.testapp.models import Item

# (layer, method, status of the response it was given, thread name)
Call = tuple[str, str, int | None, str]
LOG: list[Call] = []
#: (layer, method) -> what that method does: "respond", "raise", "404", "deny"
SCRIPT: dict[tuple[str, str], str] = {}


def _log(name: str, method: str, response: HttpResponseBase | None) -> None:
    status = None if response is None else response.status_code
    LOG.append((name, method, status, threading.current_thread().name))


def _act(name: str, method: str) -> HttpResponse | None:
    action = SCRIPT.get((name, method))
    if action == "respond":
        return HttpResponse(f"{name}.{method}", status=299)
    if action == "raise":
        raise ValueError(f"{name}.{method} failed")
    if action == "404":
        raise Http404(f"{name}.{method}")
    if action == "deny":
        raise PermissionDenied(f"{name}.{method}")
    return None


class _Logged(MiddlewareMixin):
    name = "?"

    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        _log(self.name, "request", None)
        return _act(self.name, "request")

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> Any:
        _log(self.name, "response", response)
        replaced = _act(self.name, "response")
        return response if replaced is None else replaced


class A(_Logged):
    name = "A"


class B(_Logged):
    name = "B"


class C(_Logged):
    name = "C"

    # Django's hook lists (process_view/process_exception) are not fused:
    # they must keep running exactly once, where Django runs them.
    def process_view(self, request: HttpRequest, *args: Any) -> None:
        _log(self.name, "view", None)

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        _log(self.name, "exception", None)


class D(_Logged):
    name = "D"


class W(_Logged):
    """Sync-only, as WhiteNoise is: every layer above it runs in sync mode, and Django
    adapts the async layers inside it with AsyncToSync."""

    name = "W"
    async_capable = False


class RequestOnly(MiddlewareMixin):
    def process_request(self, request: HttpRequest) -> None:
        _log("R", "request", None)


class ResponseOnly(MiddlewareMixin):
    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> Any:
        _log("S", "response", response)
        return response


@sync_and_async_middleware
def hybrid(get_response: Any) -> Any:
    """A native-async middleware: ends the fused run, runs as Django built it."""
    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest) -> Any:
            _log("H", "request", None)
            response = await get_response(request)
            _log("H", "response", response)
            return response

        return middleware

    def sync_middleware(request: HttpRequest) -> Any:  # pragma: no cover - async chains only
        return get_response(request)

    return sync_middleware


class OwnCall(_Logged):
    """Overrides __call__: not a plain mixin, never fused."""

    name = "O"

    def __call__(self, request: HttpRequest) -> Any:
        return super().__call__(request)


class AsyncHooks(MiddlewareMixin):
    """Coroutine-function hooks: Django's __acall__ cannot run them; never fused."""

    async def process_request(self, request: HttpRequest) -> None:  # pragma: no cover
        return None


def sync_view(request: HttpRequest) -> HttpResponse:
    _log("view", "sync", None)
    return HttpResponse("sync view")


async def async_view(request: HttpRequest) -> HttpResponse:
    _log("view", "async", None)
    return HttpResponse("async view")


def raising_view(request: HttpRequest) -> HttpResponse:
    _log("view", "raise", None)
    raise ValueError("the view failed")


def query_view(request: HttpRequest) -> HttpResponse:
    _log("view", "query", None)
    return HttpResponse(str(Item.objects.count()))


urlpatterns = [
    path("sync/", sync_view),
    path("async/", async_view),
    path("raise/", raising_view),
    path("query/", query_view),
]

HERE = __name__
PLAIN = [f"{HERE}.A", f"{HERE}.B", f"{HERE}.C", f"{HERE}.D"]
MIXED = [f"{HERE}.A", f"{HERE}.B", f"{HERE}.hybrid", f"{HERE}.C", f"{HERE}.D"]
#: A sync-only layer under the outermost one: A and W run in sync mode, B, C and D
#: below Django's AsyncToSync adapter are fused.
SYNC_ON_TOP = [f"{HERE}.A", f"{HERE}.W", f"{HERE}.B", f"{HERE}.C", f"{HERE}.D"]
FUSED_LAYERS = {
    "plain": ["A", "B", "C", "D"],
    "mixed": ["A", "B"],
    "sync on top": ["B", "C", "D"],
}
CHAINS = {"plain": PLAIN, "mixed": MIXED, "sync on top": SYNC_ON_TOP}


@pytest.fixture
def chain_settings(settings: SettingsWrapper) -> Iterator[SettingsWrapper]:
    settings.ROOT_URLCONF = HERE
    settings.ALLOWED_HOSTS = ["testserver"]
    settings.MIDDLEWARE = PLAIN
    LOG.clear()
    SCRIPT.clear()
    yield settings
    LOG.clear()
    SCRIPT.clear()


def count_phases(fused: FusedMiddleware) -> list[str]:
    """A list that gets "request" / "response" each time one of `fused`'s two hops runs."""
    phases: list[str] = []
    # The two phases were bound when fused; wrap them to count how often they run.
    request_phase, response_phase = fused._request_phase, fused._response_phase

    async def request_counted(*args: Any) -> Any:
        phases.append("request")
        return await request_phase(*args)

    async def response_counted(*args: Any) -> Any:
        phases.append("response")
        return await response_phase(*args)

    fused._request_phase = request_counted  # type: ignore[assignment]
    fused._response_phase = response_counted  # type: ignore[assignment]
    return phases


def handler_pair() -> tuple[ASGIHandler, ASGIHandler, FusedMiddleware | None]:
    django_built, fused = ASGIHandler(), ASGIHandler()
    return django_built, fused, fuse_middleware(fused)


Outcome = tuple[int, bytes, list[tuple[str, str, int | None]]]


async def run(handler: ASGIHandler, url: str) -> Outcome:
    LOG.clear()
    request = AsyncRequestFactory().get(url)
    response = await handler.get_response_async(request)
    calls = [(name, method, status) for name, method, status, _ in LOG]
    assert isinstance(response, HttpResponse)
    return response.status_code, response.content, calls


SCENARIOS: dict[str, tuple[str, dict[tuple[str, str], str]]] = {
    "sync view": ("/sync/", {}),
    "async view": ("/async/", {}),
    "view raises": ("/raise/", {}),
    "no such url": ("/nowhere/", {}),
    "outermost answers": ("/sync/", {("A", "request"): "respond"}),
    "middle answers": ("/sync/", {("B", "request"): "respond"}),
    "innermost answers": ("/async/", {("D", "request"): "respond"}),
    "request raises": ("/sync/", {("B", "request"): "raise"}),
    "request raises 404": ("/sync/", {("C", "request"): "404"}),
    "request denied": ("/async/", {("A", "request"): "deny"}),
    "response raises": ("/sync/", {("C", "response"): "raise"}),
    "outermost response raises": ("/sync/", {("A", "response"): "raise"}),
    "response replaced": ("/sync/", {("D", "response"): "respond"}),
    "answer then raise": ("/sync/", {("C", "request"): "respond", ("B", "response"): "404"}),
    "two raise": ("/sync/", {("D", "request"): "raise", ("B", "response"): "raise"}),
}


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_fused_chain_behaves_as_djangos(
    chain_settings: SettingsWrapper, chain: str, scenario: str
) -> None:
    chain_settings.MIDDLEWARE = CHAINS[chain]
    url, script = SCENARIOS[scenario]
    SCRIPT.update(script)
    django_built, fused_handler, fused = handler_pair()
    assert fused is not None
    # The fused run stops at the first layer that is not a plain mixin, and starts
    # below the layers a sync-only one puts in sync mode.
    assert [type(layer).__name__ for layer in fused.layers] == FUSED_LAYERS[chain]
    assert (fused.adapter is not None) == (chain == "sync on top")
    expected = await run(django_built, url)
    got = await run(fused_handler, url)
    assert got == expected
    assert expected[2], "the scenario logged nothing: it proves nothing"


async def test_layers_with_one_hook_each(chain_settings: SettingsWrapper) -> None:
    chain_settings.MIDDLEWARE = [f"{HERE}.ResponseOnly", f"{HERE}.RequestOnly", f"{HERE}.A"]
    django_built, fused_handler, fused = handler_pair()
    assert fused is not None
    assert len(fused.layers) == 3
    SCRIPT[("A", "request")] = "raise"
    assert await run(fused_handler, "/sync/") == await run(django_built, "/sync/")
    SCRIPT.clear()
    assert await run(fused_handler, "/sync/") == await run(django_built, "/sync/")


async def test_a_fused_run_is_two_thread_sensitive_calls(chain_settings: SettingsWrapper) -> None:
    """All request hooks in one call, all response hooks in another, on one thread."""
    _, fused_handler, fused = handler_pair()
    assert fused is not None
    calls = count_phases(fused)
    status, _, _ = await run(fused_handler, "/async/")
    assert status == 200
    assert calls == ["request", "response"]
    request_hooks = [c for c in LOG if c[1] == "request"]
    response_hooks = [c for c in LOG if c[1] == "response"]
    assert len(request_hooks) == len(response_hooks) == 4
    assert len({c[3] for c in request_hooks}) == 1
    assert len({c[3] for c in response_hooks}) == 1


def test_only_plain_mixins_in_async_mode_are_fused(chain_settings: SettingsWrapper) -> None:
    for first in (f"{HERE}.OwnCall", f"{HERE}.AsyncHooks", f"{HERE}.hybrid"):
        chain_settings.MIDDLEWARE = [first, *PLAIN]
        handler = ASGIHandler()
        original = _compat.middleware_chain(handler)
        assert fuse_middleware(handler) is None, first
        assert _compat.middleware_chain(handler) is original
    chain_settings.MIDDLEWARE = [f"{HERE}.A", f"{HERE}.OwnCall", f"{HERE}.B"]
    fused = fuse_middleware(ASGIHandler())
    assert fused is not None
    assert [type(x).__name__ for x in fused.layers] == ["A"]
    # A handler loaded for sync (WSGI) has no async-mode layers: nothing to fuse.
    from django.core.handlers.wsgi import WSGIHandler

    assert fuse_middleware(WSGIHandler()) is None


async def test_below_a_sync_only_layer_the_fused_run_is_two_calls_in_djangos_adapter(
    chain_settings: SettingsWrapper,
) -> None:
    """The chain stays Django's down to its AsyncToSync adapter; only what that adapter
    runs is replaced, and restored by unfusing."""
    chain_settings.MIDDLEWARE = SYNC_ON_TOP
    handler = ASGIHandler()
    top = _compat.middleware_chain(handler)
    fused = fuse_middleware(handler)
    assert fused is not None
    assert fused.above == ("A", "W")
    assert _compat.middleware_chain(handler) is top  # the sync part is Django's own
    assert _compat.async_adapter_target(fused.adapter) is fused
    again = fuse_middleware(handler)
    assert again is fused  # idempotent
    assert fused is not None
    phases = count_phases(fused)
    status, _, calls = await run(handler, "/async/")
    assert status == 200
    assert phases == ["request", "response"]
    assert [c[:2] for c in calls if c[1] in ("request", "response")] == [
        ("A", "request"), ("W", "request"), ("B", "request"), ("C", "request"),
        ("D", "request"), ("D", "response"), ("C", "response"), ("B", "response"),
        ("W", "response"), ("A", "response"),
    ]  # fmt: skip
    unfuse_middleware(handler)
    assert _compat.async_adapter_target(fused.adapter) is fused.unfused
    assert _compat.middleware_chain(handler) is top


def test_a_chain_with_no_async_mode_layer_is_left_alone(
    chain_settings: SettingsWrapper,
) -> None:
    chain_settings.MIDDLEWARE = [f"{HERE}.A", f"{HERE}.W"]
    handler = ASGIHandler()
    top = _compat.middleware_chain(handler)
    assert fuse_middleware(handler) is None
    assert _compat.middleware_chain(handler) is top


def test_fusing_is_idempotent_and_reversible(chain_settings: SettingsWrapper) -> None:
    handler = ASGIHandler()
    original = _compat.middleware_chain(handler)
    fused = fuse_middleware(handler)
    assert fused is not None
    assert fused.unfused is original
    assert fuse_middleware(handler) is fused
    assert _compat.middleware_chain(handler) is fused
    unfuse_middleware(handler)
    assert _compat.middleware_chain(handler) is original
    unfuse_middleware(handler)  # nothing fused: a no-op
    assert _compat.middleware_chain(handler) is original
    with pytest.raises(ValueError, match="at least one layer"):
        FusedMiddleware([], original, unfused=original)


async def test_an_inner_handler_that_raises_is_answered_like_djangos_wrapper(
    chain_settings: SettingsWrapper,
) -> None:
    """Django wraps every inner handler so it never raises; should one, the innermost
    layer's process_response is skipped, as its exception wrapper would skip it."""
    handler = ASGIHandler()
    fused = fuse_middleware(handler)
    assert fused is not None

    async def broken(request: HttpRequest) -> HttpResponseBase:
        raise PermissionDenied("inner")

    fused.inner = broken
    status, _, calls = await run(handler, "/sync/")
    assert status == 403
    assert calls == [
        ("A", "request", None),
        ("B", "request", None),
        ("C", "request", None),
        ("D", "request", None),
        ("C", "response", 403),
        ("B", "response", 403),
        ("A", "response", 403),
    ]


async def test_a_failing_hop_is_answered_like_djangos_outermost_wrapper(
    chain_settings: SettingsWrapper,
) -> None:
    """A hop that cannot run (its executor refusing work at shutdown, say) is a 500, as an
    exception escaping the outermost layer is in Django's chain, not an exception."""
    handler = ASGIHandler()
    fused = fuse_middleware(handler)
    assert fused is not None

    async def refused(*args: Any) -> Any:
        raise RuntimeError("cannot schedule new futures after shutdown")

    fused._request_phase = refused  # type: ignore[assignment]
    status, _, calls = await run(handler, "/sync/")
    assert status == 500
    assert calls == []


def test_compat_unwraps_only_djangos_exception_wrapper() -> None:
    async def handler(request: Any) -> Any:
        return None

    wrapped = convert_exception_to_response(handler)
    assert _compat.unwrap_converted(wrapped) is handler

    async def lookalike(request: Any) -> Any:
        return None

    lookalike.__wrapped__ = handler  # type: ignore[attr-defined]
    assert _compat.unwrap_converted(lookalike) is None
    assert _compat.unwrap_converted(handler) is None
    with pytest.raises(_compat.IncompatibleVersionError, match="_middleware_chain"):
        _compat.set_middleware_chain(object(), handler)


def test_fuse_middleware_setting_is_validated() -> None:
    assert parse_settings({}).fuse_middleware is True
    assert parse_settings({"FUSE_MIDDLEWARE": False}).fuse_middleware is False
    with pytest.raises(ImproperlyConfigured, match=r"\['FUSE_MIDDLEWARE'\] is 'no'; expected True"):
        parse_settings({"FUSE_MIDDLEWARE": "no"})


# -- through the ASGI wrapper ------------------------------------------------------------------

requires_request_threads = pytest.mark.skipif(
    not REQUEST_THREADS_SUPPORTED, reason="request threads need asgiref >= 3.13"
)


@pytest.fixture
def wrapped(chain_settings: SettingsWrapper) -> Iterator[Callable[..., DBBridgeASGIApp]]:
    apps: list[DBBridgeASGIApp] = []

    def make(**bridge: Any) -> DBBridgeASGIApp:
        # ONE_HOP off: requests for sync views take the fused chain too
        # (tests/test_one_hop.py covers the one-hop path).
        chain_settings.ASYNC_DBBRIDGE = {
            "MAX_WORKERS": 2,
            "POOL_SIZE": 2,
            "ONE_HOP": False,
            **bridge,
        }
        app = DBBridgeASGIApp(ASGIHandler())
        apps.append(app)
        return app

    yield make
    for app in apps:
        if app.request_threads is not None:
            assert app.request_threads.close(10)


@requires_request_threads
@pytest.mark.usefixtures("main_thread_closed")
@pytest.mark.django_db(transaction=True, databases=["default", "other"])
async def test_the_wrapper_fuses_and_a_request_makes_fewer_calls_on_one_thread(
    wrapped: Callable[..., DBBridgeASGIApp], count_submits: list[str]
) -> None:
    app = wrapped()
    response = await call_http(app, "/query/")
    assert response.status == 200
    assert response.body == b"0"
    assert isinstance(_compat.middleware_chain(app.app), FusedMiddleware)
    # request_started, the request phase, C.process_view, the view, the
    # response phase, response.close() (which sends request_finished).
    fused_calls = len(count_submits)
    assert fused_calls == 6, count_submits
    threads = {name for *_, name in LOG}
    assert len(threads) == 1
    assert threads.pop().startswith("dbbridge-request-")
    fused_log = [c[:3] for c in LOG]

    count_submits.clear()
    LOG.clear()
    app = wrapped(FUSE_MIDDLEWARE=False)
    response = await call_http(app, "/query/")
    assert response.status == 200
    assert response.body == b"0"
    assert not isinstance(_compat.middleware_chain(app.app), FusedMiddleware)
    # Django's own chain: one call per hook of each of the four layers.
    assert len(count_submits) == fused_calls + 2 * 4 - 2, count_submits
    assert [c[:3] for c in LOG] == fused_log


@requires_request_threads
async def test_turning_the_setting_off_restores_djangos_chain_on_the_next_start(
    wrapped: Callable[..., DBBridgeASGIApp],
    settings: SettingsWrapper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="async_dbbridge")
    fused_line = (
        "fused middleware (FUSE_MIDDLEWARE): yes, 4 MiddlewareMixin layer(s) in two thread "
        "hops (A, B, C, D)"
    )
    app = wrapped()
    original = _compat.middleware_chain(app.app)
    lifespan = Lifespan(app)
    assert (await lifespan.startup())["type"] == "lifespan.startup.complete"
    assert isinstance(_compat.middleware_chain(app.app), FusedMiddleware)
    assert (await lifespan.shutdown())["type"] == "lifespan.shutdown.complete"
    started = [r.getMessage() for r in caplog.records if "started" in r.getMessage()]
    assert len(started) == 1
    assert fused_line in started[0]
    caplog.clear()
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 2, "FUSE_MIDDLEWARE": False, "ONE_HOP": False}
    lifespan = Lifespan(app)
    assert (await lifespan.startup())["type"] == "lifespan.startup.complete"
    started = [r.getMessage() for r in caplog.records if "started" in r.getMessage()]
    assert len(started) == 1
    assert "fused middleware (FUSE_MIDDLEWARE): no, FUSE_MIDDLEWARE is False" in started[0]
    try:
        assert _compat.middleware_chain(app.app) is original
        response = await call_http(app, "/sync/")
        assert response.status == 200
        assert [c[:2] for c in LOG][:2] == [("A", "request"), ("B", "request")]
    finally:
        assert (await lifespan.shutdown())["type"] == "lifespan.shutdown.complete"
