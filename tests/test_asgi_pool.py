"""Acceptance (issue #10): one bounded connection pool per alias, through real uvicorn.

uvicorn serves ``DBBridgeASGIApp(ASGIHandler())`` in a thread of the test
process, and requests are sent from another thread, so the test thread stays
free to steer the views (gates in ``tests.pool_project.views.probe``) and to
count the server's sessions, which are the ground truth: ``pg_stat_activity``,
MariaDB's processlist, and on SQLite the open descriptors of the database file.

Every scenario first proves that connections really were opened (a session
count, a backend id) before it proves a bound or a closure. Nothing waits on
time: the views wait on gates the test opens, the test waits for the views to
arrive, and every wait is bounded so that a hang is a failure.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import pytest
from django.core.handlers.asgi import ASGIHandler
from django.db import connections
from pytest_django.fixtures import Settings

import async_dbbridge
from async_dbbridge import PoolStats, db_call
from async_dbbridge import _pool as pool_module
from async_dbbridge._lending import close_pools
from async_dbbridge.asgi import UNAVAILABLE_BODY, DBBridgeASGIApp
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import SetSetting, backend_id, kill_backend
from tests.e2e_project.driver import call_http
from tests.pool_project.settings import OVERRIDES, REQUEST_LOCAL_MIDDLEWARE
from tests.pool_project.views import GATE_TIMEOUT, probe
from tests.test_e2e import ServerThread as E2EServerThread
from tests.test_fork import run_forked
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
    pytest.mark.timeout(90),
]

#: Bound on every wait of the test for the server, and of the client for a response.
DEADLINE = 30.0


# -- the server and the client ----------------------------------------------------------


class ServerThread(E2EServerThread):
    """test_e2e's uvicorn thread, with this module's deadlines; on exit it first
    opens every gate a view may be parked on."""

    start_timeout = stop_timeout = DEADLINE

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A test that fails with views parked on gates must not leave uvicorn
        # waiting for them: open every gate first.
        for gate in list(probe.gates.values()):
            gate.open()
        super().__exit__(exc_type, exc, tb)


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def _fetch_all(url: str, paths: list[str]) -> list[Reply]:
    # As many client connections as requests: none queues in the client.
    limits = httpx.Limits(max_connections=len(paths), max_keepalive_connections=len(paths))
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=DEADLINE, trust_env=False
    ) as client:

        async def one(path: str) -> Reply:
            response = await client.get(path)
            return Reply(response.status_code, response.headers, response.content)

        return list(await asyncio.gather(*(one(path) for path in paths)))


class InFlight:
    """Requests sent all at once from a thread of their own (the test thread stays free)."""

    def __init__(self, url: str, paths: list[str]) -> None:
        self.replies: list[Reply] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url, paths), name="test-client")
        self._thread.start()

    def _run(self, url: str, paths: list[str]) -> None:
        try:
            self.replies = asyncio.run(_fetch_all(url, paths))
        except BaseException as exc:
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> list[Reply]:
        # The client's own timeout (DEADLINE per request) ends a hung request.
        self._thread.join(DEADLINE + 10)
        assert not self._thread.is_alive(), "the requests did not complete"
        if self.error is not None:
            raise self.error
        assert self.replies is not None
        return self.replies


def get(url: str, path: str) -> Reply:
    return InFlight(url, [path]).result()[0]


class SessionSampler(threading.Thread):
    """Samples the server's session count until stopped."""

    def __init__(self, alias: str = "default") -> None:
        super().__init__(name="session-sampler", daemon=True)
        self.alias = alias
        self.samples: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append(server_session_count(self.alias))
            self.stopped.wait(0.005)

    def stop(self) -> list[int]:
        self.stopped.set()
        self.join(DEADLINE)
        return self.samples


def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Bounded polling from the test thread."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.005)


