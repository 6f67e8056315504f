"""Faults: dropped and refused connections, server-side timeouts and kills, mass cancellation.

Network faults go through ``tests.faultproxy.FaultProxy``: the ``default`` alias
is pointed at the proxy (wrappers read ``HOST``/``PORT`` when they connect), so
every connection the bridge opens can be reset, refused or stalled on demand.
The session counter keeps its own direct connection, opened before the switch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from django.db import DatabaseError, OperationalError, connection, connections

from async_dbbridge import DBExecutor, db_call, install_default_executor
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import SetSetting, backend_id, bridge_threads, kill_backend
from tests.faultproxy import FaultProxy
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

_T = TypeVar("_T")

CONNECT_TIMEOUT = 2  # libpq's minimum; mysqlclient takes the same
DEADLINE = 30.0


def sleep_sql() -> str:
    """A query that takes a few milliseconds, so calls are in flight when a fault hits."""
    return "SELECT pg_sleep(0.005)" if connection.vendor == "postgresql" else "SELECT SLEEP(0.005)"


def slow_query() -> int:
    with connection.cursor() as cursor:
        cursor.execute(sleep_sql())
        cursor.fetchall()
    return backend_id()


def with_options(**options: Any) -> dict[str, Any]:
    """The alias's OPTIONS plus ``options`` (MySQL's charset must stay)."""
    return {**connections.settings["default"]["OPTIONS"], **options}


@pytest.fixture
def proxy(db_settings: SetSetting) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the ``default`` database, which now goes through it."""
    server_session_count("default")  # the counter connects directly, before the switch
    settings_dict = connections.settings["default"]
    with FaultProxy(str(settings_dict["HOST"]), int(settings_dict["PORT"])) as fault_proxy:
        db_settings(aliases=("default",), HOST="127.0.0.1", PORT=str(fault_proxy.port))
        yield fault_proxy
        connections.close_all()  # the test thread's own proxied connection, if any


async def off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """Run blocking test plumbing on a thread of its own.

    Not ``asyncio.to_thread``: once a DBExecutor is the loop's default, that
    would run on the pool under test (and fail once it is shut down).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(future.set_result, result)

    thread = threading.Thread(target=run, name="faults-helper")
    thread.start()
    try:
        return await future
    finally:
        thread.join()


def kill_and_close(alias: str, backend: int) -> None:
    """Kill a session from a helper thread, and close the helper's own."""
    try:
        kill_backend(alias, backend)
    finally:
        connections.close_all()


async def wait_until(predicate: Any, what: str, timeout: float = DEADLINE) -> None:  # noqa: ASYNC109 - a polling deadline, not a cancel scope
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


