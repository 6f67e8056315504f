"""End to end: a real uvicorn serving the wrapped Django app, a burst of real HTTP requests.

uvicorn runs in a thread of the test process (no signal handlers off the main
thread; poll ``started``, set ``should_exit``, join — the httpx test pattern),
so the test can read the pool's and the bridge's stats while it serves,
and sample the server's session count in another thread during the burst.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import pytest
import uvicorn
from django.core.handlers.asgi import ASGIHandler
from django.db import connections
from pytest_django.fixtures import Settings

from async_dbbridge import PoolStats, reset_bridge_executor, stats
from async_dbbridge._compat import REQUEST_THREADS_SUPPORTED
from async_dbbridge.asgi import ASGIApp, DBBridgeASGIApp
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import HTTP, LOOP, SetSetting
from tests.e2e_project.settings import OVERRIDES
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
    pytest.mark.timeout(30),
]

requires_request_threads = pytest.mark.skipif(
    not REQUEST_THREADS_SUPPORTED, reason="request threads need asgiref >= 3.13"
)

PATHS = ("/sync-query/", "/async-orm/", "/db-call/", "/atomic-write/", "/combo/")
REQUESTS = 300
CONCURRENCY = 32


class ServerThread:
    """uvicorn serving ``app`` on a free port of 127.0.0.1, in a thread.

    In a thread, uvicorn installs no signal handlers: the test polls
    ``started``, sets ``should_exit`` and joins (httpx's test pattern).
    """

    #: Seconds to wait for uvicorn to start, and to exit.
    start_timeout = 10.0
    stop_timeout = 20.0

    def __init__(self, app: ASGIApp, *, lifespan: str = "on") -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            lifespan=lifespan,  # type: ignore[arg-type]
            log_level="warning",
            access_log=False,
            ws="none",  # no websockets import (its deprecation warnings are errors here)
            loop=LOOP,
            http=HTTP,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn")
        self.port = 0

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join(self.stop_timeout)
        assert not self.thread.is_alive(), "uvicorn did not exit"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class SessionSampler(threading.Thread):
    """Samples the server's session count until stopped (the count is the ground truth)."""

    def __init__(self) -> None:
        super().__init__(name="session-sampler", daemon=True)
        self.samples: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append(server_session_count())
            self.stopped.wait(0.005)

    def stop(self) -> int:
        self.stopped.set()
        self.join(10)
        return max(self.samples, default=0)


async def burst(url: str, n: int = REQUESTS, concurrency: int = CONCURRENCY) -> Counter[int]:
    """``n`` GETs across the views, at most ``concurrency`` in flight."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=20, trust_env=False
    ) as client:

        async def one(i: int) -> int:
            async with gate:
                response = await client.get(PATHS[i % len(PATHS)])
                return response.status_code

        return Counter(await asyncio.gather(*(one(i) for i in range(n))))


def get(url: str) -> Any:
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        response = client.get("/default-executor/")
        response.raise_for_status()
        return response.json()


@pytest.fixture
def project(settings: Settings, db_settings: SetSetting) -> Settings:
    for key, value in OVERRIDES.items():
        setattr(settings, key, value)
    db_settings(CONN_MAX_AGE=60)
    Item.objects.bulk_create(Item(name=f"seed-{i}", value=i) for i in range(10))
    # The test's own connection is closed: every session seen is the server's.
    connections.close_all()
    return settings


def request_thread_names() -> list[str]:
    return [t.name for t in threading.enumerate() if "-request-" in t.name]


@dataclass
class BurstResult:
    statuses: Counter[int]
    peak_sessions: int
    # The pool of "default" as the burst left it (before the shutdown closed it).
    pool: PoolStats | None


def serve_burst(app: DBBridgeASGIApp, *, requests: int = REQUESTS) -> BurstResult:
    """Serve a burst through uvicorn (lifespan on), sampling sessions meanwhile."""
    sampler = SessionSampler()
    with ServerThread(app) as server:
        # The lifespan startup made the bridge the loop's default executor.
        assert get(server.url)["thread"].startswith("dbbridge-")
        sampler.start()
        try:
            statuses = asyncio.run(burst(server.url, n=requests))
        finally:
            peak = sampler.stop()
        pool = stats().pools.get("default")
    return BurstResult(statuses, peak, pool)


@requires_request_threads
def test_burst_stays_within_pool_size_and_shutdown_closes_every_session(
    project: Settings,
) -> None:
    # Each request needs at most one connection at a time (no sync middleware
    # holding one across a view that awaits db_call; test_asgi shows how that
    # ends), so the pool serves the whole burst with 4 connections per alias:
    # request threads and bridge workers share them.
    project.MIDDLEWARE = []
    project.ASYNC_DBBRIDGE = {"MAX_WORKERS": 4, "POOL_SIZE": 4, "POOL_TIMEOUT": 20}
    app = DBBridgeASGIApp(ASGIHandler())
    result = serve_burst(app)
    assert result.statuses == {200: REQUESTS}
    # The bound is a bound: never more sessions than POOL_SIZE, whatever the
    # concurrency (32 clients), and connections were really opened.
    assert 1 <= result.peak_sessions <= 4, result
    assert result.pool is not None
    assert 1 <= result.pool.opened <= 4
    assert result.pool.timeouts == 0
    # Lifespan shutdown closed the pools and ended the request threads.
    assert stats().pools == {}
    assert request_thread_names() == []
    wait_for_server_sessions("default", 0)


def test_burst_on_per_request_threads_closes_their_connections(
    project: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asgiref < 3.13: no reuse, but nothing is stranded either."""
    import async_dbbridge._compat

    monkeypatch.setattr(async_dbbridge._compat, "REQUEST_THREADS_SUPPORTED", False)
    project.ASYNC_DBBRIDGE = {"MAX_WORKERS": 2}
    app = DBBridgeASGIApp(ASGIHandler())
    requests = 100
    result = serve_burst(app, requests=requests)
    assert result.statuses == {200: requests}
    assert app.mode == "per-request"
    # Each request's own thread has one, plus the bridge's pool. A request's
    # connection is closed at its end, once the app has returned — after its
    # body was sent — so a client's next request can open one before the
    # previous one is closed, and the server lists a closed session a moment
    # longer: up to two per client. Stranding would keep one per request.
    assert 1 <= result.peak_sessions <= 2 + 2 * CONCURRENCY < requests
    wait_for_server_sessions("default", 0)


@requires_request_threads
def test_without_lifespan_the_first_request_sets_up_and_aclose_cleans_up(
    project: Settings,
) -> None:
    project.MIDDLEWARE = []  # see the burst test above
    project.ASYNC_DBBRIDGE = {"MAX_WORKERS": 4, "POOL_SIZE": 4, "POOL_TIMEOUT": 20}
    app = DBBridgeASGIApp(ASGIHandler())
    with ServerThread(app, lifespan="off") as server:
        assert get(server.url)["thread"].startswith("dbbridge-")
        statuses = asyncio.run(burst(server.url, n=100))
        threads = app.request_threads
        assert threads is not None
        opened = stats().pools["default"].opened
    assert statuses == {200: 100}
    assert 1 <= opened <= 4
    # The loop's end leaves the shared bridge, the request threads and the
    # pools up: they outlive the server until aclose() (or idle retirement,
    # or interpreter exit).
    assert threads.stats().idle >= 1
    assert stats().pools["default"].idle >= 1
    asyncio.run(app.aclose())
    assert request_thread_names() == []
    assert stats().pools == {}
    wait_for_server_sessions("default", 0)


@pytest.mark.usefixtures("gc_disabled")
def test_control_stock_django_strands_connections(project: Settings) -> None:
    """The same burst through Django alone leaves sessions behind: the test can see leaks."""
    with ServerThread(ASGIHandler(), lifespan="off") as server:
        # Small: every request strands a session (on a shared server, where
        # a real burst ends in "too many clients" — the bug this library fixes).
        statuses = asyncio.run(burst(server.url, n=10, concurrency=2))
    assert statuses == {200: 10}
    # The db_call view's bridge workers legitimately keep theirs (CONN_MAX_AGE):
    # shut the bridge down, and what is left is stranded by Django's dead
    # per-request threads.
    reset_bridge_executor(wait=True)
    assert server_session_count() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    wait_for_server_sessions("default", 0)