def stats(alias: str = "default") -> PoolStats:
    """The alias's pool, as the public `async_dbbridge.stats()` describes it."""
    pools = async_dbbridge.stats().pools
    assert alias in pools, f"no connection pool for {alias!r} in this process"
    return pools[alias]


def waiting_for_a_connection(n: int, alias: str = "default") -> None:
    until(lambda: stats(alias).waiting == n, f"{n} thread(s) waiting for a connection")


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def project(settings: Settings, db_settings: SetSetting) -> Iterator[Settings]:
    """The pool project, persistent connections, and pools built from this test's settings."""
    for key, value in OVERRIDES.items():
        setattr(settings, key, value)
    # Pooled connections live on between requests: what is counted idle in
    # the pool must be what the server sees.
    db_settings(CONN_MAX_AGE=60)
    Item.objects.bulk_create(Item(name=f"seed-{i}", value=i) for i in range(3))
    # The test's own connection is closed: every session counted is the app's.
    connections.close_all()
    # A pool is built from the settings on first use; one left by an earlier
    # test would keep that test's size.
    close_pools(timeout=DEADLINE)
    probe.reset()
    yield settings
    for gate in list(probe.gates.values()):
        gate.open()
    # What a failed test left running (a test that passed shut it down itself).
    while _apps:
        asyncio.run(_apps.pop().aclose())
    assert close_pools(timeout=DEADLINE)


def configure(settings: Settings, **bridge: object) -> None:
    # SYNC_REQUESTS=0: these tests drive the pool itself with more concurrent
    # sync requests than connections (test_sync_gate.py tests the gate).
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 4, "SYNC_REQUESTS": 0, **bridge}


_apps: list[DBBridgeASGIApp] = []


def app() -> DBBridgeASGIApp:
    """The wrapped Django app; the `project` fixture shuts it down after the test."""
    application = DBBridgeASGIApp(ASGIHandler())
    _apps.append(application)
    return application


# -- a. the bound holds under concurrency -----------------------------------------------


def test_pool_size_bounds_sessions_and_waiters_get_served(project: Settings) -> None:
    size, requests = 3, 24
    configure(project, POOL_SIZE=size, POOL_TIMEOUT=DEADLINE)
    sampler = SessionSampler()
    with ServerThread(app()) as server:
        sampler.start()
        try:
            flight = InFlight(server.url, ["/hold/a/"] * requests)
            # Every request reached its view; POOL_SIZE of them hold a
            # connection in atomic() behind the gate, the rest wait for one.
            probe.wait_arrived("a:arrived", requests)
            probe.wait_arrived("a", size)
            waiting_for_a_connection(requests - size)
            # Opened for real, and no more: the server sees exactly POOL_SIZE.
            assert [server_session_count() for _ in range(20)] == [size] * 20
            assert probe.arrived("a") == size
            assert not flight.done()
            probe.gate("a").open()
            replies = flight.result()
        finally:
            samples = sampler.stop()
    assert [reply.status for reply in replies] == [200] * requests
    assert probe.arrived("a") == requests
    # The waiters were served by the connections the first ones gave back.
    assert len({reply.json()["backend"] for reply in replies}) == size
    assert max(samples) == size, samples


# -- b. checkout timeout: 503, or the user's own answer ---------------------------------


