"""CLOSE_STRANDED: connections of threads the library does not own are closed once they end.

The code under test is plain Django on plain threads, unchanged; the garbage
collector is off throughout (the classic leak waits for a collection), and
every count is the server's own.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.db import connections

from async_dbbridge import _stranded
from async_dbbridge._lending import begin_job, get_pool
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.metrics_workload import wait_until
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed", "gc_disabled"),
]

THREADS = 20
TASKS_PER_THREAD = 3
ROUNDS = 100


@pytest.fixture
def close_stranded(settings: Any) -> None:
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, "CLOSE_STRANDED": True}
    assert _stranded._enabled


def test_thread_pool_executor_rounds_leave_no_session(close_stranded: None) -> None:
    closed_before = _stranded.closed_count()
    for _ in range(ROUNDS):
        # The first task of each thread queries, then waits for the others:
        # all twenty threads exist and hold a session at once.
        opened = threading.Barrier(THREADS + 1, timeout=30)

        def task(first: threading.Barrier | None) -> int:
            count = Item.objects.filter(name="x").count()
            if first is not None:
                first.wait()
            return count

        with ThreadPoolExecutor(THREADS) as executor:
            futures = [executor.submit(task, opened) for _ in range(THREADS)]
            opened.wait()
            # Proof the sessions were really open: one per thread, on the server.
            assert server_session_count() == THREADS
            futures += [
                executor.submit(task, None) for _ in range(THREADS * (TASKS_PER_THREAD - 1))
            ]
            assert [f.result() for f in futures] == [0] * THREADS * TASKS_PER_THREAD
        # shutdown(wait=True) joined the threads: they have ended.
        wait_for_server_sessions("default", 0)
    # Counted just after the closes the server already saw.
    wait_until(lambda: _stranded.closed_count() - closed_before == ROUNDS * THREADS, "counted")


def test_a_plain_thread_that_queries_once_and_exits(
    close_stranded: None, caplog: pytest.LogCaptureFixture
) -> None:
    queried, finish = threading.Event(), threading.Event()
    closed_before = _stranded.closed_count()

    def legacy() -> None:
        Item.objects.exists()
        queried.set()
        finish.wait(30)

    thread = threading.Thread(target=legacy, name="legacy-report-1")
    thread.start()
    assert queried.wait(30)
    assert server_session_count() == 1
    # A live thread's connection is never touched from another thread.
    assert server_session_count() == 1
    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        finish.set()
        thread.join(30)
        wait_for_server_sessions("default", 0)
        # Logged once per thread name, naming it; a second thread of that name is not logged.
        again = threading.Thread(target=lambda: Item.objects.exists(), name="legacy-report-1")
        again.start()
        again.join(30)
        wait_for_server_sessions("default", 0)
        wait_until(lambda: _stranded.closed_count() == closed_before + 2, "both closed")
    messages = [r.getMessage() for r in caplog.records if "stranded" in r.getMessage()]
    assert len(messages) == 1
    assert "'legacy-report-1'" in messages[0]
    assert "was opened at" not in messages[0]  # stacks are opt-in


def test_stranded_stacks_name_the_code_that_opened(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.ASYNC_DBBRIDGE = {"CLOSE_STRANDED": True, "STRANDED_STACKS": True}

    def opens_a_connection() -> None:
        Item.objects.exists()

    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        thread = threading.Thread(target=opens_a_connection, name="stacks-shown")
        thread.start()
        thread.join(30)
        wait_for_server_sessions("default", 0)
        # The closer logs just after it closed: wait for the line too.
        wait_until(lambda: any("stacks-shown" in r.getMessage() for r in caplog.records), "log")
    (message,) = [r.getMessage() for r in caplog.records if "stacks-shown" in r.getMessage()]
    assert "'default' was opened at" in message
    assert "test_stranded.py" in message
    assert "opens_a_connection" in message


def test_off_the_sessions_stay_until_a_collection(settings: Any) -> None:
    """The leak is real: without CLOSE_STRANDED (and with gc idle) the session stays."""
    settings.ASYNC_DBBRIDGE = {"CLOSE_STRANDED": False}
    assert not _stranded._enabled
    thread = threading.Thread(target=lambda: Item.objects.exists(), name="left-open")
    thread.start()
    thread.join(30)
    assert server_session_count() == 1
    assert server_session_count() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()  # frees the wrapper's reference cycles: the driver closes the socket
    wait_for_server_sessions("default", 0)


def test_a_pooled_thread_that_ended_without_end_thread_frees_its_slot(
    close_stranded: None, settings: Any
) -> None:
    settings.ASYNC_DBBRIDGE = {"CLOSE_STRANDED": True, "POOL_SIZE": 2}

    def abandoned_job() -> None:
        begin_job(["default"])
        Item.objects.exists()
        # A worker thread killed between jobs: no end_job(), no end_thread().
        connections["default"].in_atomic_block = False

    thread = threading.Thread(target=abandoned_job, name="abandoned")
    thread.start()
    thread.join(30)
    pool = get_pool("default")
    wait_for_server_sessions("default", 0)
    # The closer closes the socket, then frees the slot: the server may see the
    # first a moment before the pool counts the second (bounded polling).
    deadline = time.monotonic() + 30
    while (stats := pool.stats()).in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (stats.opened, stats.in_use, stats.idle) == (1, 0, 0)


def test_library_threads_are_left_to_the_library(close_stranded: None) -> None:
    from async_dbbridge import DBExecutor

    closed_before = _stranded.closed_count()
    with DBExecutor(2) as executor:
        assert executor.submit(Item.objects.count).result() == 0
    wait_for_server_sessions("default", 0)
    assert _stranded.closed_count() == closed_before


def test_closes_are_counted_in_the_metrics(close_stranded: None) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from async_dbbridge.integrations.opentelemetry import instrument

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentation = instrument(meter_provider=provider)
    try:
        closed_before = _stranded.closed_count()
        thread = threading.Thread(target=lambda: Item.objects.exists(), name="counted")
        thread.start()
        thread.join(30)
        wait_until(lambda: _stranded.closed_count() == closed_before + 1, "closed")
        data = reader.get_metrics_data()
        assert data is not None
        (metric,) = [
            m
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == "async_dbbridge.connections.stranded_closed"
        ]
        point: Any
        (point,) = metric.data.data_points
        assert point.value == 1
        assert dict(point.attributes or {}) == {"db.client.connection.pool.name": "default"}
    finally:
        instrumentation.uninstrument()
        provider.shutdown()
