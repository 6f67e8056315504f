"""DBExecutor: connection lifecycle, bounds, policies, stats — against the real database."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.thread import BrokenThreadPool
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.db import connection, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Count

from async_dbbridge import (
    DBExecutor,
    Policy,
    TransactionLeftOpenWarning,
    db_call,
    install_default_executor,
)
from async_dbbridge._executor import _Worker
from async_dbbridge.testing import (
    open_connection_aliases,
    server_session_count,
    wait_for_server_sessions,
)
from tests.conftest import SetSetting, backend_id, bridge_threads
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]


def aggregate_and_insert(n: int) -> int:
    total = Item.objects.aggregate(n=Count("id"))["n"]
    Item.objects.create(name=f"item-{n}", value=n)
    return int(total)


@pytest.mark.usefixtures("gc_disabled")
@pytest.mark.parametrize("max_age", [0, 60])
def test_classic_leak_plain_pool_strands_sessions_dbexecutor_leaves_none(
    db_settings: SetSetting, max_age: int
) -> None:
    db_settings(CONN_MAX_AGE=max_age)
    baseline = server_session_count()

    # Control: the standard library pool strands one session per thread. Ten
    # rounds are enough to see it and stay under MariaDB's max_connections.
    for round_ in range(10):
        with ThreadPoolExecutor(max_workers=20) as pool:
            list(pool.map(aggregate_and_insert, range(round_ * 3, round_ * 3 + 3)))
    stranded = server_session_count() - baseline
    assert stranded >= 10, f"the control pool should strand sessions, saw {stranded}"
    with warnings.catch_warnings():
        # The drivers rightly complain that the stranded connections were never closed.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    wait_for_server_sessions("default", baseline)

    for round_ in range(100):
        with DBExecutor(max_workers=20) as executor:
            results = list(executor.map(aggregate_and_insert, range(round_ * 3, round_ * 3 + 3)))
            assert len(results) == 3
            opened = executor.stats().connections_opened["default"]
        assert opened >= 1  # the connections really were opened
        assert executor.stats().open_connections == 0
    wait_for_server_sessions("default", baseline)
    assert Item.objects.count() == 30 + 300


async def test_bounded_sessions_under_load_with_persistent_connections(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60)
    loop = asyncio.get_running_loop()
    side = ThreadPoolExecutor(1)  # for the test's own blocking calls, off the bridge
    baseline = await loop.run_in_executor(side, server_session_count)
    executor = install_default_executor(DBExecutor(max_workers=8))
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, server_session_count() - baseline)
            stop.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    gate = asyncio.Semaphore(64)

    async def one() -> int:
        async with gate:
            return await db_call(Item.objects.count)

    try:
        results = await asyncio.gather(*(one() for _ in range(1000)))
    finally:
        stop.set()
        await loop.run_in_executor(side, sampler.join)
    assert results == [0] * 1000
    stats = executor.stats()
    assert stats.calls == 1000
    assert 1 <= stats.connections_opened["default"] <= 8
    assert 1 <= peak <= 8
    # stats() agrees with the server: the workers hold their connections...
    assert stats.open_connections == await loop.run_in_executor(side, server_session_count) - (
        baseline
    )
    await loop.run_in_executor(side, executor.shutdown, True)
    # ... until shutdown, which returns with none left.
    assert executor.stats().open_connections == 0
    await loop.run_in_executor(side, wait_for_server_sessions, "default", baseline)
    side.shutdown()


async def test_conn_max_age_zero_closes_after_every_call(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=0)
    loop = asyncio.get_running_loop()
    side = ThreadPoolExecutor(1)  # for the test's own blocking calls, off the bridge
    baseline = await loop.run_in_executor(side, server_session_count)
    executor = install_default_executor(DBExecutor(max_workers=8))
    gate = asyncio.Semaphore(64)
    seen: list[bool] = []

    def query() -> int:
        count = Item.objects.count()
        seen.append(connection.connection is not None)  # opened for this call
        return count

    async def one() -> int:
        async with gate:
            return await db_call(query)

    with executor:
        await asyncio.gather(*(one() for _ in range(200)))
        stats = executor.stats()
        assert len(seen) == 200
        assert all(seen)
        assert stats.connections_opened["default"] == 200
        assert stats.open_connections == 0
        # Closed without a shutdown: the workers are still there.
        assert stats.workers >= 1
        await loop.run_in_executor(side, wait_for_server_sessions, "default", baseline)
    side.shutdown()


def test_policy_always_close_ignores_conn_max_age(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60)
    with DBExecutor(max_workers=2, policy="close") as executor:
        for i in range(5):
            executor.submit(aggregate_and_insert, i).result()
        stats = executor.stats()
        assert stats.connections_opened["default"] == 5
        assert stats.open_connections == 0


def test_policy_max_age_gives_workers_their_own_lifetime(db_settings: SetSetting) -> None:
    # CONN_MAX_AGE=0 would close after every call; the pool's own age keeps it.
    db_settings(CONN_MAX_AGE=0)
    baseline = server_session_count()
    with DBExecutor(max_workers=1, policy=Policy.max_age(3600)) as executor:
        ids = {executor.submit(backend_id).result() for _ in range(5)}
        assert len(ids) == 1
        assert executor.stats().connections_open == {"default": 1}
        assert server_session_count() == baseline + 1
    wait_for_server_sessions("default", baseline)
    # A lifetime of 0 expires at once: every call gets a new connection.
    with DBExecutor(max_workers=1, policy=Policy.max_age(0)) as executor:
        for _ in range(3):
            executor.submit(backend_id).result()
        assert executor.stats().connections_opened["default"] == 3
        assert executor.stats().open_connections == 0


def test_idle_worker_retires_and_closes_its_connection(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60)
    baseline = server_session_count()
    executor = DBExecutor(max_workers=2, idle_timeout=0.2)
    try:
        executor.submit(aggregate_and_insert, 1).result()
        assert server_session_count() == baseline + 1  # opened, kept for reuse
        wait_for_server_sessions("default", baseline, timeout=10)
        # Bounded polling for the thread itself to be gone.
        for _ in range(500):
            if executor.stats().workers == 0:
                break
            threading.Event().wait(0.01)
        stats = executor.stats()
        assert stats.workers == 0
        assert stats.open_connections == 0
        assert stats.connections_opened == {"default": 1}
        # The pool still works: a new worker starts on demand.
        assert executor.submit(aggregate_and_insert, 2).result() == 1
    finally:
        executor.shutdown()
    wait_for_server_sessions("default", baseline)


def test_two_aliases_in_one_call_are_both_cleaned_up(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60)
    baselines = {alias: server_session_count(alias) for alias in ("default", "other")}

    def use_both() -> list[str]:
        Item.objects.count()
        Item.objects.using("other").count()
        return open_connection_aliases()

    executor = DBExecutor(max_workers=1)
    with executor:
        assert sorted(executor.submit(use_both).result()) == ["default", "other"]
        assert executor.stats().connections_open == {"default": 1, "other": 1}
        for alias in baselines:
            assert server_session_count(alias) == baselines[alias] + 1
    for alias in baselines:
        wait_for_server_sessions(alias, baselines[alias])

    db_settings(CONN_MAX_AGE=0)
    with DBExecutor(max_workers=1) as executor:
        executor.submit(use_both).result()
        assert executor.stats().connections_open == {"default": 0, "other": 0}


class Boom(Exception):
    pass


def test_exceptions_propagate_unchanged_and_the_connection_is_closed(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60)
    error = Boom("from fn")

    def fail() -> None:
        Item.objects.count()
        raise error

    with DBExecutor(max_workers=1) as executor:
        with pytest.raises(Boom) as info:
            executor.submit(fail).result()
        assert info.value is error
        stats = executor.stats()
        assert stats.errors == 1
        # Not a database error: the persistent connection is kept.
        assert stats.connections_open == {"default": 1}


def test_database_error_closes_the_connection_unconditionally(db_settings: SetSetting) -> None:
    from django.db import DatabaseError

    db_settings(CONN_MAX_AGE=60)

    def bad_sql() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table_dbbridge")

    with DBExecutor(max_workers=1) as executor:
        executor.submit(Item.objects.count).result()
        assert executor.stats().connections_open == {"default": 1}
        with pytest.raises(DatabaseError):
            executor.submit(bad_sql).result()
        assert executor.stats().connections_open == {"default": 0}
        assert executor.submit(Item.objects.count).result() == 0


def test_cleanup_error_never_hides_the_callers_exception(
    db_settings: SetSetting, caplog: pytest.LogCaptureFixture
) -> None:
    from django.db import OperationalError

    db_settings(CONN_MAX_AGE=0)
    error = Boom("the real problem")

    def fail() -> None:
        Item.objects.count()
        raise error

    wrapper_class = type(connections["default"])
    real_close = wrapper_class._close  # type: ignore[attr-defined]  # every backend has one

    def broken_close(self: BaseDatabaseWrapper) -> None:
        real_close(self)  # really close it, then report a failure
        raise OperationalError("injected close failure")

    with DBExecutor(max_workers=1) as executor:
        with (
            mock.patch.object(wrapper_class, "_close", broken_close),
            caplog.at_level(logging.WARNING, logger="async_dbbridge"),
        ):
            with pytest.raises(Boom) as info:
                executor.submit(fail).result()
            assert info.value is error
            # A successful call keeps its result even if cleanup fails.
            assert executor.submit(Item.objects.count).result() == 0
        assert "cleanup" in caplog.text
        assert executor.stats().open_connections == 0
        # The forgotten connection is replaced on next use.
        assert executor.submit(Item.objects.count).result() == 0


def test_call_that_leaves_a_transaction_open_is_rolled_back_and_warned(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60)

    def leave_atomic_open() -> None:
        transaction.atomic().__enter__()
        Item.objects.create(name="uncommitted")

    def autocommit_off() -> None:
        transaction.set_autocommit(False)
        Item.objects.create(name="uncommitted-too")

    with DBExecutor(max_workers=1) as executor:
        for fn in (leave_atomic_open, autocommit_off):
            with pytest.warns(TransactionLeftOpenWarning, match=fn.__qualname__):
                executor.submit(fn).result()
            assert executor.stats().connections_open == {"default": 0}
            # The next call on the same thread is not inside that transaction.
            assert executor.submit(lambda: connection.in_atomic_block).result() is False
            assert executor.submit(Item.objects.count).result() == 0
    assert Item.objects.count() == 0


def test_atomic_block_inside_a_call_commits(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60)

    def write() -> int:
        with transaction.atomic():
            Item.objects.create(name="a")
            Item.objects.create(name="b")
        return Item.objects.count()

    with DBExecutor(max_workers=2) as executor:
        assert executor.submit(write).result() == 2
    assert Item.objects.count() == 2


def test_initializer_runs_per_worker_and_a_failing_one_breaks_the_pool() -> None:
    names: list[str] = []
    with DBExecutor(max_workers=1, initializer=lambda: names.append("init")) as executor:
        executor.submit(Item.objects.count).result()
    assert names == ["init"]

    def bad_init() -> None:
        raise Boom("init failed")

    executor = DBExecutor(max_workers=1, initializer=bad_init)
    future = executor.submit(Item.objects.count)
    with pytest.raises(BrokenThreadPool):
        future.result(timeout=10)
    with pytest.raises(BrokenThreadPool):
        executor.submit(Item.objects.count)
    executor.shutdown()


def test_shutdown_runs_queued_calls_or_cancels_them() -> None:
    release = threading.Event()
    executor = DBExecutor(max_workers=1)
    first = executor.submit(release.wait, 10)
    queued = executor.submit(Item.objects.count)
    executor.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert first.result(timeout=10) is True
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(Item.objects.count)

    executor = DBExecutor(max_workers=1)
    futures = [executor.submit(Item.objects.count) for _ in range(5)]
    executor.shutdown(wait=True)
    assert [f.result() for f in futures] == [0] * 5


def test_shutdown_from_inside_a_worker_does_not_deadlock() -> None:
    executor = DBExecutor(max_workers=1)
    assert executor.submit(executor.shutdown, True).result(timeout=10) is None
    for _ in range(500):
        if executor.stats().workers == 0:
            break
        threading.Event().wait(0.01)
    assert executor.stats().workers == 0


def test_a_worker_that_cannot_start_is_not_counted_and_the_caller_gets_the_error() -> None:
    """A thread limit reached: the call fails at once; the pool is not left a phantom."""
    executor = DBExecutor(max_workers=1)
    cannot_start = RuntimeError("can't start new thread")
    try:
        with (
            mock.patch.object(_Worker, "start", side_effect=cannot_start),
            pytest.raises(RuntimeError, match="can't start new thread"),
        ):
            executor.submit(Item.objects.count)
        assert executor.stats().workers == 0
        # The only slot is free again: the next call starts a worker and runs.
        assert executor.submit(Item.objects.count).result(timeout=10) == 0

        executor.shutdown(wait=True)
        # The same through db_call, on a pool with no worker yet.
        executor = DBExecutor(max_workers=1)

        async def db_call_path() -> int:
            install_default_executor(executor)
            with (
                mock.patch.object(_Worker, "start", side_effect=cannot_start),
                pytest.raises(RuntimeError, match="can't start new thread"),
            ):
                await db_call(Item.objects.count)
            return await asyncio.wait_for(db_call(Item.objects.count), 10)

        assert asyncio.run(db_call_path()) == 0
    finally:
        # Before: "cannot join thread before it is started".
        executor.shutdown(wait=True)
    assert executor.stats().workers == 0


def test_a_script_without_django_settings_gets_its_result_and_exits_cleanly() -> None:
    """Worker exit must not ask Django for connections nobody configured."""
    script = textwrap.dedent(
        """
        from async_dbbridge import DBExecutor

        with DBExecutor(max_workers=2) as pool:
            print(sum(pool.map(abs, [-1, -2, -3])))
        # Never shut down by the script: its workers exit at interpreter exit.
        left = DBExecutor(max_workers=1)
        print(left.submit(len, "abc").result())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "6\n3\n", "")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_bad_max_workers(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_workers"):
        DBExecutor(max_workers=bad)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"idle_timeout": 0}, ValueError, "idle_timeout"),
        ({"idle_timeout": -1}, ValueError, "idle_timeout"),
        ({"policy": "sometimes"}, ValueError, "policy"),
        ({"databases": "default"}, TypeError, "not a string"),
        ({"databases": ["nope"]}, ValueError, "'nope'"),
        ({"initializer": 3}, TypeError, "initializer"),
    ],
)
def test_bad_arguments_name_the_problem(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        DBExecutor(**kwargs)


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="seconds"):
        Policy.max_age(-1)
    with pytest.raises(ValueError, match="takes no seconds"):
        Policy("close", 3)
    assert Policy.coerce("close") == Policy.always_close()


