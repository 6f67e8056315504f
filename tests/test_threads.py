"""DBThread and db_connection_scope: threads of your own, counted on the server."""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable
from unittest import mock

import pytest
from django.db import DatabaseError, connection, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from async_dbbridge import Policy, TransactionLeftOpenWarning
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from async_dbbridge.threads import ConnectionScope, DBThread, db_connection_scope
from tests.conftest import SetSetting, backend_id, kill_backend
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

JOIN_TIMEOUT = 30.0


def is_open(alias: str = "default") -> bool:
    """Whether the calling thread holds an open connection (not narrowed by mypy)."""
    return connections[alias].connection is not None


def join(thread: threading.Thread) -> None:
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive(), f"{thread.name} did not finish"


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Exceptions that escaped a thread's target (instead of pytest's warning)."""
    errors: list[BaseException] = []

    def hook(args: threading.ExceptHookArgs) -> None:
        assert args.exc_value is not None
        errors.append(args.exc_value)

    monkeypatch.setattr(threading, "excepthook", hook)
    return errors


# -- DBThread -----------------------------------------------------------------


@pytest.mark.usefixtures("gc_disabled")
def test_plain_thread_strands_its_connections_dbthread_closes_them(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60)
    baseline = {alias: server_session_count(alias) for alias in ("default", "other")}

    def work() -> None:
        Item.objects.count()
        Item.objects.using("other").count()

    # Control: a plain thread ends with its connections open.
    plain = threading.Thread(target=work)
    plain.start()
    join(plain)
    for alias in ("default", "other"):
        assert server_session_count(alias) == baseline[alias] + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the driver rightly complains
        gc.collect()
    for alias in ("default", "other"):
        wait_for_server_sessions(alias, baseline[alias])

    opened = threading.Event()

    def work_and_report() -> None:
        work()
        opened.set()
        assert is_open()  # really opened

    thread = DBThread(target=work_and_report)
    thread.start()
    join(thread)
    assert opened.is_set()
    for alias in ("default", "other"):
        wait_for_server_sessions(alias, baseline[alias])


def test_dbthread_closes_when_its_target_raises(
    db_settings: SetSetting, thread_errors: list[BaseException]
) -> None:
    db_settings(CONN_MAX_AGE=60)
    baseline = server_session_count()
    seen: list[int] = []

    def fail() -> None:
        seen.append(backend_id())
        raise KeyError("boom")

    thread = DBThread(target=fail)
    thread.start()
    join(thread)
    assert len(seen) == 1
    assert [type(e) for e in thread_errors] == [KeyError]  # reached excepthook unchanged
    wait_for_server_sessions("default", baseline)


def test_dbthread_subclass_overriding_run_closes_once_at_the_end(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=0)
    baseline = server_session_count()
    ids: list[int] = []

    class Worker(DBThread):
        def run(self) -> None:
            super().run()  # runs the target; must not close halfway
            ids.append(backend_id())

    class Deeper(Worker):
        def run(self) -> None:
            super().run()
            ids.append(backend_id())

    thread = Deeper(target=lambda: ids.append(backend_id()))
    thread.start()
    join(thread)
    assert len(ids) == 3
    assert len(set(ids)) == 1  # one connection for the whole run
    wait_for_server_sessions("default", baseline)


def test_dbthread_rolls_back_a_transaction_left_open(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60)
    baseline = server_session_count()

    def leave_open() -> None:
        transaction.set_autocommit(False)
        Item.objects.create(name="uncommitted")

    thread = DBThread(target=leave_open)
    thread.start()
    join(thread)
    wait_for_server_sessions("default", baseline)
    assert not Item.objects.filter(name="uncommitted").exists()


@pytest.mark.parametrize(("max_age", "expected_connections"), [(60, 1), (0, 20)])
def test_queue_fed_worker_honours_conn_max_age_per_job_and_closes_at_exit(
    db_settings: SetSetting, max_age: int, expected_connections: int
) -> None:
    db_settings(CONN_MAX_AGE=max_age)
    baseline = server_session_count()
    jobs: queue.Queue[int | None] = queue.Queue()
    done: queue.Queue[int] = queue.Queue()
    # The driver connections the jobs ran on, kept alive so that ids are unique.
    used: list[object] = []

    def consume() -> None:
        while (job := jobs.get()) is not None:
            with db_connection_scope():
                Item.objects.create(name=f"job-{job}", value=job)
                used.append(connection.connection)
            done.put(job)

    worker = DBThread(target=consume, name="jobs-worker")
    worker.start()
    for job in range(20):
        jobs.put(job)
        assert done.get(timeout=JOIN_TIMEOUT) == job
        # Between jobs: kept under CONN_MAX_AGE=60, closed under 0.
        wait_for_server_sessions("default", baseline + (1 if max_age else 0))
    jobs.put(None)
    join(worker)
    assert len({id(raw) for raw in used}) == expected_connections
    wait_for_server_sessions("default", baseline)
    assert Item.objects.count() == 20


@pytest.mark.requires_server
@pytest.mark.parametrize("health_checks", [True, False])
def test_queue_fed_worker_survives_a_killed_connection(
    db_settings: SetSetting, health_checks: bool
) -> None:
    db_settings(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=health_checks)
    baseline = server_session_count()
    jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
    results: queue.Queue[tuple[str, object]] = queue.Queue()

    @db_connection_scope
    def handle(job: Callable[[], object]) -> object:
        return job()

    def consume() -> None:
        while (job := jobs.get()) is not None:
            try:
                results.put(("ok", handle(job)))
            except DatabaseError as exc:
                results.put(("error", exc))

    worker = DBThread(target=consume)
    worker.start()
    try:
        jobs.put(backend_id)
        status, first = results.get(timeout=JOIN_TIMEOUT)
        assert status == "ok"
        assert isinstance(first, int)
        kill_backend("default", first)
        outcomes = []
        for _ in range(3):
            jobs.put(backend_id)
            outcomes.append(results.get(timeout=JOIN_TIMEOUT))
    finally:
        jobs.put(None)
        join(worker)
        connections.close_all()  # the session that did the killing
    if health_checks:
        assert [status for status, _ in outcomes] == ["ok", "ok", "ok"]
    else:
        # At most the first job sees the dead connection; it is then closed.
        assert [status for status, _ in outcomes][1:] == ["ok", "ok"]
    assert first not in {value for status, value in outcomes if status == "ok"}
    wait_for_server_sessions("default", baseline)


# -- db_connection_scope ------------------------------------------------------


def test_scope_closes_under_conn_max_age_zero_and_keeps_under_sixty(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=0)
    with db_connection_scope():
        Item.objects.count()
        assert is_open()
    assert not is_open()

    db_settings(CONN_MAX_AGE=60)
    with db_connection_scope():
        first = backend_id()
    with db_connection_scope():
        assert backend_id() == first  # reused across scopes
    # Past its lifetime: the next scope's entry closes it, as request_started would.
    connection.close_at = time.monotonic() - 1
    with db_connection_scope():
        assert not is_open()
        assert backend_id() != first or connection.vendor == "sqlite"
    connections.close_all()


def test_scope_as_decorator_keeps_metadata_results_and_exceptions(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60)

    @db_connection_scope
    def count(prefix: str) -> int:
        """Count items."""
        return Item.objects.filter(name__startswith=prefix).count()

    @db_connection_scope(policy="close")
    def fail() -> None:
        Item.objects.count()
        raise LookupError("not a database error")

    assert count.__name__ == "count"
    assert count.__doc__ == "Count items."
    assert count("x") == 0
    assert is_open()  # kept: CONN_MAX_AGE=60
    with pytest.raises(LookupError, match="not a database error"):
        fail()
    assert not is_open()  # policy="close"


def test_scope_closes_after_a_database_error_even_with_persistent_connections(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60)

    @db_connection_scope
    def bad_sql() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table_dbbridge")

    with pytest.raises(DatabaseError):
        bad_sql()
    assert not is_open()

    @db_connection_scope
    def other_error() -> None:
        Item.objects.count()
        raise ValueError

    with pytest.raises(ValueError):  # noqa: PT011 - the type is the point
        other_error()
    assert is_open()  # not a database error: kept
    connections.close_all()


@pytest.mark.parametrize("policy", ["request", "close"])
def test_scope_never_touches_the_callers_atomic_block(db_settings: SetSetting, policy: str) -> None:
    db_settings(CONN_MAX_AGE=0)

    @db_connection_scope(policy=policy)
    def add(name: str) -> int:
        Item.objects.create(name=name)
        return backend_id()

    with transaction.atomic():
        outer = backend_id()
        assert add("inside") == outer
        # The caller's transaction is intact and still usable.
        Item.objects.create(name="after")
        assert connection.in_atomic_block
        assert not connection.needs_rollback
    assert set(Item.objects.values_list("name", flat=True)) == {"inside", "after"}
    connections.close_all()


def test_scope_protects_only_the_alias_in_the_callers_atomic_block(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=0)
    with transaction.atomic(using="other"):
        Item.objects.using("other").create(name="outer")
        with db_connection_scope():
            Item.objects.create(name="default")
            Item.objects.using("other").create(name="inner")
        assert not is_open()  # default: cleaned up
        assert is_open("other")  # other: the caller's, untouched
    assert Item.objects.using("other").count() == 2
    connections.close_all()


def test_scope_rolls_back_a_transaction_it_left_open(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60)

    def leave_open() -> None:
        transaction.atomic().__enter__()
        Item.objects.create(name="left-open")

    with pytest.warns(TransactionLeftOpenWarning, match="leave_open"):
        db_connection_scope(leave_open)()
    assert not is_open()
    assert not connection.in_atomic_block
    assert not Item.objects.filter(name="left-open").exists()

    def leave_autocommit_off() -> None:
        with db_connection_scope():
            transaction.set_autocommit(False)
            Item.objects.create(name="left-open-too")

    with pytest.warns(TransactionLeftOpenWarning, match="leave_autocommit_off"):
        leave_autocommit_off()
    assert transaction.get_autocommit()
    assert not Item.objects.exists()
    connections.close_all()


def test_nested_scopes_leave_the_connection_to_the_outermost(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=0)

    @db_connection_scope(policy="close")
    def inner() -> int:
        return backend_id()

    with db_connection_scope():
        first = inner()
        assert is_open()  # the inner scope did nothing
        assert inner() == first
    assert not is_open()


def test_scope_max_age_policy_gives_connections_their_own_lifetime(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=0)
    with db_connection_scope(policy=Policy.max_age(3600)):
        first = backend_id()
    assert is_open()  # kept despite CONN_MAX_AGE=0
    with db_connection_scope(policy=Policy.max_age(3600)):
        assert backend_id() == first
    connections.close_all()
    with db_connection_scope(policy=Policy.max_age(0)):
        backend_id()
    assert not is_open()  # expired at once


def test_scope_databases_limits_the_aliases_handled(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=0)
    with db_connection_scope(databases=["other"]):
        Item.objects.count()
        Item.objects.using("other").count()
    assert not is_open("other")
    assert is_open()  # not this scope's business
    connections.close_all()


def test_one_decorated_function_on_many_threads_leaves_no_session(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=0)
    baseline = server_session_count()
    barrier = threading.Barrier(8, timeout=JOIN_TIMEOUT)
    held: list[bool] = []
    lock = threading.Lock()

    @db_connection_scope
    def work(n: int) -> None:
        Item.objects.create(name=f"t{n}", value=n)
        barrier.wait()  # all eight hold a connection at once
        with lock:
            held.append(connection.connection is not None)

    def run(n: int) -> None:
        work(n)
        with lock:
            held.append(connection.connection is None)  # closed on the way out

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        join(thread)
    assert held == [True] * 16
    wait_for_server_sessions("default", baseline)
    assert Item.objects.count() == 8


def test_cleanup_failure_is_logged_and_never_hides_the_bodys_exception(
    db_settings: SetSetting, caplog: pytest.LogCaptureFixture
) -> None:
    db_settings(CONN_MAX_AGE=0)
    wrapper_class = type(connections["default"])
    real_close = wrapper_class.close

    def failing_close(self: BaseDatabaseWrapper) -> None:
        real_close(self)  # really closed, so no session outlives the test
        raise DatabaseError("close failed")

    def body_fails() -> None:
        with db_connection_scope():
            Item.objects.count()
            raise KeyError("the body's own")

    caplog.set_level(logging.WARNING, logger="async_dbbridge")
    with (
        mock.patch.object(wrapper_class, "close", autospec=True, side_effect=failing_close),
        pytest.raises(KeyError, match="the body's own"),
    ):
        body_fails()
    assert not is_open()  # forgotten, so the next use reconnects

    caplog.clear()
    with (
        mock.patch.object(wrapper_class, "close", autospec=True, side_effect=failing_close),
        db_connection_scope(),
    ):
        Item.objects.count()  # succeeds: the cleanup error is only logged
    assert "connection cleanup after" in caplog.text
    assert not is_open()
    assert Item.objects.count() == 0
    connections.close_all()


def test_bad_arguments_are_clear_errors() -> None:
    async def coroutine_function() -> None:
        pass

    with pytest.raises(TypeError, match="coroutine function"):
        db_connection_scope(coroutine_function)
    with pytest.raises(ValueError, match="policy"):
        db_connection_scope(policy="sometimes")
    with pytest.raises(ValueError, match="unknown database alias"):
        db_connection_scope(databases=["nope"])
    assert isinstance(db_connection_scope(policy=Policy.max_age(5)), ConnectionScope)
    assert repr(db_connection_scope()) == "<ConnectionScope policy=request>"


def test_exports() -> None:
    from async_dbbridge import threads

    assert threads.__all__ == ("ConnectionScope", "DBThread", "db_connection_scope")
    assert isinstance(DBThread(target=int), threading.Thread)
