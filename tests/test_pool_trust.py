"""Acceptance (issue #16): a pool you can trust after a restart, a stall, and the quiet after.

Through real uvicorn, as tests/test_asgi_pool.py does (its helpers are reused):

* every idle pooled session killed (what a database restart, failover or
  PgBouncer restart does), then sequential requests: with `CONN_HEALTH_CHECKS`
  on, every one answers 200 — and with it off the same scenario fails, so the
  test shows it can see the problem;
* a database stall under 300 clients with `MAX_WAITING`: request threads stay
  bounded, clients get fast 503s, and service recovers as soon as the stall ends;
* idle pooled sessions end within `IDLE_TIMEOUT` (+2 s) of the last request
  while the server keeps running, with no traffic to trigger it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from django.db import connections
from pytest_django.fixtures import Settings

import async_dbbridge
from async_dbbridge import _pool as pool_module
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import SetSetting, kill_backend
from tests.faultproxy import FaultProxy
from tests.pool_project.views import probe
from tests.test_asgi_pool import (
    DEADLINE,
    InFlight,
    ServerThread,
    app,
    configure,
    get,
    project,
    stats,
)

__all__ = ("project",)  # the fixture, imported from test_asgi_pool

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
    pytest.mark.timeout(120),
]


def fill_the_pool(url: str, size: int) -> set[int]:
    """`size` requests at once, each holding a connection until all have one: the pool is full."""
    flight = InFlight(url, ["/hold/fill/"] * size)
    probe.wait_arrived("fill", size)
    probe.gate("fill").open()
    replies = flight.result()
    assert [reply.status for reply in replies] == [200] * size
    backends = {int(reply.json()["backend"]) for reply in replies}
    assert len(backends) == size
    return backends


# -- a database restart: every idle session killed ----------------------------------------


@pytest.mark.requires_server
@pytest.mark.parametrize("health_checks", [True, False], ids=["checks", "no-checks"])
def test_every_idle_session_killed_then_no_request_fails_with_health_checks_on(
    project: Settings,
    db_settings: SetSetting,
    monkeypatch: pytest.MonkeyPatch,
    health_checks: bool,
) -> None:
    size = 8
    # No connection counts as "idle long" here: only the checkout's socket
    # probe and the suspicion a disconnect casts on its siblings can save the
    # requests, as right after a restart.
    monkeypatch.setattr(pool_module, "HEALTH_CHECK_IDLE", 3600.0)
    db_settings(aliases=("default",), CONN_HEALTH_CHECKS=health_checks)
    configure(project, POOL_SIZE=size, POOL_TIMEOUT=DEADLINE)
    with ServerThread(app()) as server:
        backends = fill_the_pool(server.url, size)
        # Opened for real: the server sees them, idle in the pool.
        assert wait_for_server_sessions("default", size) == size
        assert stats().idle == size
        for backend in backends:
            kill_backend("default", backend)
        connections.close_all()  # the test's own session, used to kill
        wait_for_server_sessions("default", 0)

        replies = [get(server.url, "/backend/") for _ in range(size)]
        statuses = [reply.status for reply in replies]
        if health_checks:
            assert statuses == [200] * size, [r.body[:200] for r in replies]
            assert not {int(reply.json()["backend"]) for reply in replies} & backends
            assert stats().replaced >= 1
        else:
            # What Django does without health checks, under WSGI too: each
            # request draws the next dead connection and fails.
            assert statuses == [500] * size
        assert get(server.url, "/backend/").status == 200


# -- a database stall under 300 clients -----------------------------------------------------


@dataclass
class Hammer:
    """Clients sending requests back to back until stopped; statuses timed.

    Like wrk, a client gives up on a request after `client_timeout` (status 0;
    -1 for a broken connection) and sends the next: what made a stall grow
    threads before MAX_WAITING, since the server-side request still waits for
    a connection meanwhile.
    """

    url: str
    clients: int
    client_timeout: float
    stop: threading.Event = field(default_factory=threading.Event)
    replies: list[tuple[float, int]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="test-hammer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.errors.append(exc)

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(
            base_url=self.url, limits=limits, timeout=self.client_timeout, trust_env=False
        ) as client:

            async def one() -> None:
                while not self.stop.is_set():
                    try:
                        status = (await client.get("/count/")).status_code
                    except httpx.TimeoutException:
                        status = 0
                    except httpx.TransportError:
                        status = -1  # the connection broke: counted, never hidden
                    with self.lock:
                        self.replies.append((time.monotonic(), status))

            await asyncio.gather(*(one() for _ in range(self.clients)))

    def since(self, moment: float) -> list[tuple[float, int]]:
        with self.lock:
            return [reply for reply in self.replies if reply[0] >= moment]

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(DEADLINE + 10)
        assert not self.thread.is_alive(), "the clients did not stop"
        assert not self.errors, self.errors


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.requires_server
def test_a_stall_under_300_clients_keeps_threads_bounded_and_recovers_at_once(
    project: Settings, db_settings: SetSetting
) -> None:
    size, max_waiting, clients, stall = 8, 16, 300, 10.0
    server_session_count("default")  # the counter connects directly, before the switch
    settings_dict = connections.settings["default"]
    with FaultProxy(str(settings_dict["HOST"]), int(settings_dict["PORT"])) as proxy:
        db_settings(aliases=("default",), HOST="127.0.0.1", PORT=str(proxy.port))
        # A waiter waits the default POOL_TIMEOUT (5 s); clients give up after 1 s.
        configure(project, POOL_SIZE=size, MAX_WAITING=max_waiting)
        with ServerThread(app()) as server:
            hammer = Hammer(server.url, clients, client_timeout=1.0)
            try:
                # Served before the stall: connections really opened.
                deadline = time.monotonic() + DEADLINE
                while not any(status == 200 for _, status in hammer.since(0.0)):
                    assert time.monotonic() < deadline, "no request was served"
                    time.sleep(0.01)
                assert server_session_count("default") >= 1
                rss_before = rss_bytes()

                proxy.stall()
                stalled_at = time.monotonic()
                peak_threads = peak_waiting = 0
                while time.monotonic() - stalled_at < stall:
                    threads = async_dbbridge.stats().request_threads
                    assert threads is not None
                    peak_threads = max(peak_threads, threads.busy + threads.idle)
                    peak_waiting = max(peak_waiting, stats().waiting)
                    time.sleep(0.02)
                rss_stalled = rss_bytes()
                pool = stats()
                proxy.resume()
                resumed_at = time.monotonic()

                # Recovered: within a second of the stall's end, requests succeed again.
                deadline = resumed_at + DEADLINE
                while not any(status == 200 for _, status in hammer.since(resumed_at)):
                    assert time.monotonic() < deadline, "no request succeeded after the stall"
                    time.sleep(0.005)
                first_ok = min(t for t, status in hammer.since(resumed_at) if status == 200)
            finally:
                hammer.finish()
    during = [status for t, status in hammer.replies if stalled_at + 1.5 <= t < resumed_at]
    print(
        f"\nstall {stall:g}s, {clients} clients, POOL_SIZE {size}, MAX_WAITING {max_waiting}: "
        f"request threads peak {peak_threads}, waiting for a connection peak {peak_waiting}, "
        f"RSS +{(rss_stalled - rss_before) / 2**20:.1f} MiB, "
        f"{len(during)} replies during the stall ({during.count(503)} x 503), "
        f"rejected {pool.rejected}, timed out {pool.timeouts}, "
        f"first 200 {first_ok - resumed_at:.3f}s after the stall"
    )
    # Fast 503s all through the stall (0: a client that gave up on a request
    # still waiting for a connection, or holding one that hangs)...
    assert during.count(503) > 0, "no 503 during the stall"
    assert set(during) <= {0, 503}, set(during)
    assert pool.rejected > 0
    # ... from a bounded number of threads: one per request in flight (at
    # most one per client) plus the requests whose clients gave up while they
    # wait for a connection or hang on one: at most MAX_WAITING + POOL_SIZE.
    # Without MAX_WAITING every client retry parks one more thread for
    # POOL_TIMEOUT (5 s): up to clients x 5 here.
    assert peak_waiting <= max_waiting
    assert peak_threads <= clients + size + max_waiting, peak_threads
    assert first_ok - resumed_at < 1.0


# -- the quiet after the last request ------------------------------------------------------


def test_idle_sessions_end_within_idle_timeout_while_the_server_runs(
    project: Settings,
) -> None:
    size, idle_timeout = 4, 1.0
    configure(project, POOL_SIZE=size, POOL_TIMEOUT=DEADLINE, IDLE_TIMEOUT=idle_timeout)
    with ServerThread(app()) as server:
        fill_the_pool(server.url, size)
        last_request = time.monotonic()
        assert stats().idle == size
        assert wait_for_server_sessions("default", size) == size  # opened for real
        # No request from here on: only the pool's own reaper can close them.
        wait_for_server_sessions("default", 0, timeout=idle_timeout + 2.0)
        quiet = time.monotonic() - last_request
        assert stats().idle == 0
        assert stats().closed == size
        assert quiet >= idle_timeout * (1 - 0.05)
        # And the server still serves, with a fresh connection.
        assert get(server.url, "/backend/").status == 200


@pytest.fixture(autouse=True)
def _gates_open() -> Iterator[None]:
    yield
    for gate in list(probe.gates.values()):
        gate.open()