def test_workers_stay_within_max_workers_and_leave_no_threads() -> None:
    release = threading.Event()
    executor = DBExecutor(max_workers=3)
    futures = [executor.submit(release.wait, 10) for _ in range(10)]
    assert len(bridge_threads()) <= 3
    stats = executor.stats()
    assert stats.workers == 3
    assert stats.busy == 3 or stats.busy <= 3
    assert stats.queued >= 1
    release.set()
    assert all(f.result(timeout=10) for f in futures)
    executor.shutdown(wait=True)
    assert bridge_threads() == []


def test_stats_has_counts_only_never_settings() -> None:
    with DBExecutor(max_workers=1) as executor:
        executor.submit(Item.objects.count).result()
        data = executor.stats().as_dict()
    text = repr(data)
    assert data["calls"] == 1
    for secret in ("PASSWORD", "HOST", "USER", "NAME"):
        assert secret not in text
    assert set(data) >= {
        "workers", "busy", "idle", "queued", "calls", "errors",
        "connections_open", "connections_opened", "connections_closed", "pooled",
    }  # fmt: skip


async def test_db_call_uses_the_installed_default_executor() -> None:
    from async_dbbridge import install_default_executor

    executor = install_default_executor(DBExecutor(max_workers=2, thread_name_prefix="mine"))
    try:
        name = await db_call(lambda: threading.current_thread().name)
        assert name.startswith("mine-")
    finally:
        await asyncio.to_thread(executor.shutdown, True)