def test_checkout_timeout_is_a_503_with_retry_after_and_the_user_can_catch_it(
    project: Settings,
) -> None:
    timeout = 0.5
    configure(project, POOL_SIZE=1, POOL_TIMEOUT=timeout)
    with ServerThread(app()) as server:
        holder = InFlight(server.url, ["/hold/b/"])
        probe.wait_arrived("b", 1)
        assert wait_for_server_sessions("default", 1) == 1

        # A sync view and the async ORM: both fail to check out in time.
        for path in ("/count/", "/acount/"):
            reply = get(server.url, path)
            assert reply.status == 503, (path, reply.status, reply.body)
            assert reply.headers["Retry-After"] == str(math.ceil(timeout))
            # DEBUG is off: nothing about the configuration (test_unavailable.py
            # covers the detail with DEBUG on, and the log line).
            assert reply.body == UNAVAILABLE_BODY, reply.body

        # A view that catches PoolTimeout answers what it likes.
        caught = get(server.url, "/catch/")
        assert caught.status == 200
        body = caught.json()
        assert body["fallback"] is True
        assert (body["alias"], body["max_size"], body["timeout"]) == ("default", 1, timeout)
        assert "POOL_SIZE" in body["message"]
        assert "'default'" in body["message"]
        assert stats().timeouts == 3

        # Still the holder's one session: nothing opened beyond the bound.
        assert server_session_count() == 1
        assert not holder.done()
        probe.gate("b").open()
        assert holder.result()[0].status == 200
        # Given back: with one pooled connection, the next request gets it.
        after = get(server.url, "/count/")
        assert after.status == 200
        assert after.json()["backend"] == holder.result()[0].json()["backend"]
        assert wait_for_server_sessions("default", lambda n: n <= 1) == 1
        assert (stats().in_use, stats().idle) == (0, 1)


# -- c. a transaction spanning several sync calls keeps its connection ------------------


def test_transaction_across_sync_to_async_calls_keeps_its_connection(
    project: Settings,
) -> None:
    peeks = 4
    configure(project, POOL_SIZE=1, POOL_TIMEOUT=DEADLINE)
    with ServerThread(app()) as server:
        spanning = InFlight(server.url, ["/span/c/"])
        # Inside atomic(), first row written, the request awaiting on the loop.
        probe.wait_arrived("c", 1)
        others = InFlight(server.url, ["/peek/"] * peeks)
        probe.wait_arrived("peek", peeks)
        # The one connection is the transaction's: the others wait for it.
        waiting_for_a_connection(peeks)
        assert server_session_count() == 1
        probe.gate("c").open()
        span_reply = spanning.result()[0]
        peek_replies = others.result()
    assert span_reply.status == 200, span_reply.body
    first, second = span_reply.json()["backends"]
    assert first == second
    for reply in peek_replies:
        assert reply.status == 200
        # Both rows, committed: never the first one alone, uncommitted.
        assert reply.json() == {"values": [1, 2], "backend": first}
    assert sorted(Item.objects.filter(name="span-c").values_list("value", flat=True)) == [1, 2]


def test_below_a_sync_only_middleware_an_async_view_gives_its_connection_back_between_queries(
    project: Settings,
) -> None:
    """Django runs the view through async_to_sync from the request's thread (the middleware
    is sync-only, as WhiteNoise's is); its queries run on that blocked thread, and each
    gives its idle connection back as the thread's own calls do (HOLD="transaction")."""
    configure(project, POOL_SIZE=1, POOL_TIMEOUT=DEADLINE)
    project.MIDDLEWARE = [REQUEST_LOCAL_MIDDLEWARE]
    with ServerThread(app()) as server:
        parked = InFlight(server.url, ["/aquery-twice/q/"])
        probe.wait_arrived("q", 1)
        # The first query really connected; its connection is back while the view awaits.
        assert server_session_count() == 1
        # Well within the view's gate timeout (after which it would end and give it back).
        until(
            lambda: stats().in_use == 0,
            "the awaiting request's connection given back",
            timeout=GATE_TIMEOUT / 4,
        )
        # So the pool's one connection serves another request meanwhile.
        other = InFlight(server.url, ["/count/"]).result()[0]
        assert other.status == 200, other.body
        assert stats().in_use == 0
        probe.gate("q").open()
        reply = parked.result()[0]
    assert reply.status == 200, reply.body
    assert reply.json() == {"counts": [3, 3]}


# -- d. thread-locals stay request-scoped -----------------------------------------------