class Load:
    """Concurrent db_calls until stopped; each records whether it began after a mark."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.mark = threading.Event()  # set once the fault is over
        self.stop = asyncio.Event()
        self.before: list[BaseException | None] = []
        self.after: list[BaseException | None] = []

    def _call(self, began_after: list[bool]) -> int:
        began_after.append(self.mark.is_set())
        return slow_query()

    async def _caller(self) -> None:
        while not self.stop.is_set():
            began_after: list[bool] = []
            try:
                await db_call(self._call, began_after)
                error: BaseException | None = None
            except Exception as exc:
                error = exc
            if began_after:  # the call ran (it was never cancelled before starting)
                (self.after if began_after[0] else self.before).append(error)

    async def run(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self._caller()) for _ in range(self.concurrency)]


@pytest.mark.requires_server
@pytest.mark.parametrize("fault", ["drop", "restart"])
async def test_connections_dropped_mid_load_recover_with_health_checks(
    proxy: FaultProxy, db_settings: SetSetting, fault: str
) -> None:
    db_settings(aliases=("default",), CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=True)
    baseline = await off_loop(server_session_count)
    executor = install_default_executor(DBExecutor(max_workers=8))
    load = Load(concurrency=32)
    tasks = await load.run()
    try:
        await wait_until(lambda: len(load.before) >= 100, "calls before the fault")
        await wait_until(lambda: executor.stats().busy >= 4, "calls in flight")
        if fault == "restart":
            # The server "restarts": it refuses connections from the moment its
            # sessions drop (refusing only after the drop would let the workers
            # reconnect in between, and then nothing would ever be refused).
            proxy.refuse_new()
        dropped = await off_loop(proxy.drop_all)
        assert dropped >= 1  # the workers' connections really were there
        if fault == "restart":
            # ... for a while, then it is back.
            await wait_until(lambda: proxy.refused_connections >= 5, "refused connects")
            proxy.accept_new()
        load.mark.set()
        await wait_until(lambda: len(load.after) >= 200, "calls after the fault")
    finally:
        load.stop.set()
        await asyncio.gather(*tasks)
    # Calls that began before the fault ended may fail, with the driver's error...
    for error in load.before:
        assert error is None or isinstance(error, DatabaseError), repr(error)
    assert any(error is not None for error in load.before)
    # ... every call that began afterwards succeeded.
    assert [error for error in load.after if error is not None] == []
    await off_loop(executor.shutdown, True)
    assert executor.stats().open_connections == 0
    await off_loop(wait_for_server_sessions, "default", baseline)
    await off_loop(proxy.wait_for_active, 0)


@pytest.mark.requires_server
def test_refused_or_stalled_server_fails_within_the_timeout_and_service_resumes(
    proxy: FaultProxy, db_settings: SetSetting
) -> None:
    db_settings(
        aliases=("default",),
        CONN_MAX_AGE=0,
        OPTIONS=with_options(connect_timeout=CONNECT_TIMEOUT),
    )
    baseline = server_session_count()
    with DBExecutor(max_workers=4) as executor:
        assert executor.submit(Item.objects.count).result(DEADLINE) == 0

        # Refused: every connect fails with the driver's OperationalError, because
        # the proxy refused it (each attempt counted there), not by timing out.
        proxy.refuse_new()
        for _ in range(5):
            before = proxy.refused_connections
            with pytest.raises(OperationalError) as refused:
                executor.submit(Item.objects.count).result(DEADLINE)
            assert not is_connect_timeout(refused.value), repr(refused.value.__cause__)
            assert proxy.refused_connections > before

        # Stalled: connects hang until connect_timeout, and end because of it.
        proxy.stall()
        proxy.accept_new()
        started = time.monotonic()
        with pytest.raises(OperationalError) as stalled:
            executor.submit(Item.objects.count).result(DEADLINE)
        # Not before the timeout (time only moves forward: no race)...
        assert time.monotonic() - started >= CONNECT_TIMEOUT * 0.5
        # ... and the driver says the timeout ended it (not DEADLINE, not a reset).
        assert is_connect_timeout(stalled.value), repr(stalled.value.__cause__)
        assert executor.stats().busy == 0  # nothing is left hanging in the pool

        # Back: the very next call succeeds, with no intervention.
        proxy.resume()
        assert executor.submit(Item.objects.count).result(DEADLINE) == 0
        assert executor.stats().open_connections == 0  # CONN_MAX_AGE=0
    wait_for_server_sessions("default", baseline)


def is_connect_timeout(error: BaseException) -> bool:
    """Whether a failed connect timed out (`connect_timeout`), as each driver says it.

    psycopg raises `ConnectionTimeout` ("connection timeout expired"); mysqlclient
    2013 "... reading initial communication packet', system error: 110" (ETIMEDOUT).
    A refused connect is "server closed the connection unexpectedly" or 2002 (115).
    """
    cause = error.__cause__ if error.__cause__ is not None else error
    if type(cause).__name__ == "ConnectionTimeout":
        return True
    return "timeout expired" in str(cause) or "system error: 110" in str(cause)


def server_idle_timeout_options() -> dict[str, Any]:
    """Make the server end a session idle for one second."""
    if connection.vendor == "postgresql":
        return with_options(options="-c idle_session_timeout=1000")
    return with_options(init_command="SET SESSION wait_timeout=1")


@pytest.mark.requires_server
@pytest.mark.parametrize("health_checks", [True, False])
def test_idle_connection_ended_by_the_server_timeout(
    db_settings: SetSetting, health_checks: bool
) -> None:
    # MariaDB's wait_timeout ("server has gone away"); PostgreSQL's idle_session_timeout.
    db_settings(
        aliases=("default",),
        CONN_MAX_AGE=60,
        CONN_HEALTH_CHECKS=health_checks,
        OPTIONS=server_idle_timeout_options(),
    )
    baseline = server_session_count()
    with DBExecutor(max_workers=1) as executor:
        first = executor.submit(backend_id).result(DEADLINE)
        assert executor.stats().open_connections == 1
        wait_for_server_sessions("default", baseline, timeout=DEADLINE)  # the server ended it
        outcomes: list[object] = []
        for _ in range(3):
            try:
                outcomes.append(executor.submit(backend_id).result(DEADLINE))
            except DatabaseError as exc:
                outcomes.append(exc)
    if health_checks:
        assert all(isinstance(outcome, int) for outcome in outcomes), outcomes
    else:
        # Without health checks the first call may meet the dead connection
        # (and the pool then closes it); the following ones succeed.
        assert all(isinstance(outcome, int) for outcome in outcomes[1:]), outcomes
        assert isinstance(outcomes[0], int | OperationalError), outcomes
    assert first not in outcomes
    wait_for_server_sessions("default", baseline)


@pytest.mark.requires_server
@pytest.mark.parametrize("health_checks", [True, False])
async def test_backend_killed_between_calls(db_settings: SetSetting, health_checks: bool) -> None:
    db_settings(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=health_checks)
    baseline = await off_loop(server_session_count)
    executor = install_default_executor(DBExecutor(max_workers=1))
    first = await db_call(backend_id)
    await off_loop(kill_and_close, "default", first)
    outcomes: list[object] = []
    for _ in range(3):
        try:
            outcomes.append(await db_call(backend_id))
        except DatabaseError as exc:
            outcomes.append(exc)
    if health_checks:
        assert all(isinstance(outcome, int) for outcome in outcomes), outcomes
    else:
        assert all(isinstance(outcome, int) for outcome in outcomes[1:]), outcomes
    assert first not in outcomes
    await off_loop(executor.shutdown, True)
    await off_loop(wait_for_server_sessions, "default", baseline)


async def test_ten_thousand_cancelled_calls_leave_nothing_behind(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=0)
    baseline = await off_loop(server_session_count)
    threads_before = set(threading.enumerate())
    executor = install_default_executor(DBExecutor(max_workers=8))
    started = threading.Event()
    ran = 0
    lock = threading.Lock()

    def query() -> bool:
        nonlocal ran
        started.set()
        exists = Item.objects.exists()
        with lock:
            ran += 1
        return exists

    cancelled = 0
    for batch in range(20):
        tasks = [asyncio.create_task(db_call(query)) for _ in range(500)]
        # Cancel at different moments: before any call was submitted, while
        # some are queued, and while some are running.
        for _ in range(batch % 4):
            await asyncio.sleep(0)
        if batch == 1:
            await off_loop(started.wait, DEADLINE)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        cancelled += sum(isinstance(result, asyncio.CancelledError) for result in results)
    assert cancelled >= 9000

    def settled() -> bool:
        stats = executor.stats()
        return stats.busy == 0 and stats.queued == 0

    await wait_until(settled, "the pool to go idle")
    stats = executor.stats()
    assert stats.queued == 0
    assert ran >= 1
    assert stats.connections_opened["default"] >= 1  # connections really were opened
    assert stats.open_connections == 0
    new_threads = set(threading.enumerate()) - threads_before
    assert {t.name for t in new_threads} <= {t.name for t in bridge_threads()}
    assert len(new_threads) <= 8
    await off_loop(wait_for_server_sessions, "default", baseline)
    await off_loop(executor.shutdown, True)
    assert set(threading.enumerate()) - threads_before == set()