def test_light_load_reuses_one_hot_worker_and_the_burst_workers_retire(
    db_settings: SetSetting,
) -> None:
    """Calls go to the most recently idle worker, so surplus ones can retire.

    With a shared FIFO queue every idle worker would be woken in turn by a light
    load, none would ever be idle for ``idle_timeout``, and a past burst's
    connections would stay open forever.
    """
    db_settings(CONN_MAX_AGE=60)
    executor = DBExecutor(max_workers=4, idle_timeout=0.3)
    try:
        barrier = threading.Barrier(4, timeout=10)
        burst = [executor.submit(lambda: (barrier.wait(), backend_id())) for _ in range(4)]
        assert len({f.result()[1] for f in burst}) == 4
        assert executor.stats().connections_open == {"default": 4}
        names = set()
        for _ in range(5000):  # bounded: the light load until the pool shrinks
            names.add(executor.submit(lambda: threading.current_thread().name).result())
            stats = executor.stats()
            if stats.workers == 1:
                break
            threading.Event().wait(0.002)
        assert stats.workers == 1
        assert stats.connections_open == {"default": 1}
        assert len(names) == 1  # the light load never touched the other threads
    finally:
        executor.shutdown()


def test_a_private_wrapper_connected_on_a_worker_is_not_the_workers(
    db_settings: SetSetting,
) -> None:
    """Code on a worker may connect a wrapper of its own; it is not the worker's."""
    db_settings(CONN_MAX_AGE=60)

    def private_connection() -> bool:
        Item.objects.count()
        private = connections.create_connection("default")
        try:
            private.ensure_connection()
            return private.connection is not None
        finally:
            private.close()

    with DBExecutor(max_workers=1) as executor:
        assert executor.submit(private_connection).result()
        stats = executor.stats()
        assert stats.connections_opened == {"default": 1}
        # The worker's own connection, still open under CONN_MAX_AGE=60.
        assert stats.connections_open == {"default": 1}