def test_thread_locals_stay_request_scoped_at_high_concurrency(project: Settings) -> None:
    requests = 64
    configure(project, POOL_SIZE=2, POOL_TIMEOUT=DEADLINE)
    project.MIDDLEWARE = [REQUEST_LOCAL_MIDDLEWARE]
    with ServerThread(app()) as server:
        flight = InFlight(server.url, [f"/whoami/d/?id=r{i}" for i in range(requests)])
        # Every request has stored itself in the middleware's thread-local
        # before any of them reads it back.
        probe.wait_arrived("d", requests)
        probe.gate("d").open()
        replies = flight.result()
    assert [reply.status for reply in replies] == [200] * requests
    bodies = [reply.json() for reply in replies]
    assert [body["id"] for body in bodies] == [f"r{i}" for i in range(requests)]
    assert [body["seen"] for body in bodies] == [body["id"] for body in bodies]
    # One thread per request in flight: a thread-local is nobody else's.
    assert len({body["thread"] for body in bodies}) == requests


# -- e. CONN_HEALTH_CHECKS after a killed backend ---------------------------------------


@pytest.mark.requires_server
@pytest.mark.parametrize("health_checks", [True, False], ids=["checks", "no-checks"])
def test_health_checks_after_a_killed_backend_behave_as_under_wsgi(
    project: Settings,
    db_settings: SetSetting,
    monkeypatch: pytest.MonkeyPatch,
    health_checks: bool,
) -> None:
    # The pool reads the idle threshold when it is built (on first use, after
    # this); lowered, so that the test need not idle for a second.
    idle = 0.05
    monkeypatch.setattr(pool_module, "HEALTH_CHECK_IDLE", idle)
    db_settings(aliases=("default",), CONN_HEALTH_CHECKS=health_checks)
    configure(project, POOL_SIZE=1, POOL_TIMEOUT=DEADLINE)
    with ServerThread(app()) as server:
        first = get(server.url, "/backend/")
        assert first.status == 200
        idle_since = time.monotonic()  # given back before the response was sent
        pooled = first.json()["backend"]
        assert wait_for_server_sessions("default", 1) == 1
        assert (stats().idle, stats().opened) == (1, 1)

        kill_backend("default", pooled)
        connections.close_all()  # the test's own session, used to kill
        wait_for_server_sessions("default", 0)
        # The precondition of a health check: idle at least that long. (Not
        # synchronisation: nothing else is awaited here.)
        time.sleep(max(0.0, idle - (time.monotonic() - idle_since)))

        after = get(server.url, "/backend/")
        if health_checks:
            # Pinged on checkout, found dead, replaced: the client never knows.
            assert after.status == 200, after.body
        else:
            # As under WSGI without health checks: the first request fails...
            assert after.status == 500
            # ... and the broken connection is closed, not pooled again.
            after = get(server.url, "/backend/")
            assert after.status == 200, after.body
        assert after.json()["backend"] != pooled
        assert wait_for_server_sessions("default", 1) == 1
        assert stats().opened == 2


# -- f. lifespan shutdown closes everything ---------------------------------------------

BURST_PATHS = ("/count/", "/acount/", "/db-call/", "/write/", "/other/")


def test_lifespan_shutdown_leaves_no_session(project: Settings) -> None:
    size, requests = 3, 60
    configure(project, POOL_SIZE=size, POOL_TIMEOUT=DEADLINE)
    samplers = {alias: SessionSampler(alias) for alias in ("default", "other")}
    with ServerThread(app(), lifespan="on") as server:
        for sampler in samplers.values():
            sampler.start()
        try:
            replies = InFlight(
                server.url, [BURST_PATHS[i % len(BURST_PATHS)] for i in range(requests)]
            ).result()
        finally:
            peaks = {alias: max(s.stop()) for alias, s in samplers.items()}
        assert [reply.status for reply in replies] == [200] * requests
        # Pooled connections are still open while the server runs...
        for alias in ("default", "other"):
            assert wait_for_server_sessions(alias, lambda n: n >= 1) >= 1
    # ... never more than the pool allows, request threads and db_call together ...
    assert 1 <= peaks["default"] <= size, peaks
    assert 1 <= peaks["other"] <= size, peaks
    # ... and none once the lifespan shutdown is over.
    for alias in ("default", "other"):
        wait_for_server_sessions(alias, 0)


