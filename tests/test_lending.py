"""_lending: a job at a time on threads the library does not start (task workers)."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import DatabaseError, connections, transaction

from async_dbbridge import TransactionLeftOpenWarning
from async_dbbridge._lending import begin_job, end_job, end_thread, get_pool
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import SetSetting, backend_id, kill_backend
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]


def job(fn: object = None) -> int:
    """One job on the calling thread, as an integration runs it."""
    begin_job()
    error: BaseException | None = None
    try:
        Item.objects.create(name="job")
        return Item.objects.count()
    except BaseException as exc:
        error = exc
        raise
    finally:
        end_job(error, owner=job)


def test_jobs_on_foreign_threads_share_the_bounded_pool(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60)
    gate = threading.Barrier(8, timeout=30)

    def worker(n: int) -> int:
        gate.wait()  # all eight threads run jobs at once
        try:
            return sum(job() for _ in range(n))
        finally:
            end_thread()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, [20] * 8))
    assert all(results)
    stats = get_pool("default").stats()
    # Really opened, then reused: far fewer connections than jobs, never over the bound.
    # (Django 6.1's MySQL backend reads the server's version once per wrapper through
    # temporary_connection(), whose close() really closes: one more open per thread.)
    assert 1 <= stats.opened <= 2 * stats.max_size
    assert stats.opened - stats.closed <= stats.max_size
    assert stats.checkouts >= 160
    assert stats.in_use == 0
    assert Item.objects.count() == 160
    connections.close_all()
    wait_for_server_sessions("default", stats.idle)


def test_database_error_and_interrupt_close_a_transaction_left_open_is_rolled_back(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60)
    outcomes: list[object] = []

    def closed() -> int:
        return get_pool("default").stats().closed

    def run() -> None:
        begin_job()
        backend_id()
        end_job(None, owner=run)
        opened = get_pool("default").stats().opened
        begin_job()
        backend_id()  # reused from the pool
        assert get_pool("default").stats().opened == opened
        end_job(DatabaseError("boom"), owner=run)
        assert closed() == 1  # closed after the database error
        begin_job()
        backend_id()
        end_job(RuntimeError("time limit"), owner=run, interrupted=True)
        assert closed() == 2  # closed after an interruption
        begin_job()
        transaction.atomic().__enter__()
        Item.objects.create(name="left open")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            end_job(None, owner=run)
        outcomes.append([w.category for w in caught])
        assert connections["default"].connection is None
        assert not connections["default"].in_atomic_block
        end_thread()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert outcomes == [[TransactionLeftOpenWarning]]
    assert not Item.objects.filter(name="left open").exists()


@pytest.mark.requires_server
def test_a_killed_session_is_replaced_with_health_checks_on(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=True)
    ids: list[int] = []

    def one() -> None:
        begin_job()
        try:
            ids.append(backend_id())
        finally:
            end_job(None, owner=one)

    with ThreadPoolExecutor(1) as pool:
        pool.submit(one).result()
        kill_backend("default", ids[0])
        pool.submit(one).result()
        pool.submit(end_thread).result()
    assert ids[0] != ids[1]
    assert server_session_count("default") >= 0