# -- pooled executors (the process-wide bridge is one) -------------------------------


def test_a_pooled_executor_refuses_a_max_age_policy() -> None:
    with pytest.raises(
        ValueError, match="lifetime of pooled connections is each alias's CONN_MAX_AGE"
    ):
        DBExecutor(max_workers=1, pooled=True, policy=Policy.max_age(5))


def test_a_pooled_executor_gives_its_connection_back_after_each_call(
    db_settings: SetSetting,
) -> None:
    from async_dbbridge import stats

    db_settings(CONN_MAX_AGE=60)
    with DBExecutor(max_workers=2, pooled=True) as executor:
        first = executor.submit(backend_id).result()
        # Back in the pool (and open: CONN_MAX_AGE=60), not kept by the worker.
        pool = stats().pools["default"]
        assert (pool.opened, pool.in_use, pool.idle) == (1, 0, 1)
        assert executor.submit(backend_id).result() == first
        assert stats().pools["default"].opened == 1
        executor_stats = executor.stats()
        assert executor_stats.pooled
        assert executor_stats.connections_opened == {"default": 1}
        assert executor_stats.connections_open == {"default": 1}
        # The worker's wrapper holds nothing between calls.
        assert executor.submit(open_connection_aliases).result() == []
    # Its workers exited; the pool keeps the idle connection until it is closed.
    assert server_session_count() == 1