# -- g. fork --------------------------------------------------------------------------


def test_fork_resets_the_pool_in_the_child_and_the_parent_keeps_its_session(
    project: Settings,
) -> None:
    configure(project, POOL_SIZE=1, POOL_TIMEOUT=DEADLINE)
    application = app()
    # No lifespan: nothing closes the pool when the server stops.
    with ServerThread(application, lifespan="off") as server:
        replies = InFlight(server.url, ["/backend/"] * 3).result()
    assert [reply.status for reply in replies] == [200] * 3
    pooled = replies[0].json()["backend"]
    # One pooled connection served them all, and it is idle and open now.
    assert {reply.json()["backend"] for reply in replies} == {pooled}
    assert wait_for_server_sessions("default", 1) == 1
    assert (stats().idle, stats().in_use) == (1, 0)

    def child() -> dict[str, Any]:
        # The inherited pool is forgotten: its connection is the parent's.
        assert async_dbbridge.stats().pools == {}
        served = asyncio.run(call_http(application, "/backend/"))
        assert served.status == 200, served.body

        async def call() -> int:
            return await db_call(backend_id)

        called = asyncio.run(call())
        ids = [served.json()["backend"], called]
        child_stats = stats()
        asyncio.run(application.aclose())
        return {"ids": ids, "opened": child_stats.opened}

    report = run_forked("os.fork", child)
    assert pooled not in report["ids"]
    assert report["opened"] >= 1

    # The parent's pooled connection survived the child and serves again.
    with ServerThread(application, lifespan="off") as server:
        again = get(server.url, "/backend/")
    assert again.status == 200
    assert again.json()["backend"] == pooled
    asyncio.run(application.aclose())
    wait_for_server_sessions("default", 0)


# -- h. HOLD ----------------------------------------------------------------------------


def test_hold_request_keeps_session_state_across_sync_calls(project: Settings) -> None:
    configure(project, POOL_SIZE=1, POOL_TIMEOUT=DEADLINE, HOLD="request")
    with ServerThread(app()) as server:
        first = InFlight(server.url, ["/state/111/?wait=h"])
        probe.wait_arrived("h", 1)
        # Held for the request, so the second request cannot have it meanwhile.
        second = InFlight(server.url, ["/state/222/"])
        waiting_for_a_connection(1)
        assert server_session_count() == 1
        probe.gate("h").open()
        a, b = first.result()[0], second.result()[0]
    assert (a.status, b.status) == (200, 200)
    assert (a.json()["set"], a.json()["seen"]) == (111, 111)
    assert (b.json()["set"], b.json()["seen"]) == (222, 222)
    assert a.json()["backend"] == b.json()["backend"]


def test_hold_transaction_shares_session_state_between_requests(project: Settings) -> None:
    """The documented caveat of the default: session state outlives the sync call."""
    configure(project, POOL_SIZE=1, POOL_TIMEOUT=DEADLINE)
    with ServerThread(app()) as server:
        first = InFlight(server.url, ["/state/111/?wait=h"])
        probe.wait_arrived("h", 1)
        # The first request gave its connection back after its first call:
        # the second takes it, sets its own value and finishes.
        second = get(server.url, "/state/222/")
        assert second.status == 200
        assert second.json()["seen"] == 222
        probe.gate("h").open()
        a = first.result()[0]
    assert a.status == 200
    # The first request reads what the second left on the shared session.
    assert (a.json()["set"], a.json()["seen"]) == (111, 222)
    assert a.json()["backend"] == second.json()["backend"]