def test_a_pooled_worker_keeps_its_connection_through_a_backlog_and_gives_it_back_idle(
    db_settings: SetSetting,
) -> None:
    """Under load a pooled worker runs call after call on one checkout; once it has
    nothing queued the connection is back in the pool."""
    from async_dbbridge import stats

    db_settings(CONN_MAX_AGE=60)
    gate = threading.Event()

    def first_call() -> int:
        session = backend_id()  # really connected
        assert gate.wait(30)
        return session

    with DBExecutor(max_workers=1, pooled=True) as executor:
        first = executor.submit(first_call)
        # Queued behind the first call, which holds the only worker.
        queued = [executor.submit(backend_id) for _ in range(3)]
        assert executor.stats().queued == 3
        gate.set()
        sessions = {first.result(30)} | {future.result(30) for future in queued}
        assert len(sessions) == 1
        pool = stats().pools["default"]
        # One checkout for the four calls, and nothing held once idle.
        assert (pool.opened, pool.checkouts) == (1, 1)
        assert (pool.in_use, pool.idle) == (0, 1)


def test_a_pooled_executor_rolls_back_a_leftover_transaction_and_gives_the_connection_back(
    db_settings: SetSetting,
) -> None:
    from async_dbbridge import stats

    db_settings(CONN_MAX_AGE=60)

    def leave_open() -> int:
        transaction.set_autocommit(False)
        Item.objects.create(name="leftover", value=-1)
        return backend_id()

    with DBExecutor(max_workers=1, pooled=True) as executor:
        with pytest.warns(TransactionLeftOpenWarning, match="before the connection went back"):
            session = executor.submit(leave_open).result()
        pool = stats().pools["default"]
        assert (pool.in_use, pool.idle, pool.closed) == (0, 1, 0)
        # The same connection, clean: in autocommit, the row rolled back.
        assert executor.submit(backend_id).result() == session
        assert not executor.submit(Item.objects.filter(name="leftover").exists).result()


def test_a_pooled_executor_closes_a_connection_after_a_database_error(
    db_settings: SetSetting,
) -> None:
    from django.db import DatabaseError

    from async_dbbridge import stats

    db_settings(CONN_MAX_AGE=60)

    def broken_query() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table_anywhere")

    with DBExecutor(max_workers=1, pooled=True) as executor:
        executor.submit(Item.objects.count).result()
        assert stats().pools["default"].idle == 1
        with pytest.raises(DatabaseError):
            executor.submit(broken_query).result()
        pool = stats().pools["default"]
        # Really closed, never given back: the next call opens a fresh one.
        assert (pool.in_use, pool.idle, pool.closed, pool.opened) == (0, 0, 1, 1)
        executor.submit(Item.objects.count).result()
        assert stats().pools["default"].opened == 2


def test_a_pooled_executor_under_always_close_closes_after_each_call(
    db_settings: SetSetting,
) -> None:
    from async_dbbridge import stats

    db_settings(CONN_MAX_AGE=60)
    with DBExecutor(max_workers=1, pooled=True, policy="close") as executor:
        for _ in range(3):
            executor.submit(Item.objects.count).result()
        pool = stats().pools["default"]
        assert (pool.opened, pool.closed, pool.in_use, pool.idle) == (3, 3, 0, 0)
    wait_for_server_sessions("default", 0)
