"""The connection pool: a bound that holds, Django's connection semantics kept.

Plain `threading.Thread`s make their wrappers pooled at start, as request
threads and bridge workers do, and give back after each "call" (what
HOLD="transaction" does). Server-side session counts are the ground truth.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, OperationalError, connections, transaction

from async_dbbridge import PoolStats, PoolTimeout, _lending, _pool
from async_dbbridge._lending import (
    close_pools,
    end_of_request,
    end_request,
    get_pool,
    give_back,
    make_pooled,
)
from async_dbbridge.conf import parse_settings
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import SetSetting, backend_id, kill_backend
from tests.test_fork import run_forked
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

DEADLINE = 30.0
_T = TypeVar("_T")


class PooledThread:
    """A plain thread whose `default` wrapper is pooled; runs "calls" one at a time.

    After each call it gives the connection back when idle, as a request thread
    does with HOLD="transaction" (`give_back=False` to skip that).
    """

    def __init__(self, name: str = "pooled", *, give_back_after: bool = True) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self.give_back_after = give_back_after
        self.gave_back: list[bool] = []
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        conn = connections["default"]
        assert make_pooled(conn)
        while (job := self._jobs.get()) is not None:
            fn, future = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:
                error = exc
            # Given back before the caller hears of the result, so that what
            # the test looks at next is the state after the call.
            try:
                if self.give_back_after:
                    self.gave_back.append(give_back(conn))
            except BaseException as exc:
                error = error or exc
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        end_of_request(conn)
        conn.close()

    def submit(self, fn: Callable[[], _T]) -> Future[_T]:
        future: Future[_T] = Future()
        self._jobs.put((fn, future))
        return future

    def call(self, fn: Callable[[], _T]) -> _T:
        return self.submit(fn).result(DEADLINE)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "a pooled thread did not stop"


@pytest.fixture
def pool_config(settings: Any, db_settings: SetSetting) -> Iterator[Callable[..., None]]:
    """Set the pool's settings; pools are rebuilt from them, and closed at the end.

    CONN_MAX_AGE defaults to 0, which closes every connection given back; the
    tests of reuse need a lifetime (a test may set its own after this).
    """
    close_pools(timeout=DEADLINE)
    db_settings(CONN_MAX_AGE=60)

    def configure(**keys: object) -> None:
        close_pools(timeout=DEADLINE)
        settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, **keys}

    configure()
    yield configure
    assert close_pools(timeout=DEADLINE)


@pytest.fixture
def threads() -> Iterator[Callable[..., PooledThread]]:
    started: list[PooledThread] = []

    def start(name: str = "pooled", **kwargs: Any) -> PooledThread:
        thread = PooledThread(name, **kwargs)
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


def stats() -> PoolStats:
    return get_pool("default").stats()


def counts(*names: str, pool: _pool.ConnectionPool | None = None) -> tuple[Any, ...]:
    """Some fields of one snapshot of the pool's stats."""
    snapshot = (pool or get_pool("default")).stats().as_dict()
    return tuple(snapshot[name] for name in names)


def eventually(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.005)


def raw_id() -> int:
    """The identity of the raw connection the calling thread holds."""
    backend_id()
    return id(connections["default"].connection)


def test_the_bound_holds_under_concurrency(
    pool_config: Callable[..., None], db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)  # given back connections stay open for the next thread
    pool_config(POOL_SIZE=4, POOL_TIMEOUT=DEADLINE)
    n = 24
    barrier = threading.Barrier(n + 1, timeout=DEADLINE)
    gate = threading.Event()
    errors: list[str] = []
    sessions: list[int] = []

    def work() -> None:
        conn = connections["default"]
        try:
            make_pooled(conn)
            barrier.wait()  # all 24 want a connection at once
            with transaction.atomic():
                sessions.append(backend_id())
                assert gate.wait(DEADLINE)
                backend_id()
            assert give_back(conn)
        except BaseException:
            errors.append(traceback.format_exc())
        finally:
            conn.close()

    workers = [threading.Thread(target=work, name=f"bound-{i}") for i in range(n)]
    for worker in workers:
        worker.start()
    barrier.wait()
    # Four hold a connection in an atomic block; twenty wait in line.
    eventually(lambda: stats().in_use == 4 and stats().waiting == n - 4, "4 in use, 20 waiting")
    # They really opened: the server sees four sessions (SQLite: four open files).
    assert wait_for_server_sessions("default", 4) == 4
    samples = [server_session_count("default")]
    gate.set()
    while any(worker.is_alive() for worker in workers):
        samples.append(server_session_count("default"))
    for worker in workers:
        worker.join(DEADLINE)
    assert not errors, errors[0]
    assert max(samples) <= 4, samples
    final = stats()
    assert final.opened == 4
    assert final.checkouts == n
    assert final.timeouts == 0
    assert len(sessions) == n
    assert len(set(sessions)) <= 4
    assert final.wait_time_max > 0  # somebody waited (no duration asserted)
    assert close_pools(timeout=DEADLINE)
    wait_for_server_sessions("default", 0)


def test_a_checkout_times_out_with_a_named_error(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread]
) -> None:
    pool_config(POOL_SIZE=1, POOL_TIMEOUT=0.2)
    holder, other = threads("holder"), threads("other")
    atomic = transaction.atomic()
    holder.call(atomic.__enter__)
    holder.call(backend_id)
    assert holder.gave_back == [False, False]  # in an atomic block: kept

    with pytest.raises(PoolTimeout) as raised:
        other.call(backend_id)
    error = raised.value
    assert isinstance(error, OperationalError)
    message = str(error)
    for part in ("'default'", "0.2s", "all 1 of", "POOL_SIZE", "POOL_TIMEOUT"):
        assert part in message
    assert (error.alias, error.max_size, error.timeout) == ("default", 1, 0.2)
    assert stats().timeouts == 1
    assert connections["default"].connection is None  # nothing opened on this thread

    holder.call(lambda: atomic.__exit__(None, None, None))
    assert holder.gave_back[-1] is True
    other.call(backend_id)  # the connection is free now


def test_a_waiter_is_served_as_soon_as_a_connection_is_given_back(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread]
) -> None:
    # A long timeout: the waiters must be woken by the give-back, not by it.
    pool_config(POOL_SIZE=1, POOL_TIMEOUT=300)
    holder = threads("holder")
    atomic = transaction.atomic()
    holder.call(atomic.__enter__)
    held = holder.call(raw_id)
    order: list[str] = []
    futures = []

    def take_as(name: str) -> Callable[[], int]:
        def take() -> int:
            session = raw_id()
            order.append(name)
            return session

        return take

    def waiting(n: int) -> Callable[[], bool]:
        return lambda: counts("waiting") == (n,)

    for name in ("first", "second", "third"):
        futures.append(threads(name).submit(take_as(name)))
        eventually(waiting(len(futures)), f"{len(futures)} waiting")
    holder.call(lambda: atomic.__exit__(None, None, None))
    assert [future.result(DEADLINE) for future in futures] == [held] * 3
    assert order == ["first", "second", "third"]  # served in arrival order
    assert stats().opened == 1


def test_a_connection_given_back_is_reused_by_the_next_thread(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread], db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    pool_config(POOL_SIZE=2)
    first, second = threads("first"), threads("second")
    session, raw = first.call(lambda: (backend_id(), raw_id()))
    assert first.gave_back == [True]
    assert counts("idle", "in_use") == (1, 0)
    assert first.call(lambda: connections["default"].connection) is None
    assert second.call(lambda: (backend_id(), raw_id())) == (session, raw)
    assert stats().opened == 1
    assert server_session_count("default") == 1


def test_a_transaction_spanning_several_calls_keeps_its_connection(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread]
) -> None:
    pool_config(POOL_SIZE=2)
    worker, other = threads("worker"), threads("other")
    atomic = transaction.atomic()
    worker.call(atomic.__enter__)
    session = worker.call(backend_id)
    worker.call(lambda: Item.objects.create(name="one"))
    assert other.call(Item.objects.count) == 0  # not committed yet
    assert worker.call(backend_id) == session
    worker.call(lambda: Item.objects.create(name="two"))
    assert worker.gave_back == [False] * 5
    worker.call(lambda: atomic.__exit__(None, None, None))
    assert worker.gave_back[-1] is True
    assert other.call(lambda: sorted(Item.objects.values_list("name", flat=True))) == [
        "one",
        "two",
    ]


def test_an_open_iterator_keeps_its_connection(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread]
) -> None:
    pool_config(POOL_SIZE=2)
    Item.objects.bulk_create(Item(name=f"item-{i}") for i in range(7))
    connections["default"].close()
    worker = threads("worker")
    iterator: Iterator[Item] = iter(())

    def start() -> str:
        nonlocal iterator
        iterator = Item.objects.order_by("name").iterator(chunk_size=2)
        return next(iterator).name

    assert worker.call(start) == "item-0"
    assert worker.gave_back == [False]  # the chunked cursor is open
    assert stats().in_use == 1
    assert worker.call(lambda: next(iterator).name) == "item-1"
    assert worker.gave_back == [False, False]
    assert worker.call(lambda: [item.name for item in iterator]) == [
        f"item-{i}" for i in range(2, 7)
    ]
    assert worker.gave_back[-1] is True  # exhausted: the cursor closed
    assert counts("in_use", "idle") == (0, 1)


def test_conn_max_age_zero_closes_on_give_back(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread], db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=0)
    pool_config(POOL_SIZE=2)
    worker = threads("worker", give_back_after=False)
    worker.call(backend_id)
    assert wait_for_server_sessions("default", 1) == 1  # really opened
    assert worker.call(lambda: give_back(connections["default"])) is False  # closed instead
    wait_for_server_sessions("default", 0)
    assert counts("closed", "idle", "in_use") == (1, 0, 0)


def test_conn_max_age_is_a_lifetime_counted_from_the_real_open(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread], db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    pool_config(POOL_SIZE=2)
    first, second = threads("first"), threads("second", give_back_after=False)
    session = first.call(backend_id)
    opened_close_at = first.call(lambda: connections["default"].close_at)
    assert opened_close_at is not None
    # Taken by another thread later, the connection keeps its deadline.
    assert second.call(backend_id) == session
    assert second.call(lambda: connections["default"].close_at) == opened_close_at
    assert second.call(lambda: give_back(connections["default"])) is True

    db_settings(CONN_MAX_AGE=1)
    pool_config(POOL_SIZE=2)
    short = first.call(backend_id)
    deadline = first.call(lambda: connections["default"].close_at)
    assert deadline is not None
    assert wait_for_server_sessions("default", 1) == 1
    eventually(lambda: time.monotonic() >= deadline, "the connection's lifetime ended")
    # Past its lifetime, the idle connection is closed and replaced on take.
    assert second.call(backend_id) != short or connections["default"].vendor == "sqlite"
    assert counts("opened", "closed") == (2, 1)
    wait_for_server_sessions("default", 1)


def test_a_connection_past_its_lifetime_is_closed_when_given_back(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread], db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=1)
    pool_config(POOL_SIZE=2)
    worker = threads("worker", give_back_after=False)
    worker.call(backend_id)
    deadline = worker.call(lambda: connections["default"].close_at)
    assert deadline is not None
    assert wait_for_server_sessions("default", 1) == 1
    eventually(lambda: time.monotonic() >= deadline, "the connection's lifetime ended")
    assert worker.call(lambda: give_back(connections["default"])) is False
    wait_for_server_sessions("default", 0)
    assert stats().closed == 1


@pytest.mark.requires_server
def test_health_checks_replace_a_dead_idle_connection(
    pool_config: Callable[..., None],
    threads: Callable[..., PooledThread],
    db_settings: SetSetting,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db_settings(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=True)
    monkeypatch.setattr(_pool, "HEALTH_CHECK_IDLE", 0.0)  # every take counts as "after idling"
    pool_config(POOL_SIZE=2)
    first, second = threads("first"), threads("second")
    dead = first.call(backend_id)
    assert stats().idle == 1
    kill_backend("default", dead)
    connections["default"].close()
    fresh = second.call(backend_id)  # no error: the dead one was never handed out
    assert fresh != dead
    assert counts("opened", "closed", "idle") == (2, 1, 1)


@pytest.mark.requires_server
def test_without_health_checks_a_dead_connection_fails_once_and_is_discarded(
    pool_config: Callable[..., None],
    threads: Callable[..., PooledThread],
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=False)
    pool_config(POOL_SIZE=2)
    first, second = threads("first"), threads("second")
    dead = first.call(backend_id)
    kill_backend("default", dead)
    connections["default"].close()
    with pytest.raises(DatabaseError):
        second.call(backend_id)  # Django's behaviour: the first query fails
    assert second.gave_back == [False]  # broken: really closed, not given back
    assert counts("idle", "in_use", "closed") == (0, 0, 1)
    assert second.call(backend_id) != dead
    assert stats().opened == 2


def test_a_usable_connection_survives_a_query_error(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread], db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    pool_config(POOL_SIZE=2)
    worker = threads("worker")
    session = worker.call(backend_id)

    def bad_query() -> None:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table_at_all")

    with pytest.raises(DatabaseError):
        worker.call(bad_query)
    # Django marked the connection; the pool checked it, found it usable, kept it.
    assert worker.gave_back == [True, True]
    assert worker.call(backend_id) == session
    assert counts("opened", "closed") == (1, 0)


@pytest.mark.requires_server
def test_a_connection_broken_while_in_use_is_closed_not_given_back(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread], db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    pool_config(POOL_SIZE=2)
    worker = threads("worker", give_back_after=False)
    session = worker.call(backend_id)
    kill_backend("default", session)
    connections["default"].close()
    with pytest.raises(DatabaseError):
        worker.call(backend_id)
    assert worker.call(lambda: connections["default"].errors_occurred) is True
    assert worker.call(lambda: give_back(connections["default"])) is False
    assert worker.call(lambda: connections["default"].connection) is None
    assert counts("closed", "idle", "in_use") == (1, 0, 0)


def test_end_of_request_rolls_back_reports_once_and_gives_back_clean(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread]
) -> None:
    pool_config(POOL_SIZE=1)
    worker = threads("worker", give_back_after=False)
    atomic = transaction.atomic()
    worker.call(atomic.__enter__)
    worker.call(lambda: Item.objects.create(name="uncommitted"))
    session = worker.call(backend_id)

    # The aliases rolled back, once each, for the caller to report where the
    # request ran (the ASGI wrapper warns on the event loop).
    assert worker.call(lambda: end_request([connections["default"]])) == ["default"]
    assert counts("in_use", "idle") == (0, 1)  # given back, not closed

    def state() -> tuple[int, bool, bool, int]:
        conn = connections["default"]
        session = backend_id()
        return session, conn.in_atomic_block, conn.get_autocommit(), Item.objects.count()

    # The next user gets the same session, clean: no transaction, nothing committed.
    other = threads("other")
    assert other.call(state) == (session, False, True, 0)
    assert Item.objects.count() == 0


def test_end_of_request_without_a_transaction_reports_nothing(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread]
) -> None:
    pool_config(POOL_SIZE=1)
    worker = threads("worker", give_back_after=False)
    worker.call(backend_id)
    assert worker.call(lambda: end_of_request(connections["default"])) is None
    assert counts("in_use", "idle") == (0, 1)


def test_close_pools_leaves_no_session(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread]
) -> None:
    pool_config(POOL_SIZE=3)
    idle = [threads(f"idle-{i}") for i in range(2)]
    busy = threads("busy", give_back_after=False)
    barrier = threading.Barrier(3, timeout=DEADLINE)

    def together() -> int:
        session = backend_id()
        barrier.wait()  # all hold a connection at once: three sessions
        return session

    futures = [thread.submit(together) for thread in [*idle, busy]]
    assert len({future.result(DEADLINE) for future in futures}) == 3
    assert wait_for_server_sessions("default", 3) == 3
    assert counts("idle", "in_use") == (2, 1)
    pool = get_pool("default")
    # One connection is in use: it is closed when given back, not before.
    assert close_pools(timeout=0.05) is False
    wait_for_server_sessions("default", 1)
    assert busy.call(lambda: give_back(connections["default"])) is False
    wait_for_server_sessions("default", 0)
    assert counts("closed", "in_use", pool=pool) == (3, 0)
    assert close_pools(timeout=DEADLINE) is True
    assert get_pool("default") is not pool  # a new one is built on next use


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_fork_resets_the_pool_in_the_child_without_touching_the_parent(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread], db_settings: SetSetting
) -> None:
    db_settings(CONN_MAX_AGE=60)
    pool_config(POOL_SIZE=2)
    worker = threads("worker")
    session = worker.call(backend_id)
    assert stats().idle == 1  # the parent's session waits in the pool

    def child() -> dict[str, Any]:
        inherited = {alias: s.as_dict() for alias, s in _lending.pool_stats().items()}
        result: dict[str, Any] = {}

        def run() -> None:
            conn = connections["default"]
            make_pooled(conn)
            result["session"] = backend_id()
            result["stats"] = get_pool("default").stats().as_dict()
            conn.close()

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(DEADLINE)
        return {"inherited": inherited, **result}

    report = run_forked("os.fork", child)
    assert report["inherited"] == {}  # no pool survived into the child
    assert report["session"] != session or connections["default"].vendor == "sqlite"
    assert report["stats"]["opened"] == 1
    # The parent's pooled session is intact and still in its pool.
    assert worker.call(backend_id) == session
    assert stats().opened == 1


def test_bad_pool_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="max_size"):
        _pool.ConnectionPool("default", 0, 1.0)
    with pytest.raises(ValueError, match="timeout"):
        _pool.ConnectionPool("default", 1, 0)
    with pytest.raises(ValueError, match="no database 'nope'"):
        get_pool("nope")


def test_a_failed_connect_frees_its_slot_and_raises_the_driver_error() -> None:
    pool = _pool.ConnectionPool("default", 1, 5.0)

    class Refused(Exception):
        pass

    def refuse() -> Any:
        raise Refused("connection refused")

    with pytest.raises(Refused):
        pool.take(refuse, max_age=None)
    assert pool.stats().in_use == 0
    entry = pool.take(object, max_age=None)
    assert counts("in_use", "opened", pool=pool) == (1, 1)
    pool.release(entry)
    assert pool.stats().in_use == 0


def test_make_pooled_refuses_what_it_cannot_pool(
    pool_config: Callable[..., None], db_settings: SetSetting
) -> None:
    errors: list[str] = []

    def run() -> None:
        conn = connections["default"]
        try:
            conn.ensure_connection()
            with pytest.raises(ValueError, match="before the thread's first query"):
                make_pooled(conn)
            conn.close()
            db_settings(aliases=("default",), OPTIONS={"pool": True})
            with pytest.raises(ImproperlyConfigured, match=r"OPTIONS\['pool'\]"):
                make_pooled(conn)
        except BaseException:
            errors.append(traceback.format_exc())
        finally:
            conn.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(DEADLINE)
    assert not errors, errors[0]
    assert _lending.pool_stats() == {}  # nothing was pooled


def test_a_copy_of_a_pooled_wrapper_is_not_pooled(
    pool_config: Callable[..., None], threads: Callable[..., PooledThread]
) -> None:
    pool_config(POOL_SIZE=1)
    worker = threads("worker")

    def copy_and_query() -> tuple[bool, int]:
        copy = connections["default"].copy()
        try:
            with copy.cursor() as cursor:
                cursor.execute("SELECT 1")
            return type(copy) is type(connections["default"]), get_pool("default").stats().opened
        finally:
            copy.close()

    # Same (pooled) class, but its connection is its own: the pool opened none.
    assert worker.call(copy_and_query) == (True, 0)
    worker.call(backend_id)
    assert counts("opened") == (1,)


@pytest.mark.vendor("sqlite")
def test_an_in_memory_sqlite_database_is_not_pooled() -> None:
    conn = connections["default"].copy()
    conn.settings_dict["NAME"] = ":memory:"
    assert make_pooled(conn) is False
    assert type(conn) is type(connections["default"])


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("POOL_SIZE", 0, "a positive integer"),
        ("POOL_SIZE", True, "a positive integer"),
        ("POOL_TIMEOUT", 0, "> 0"),
        ("POOL_TIMEOUT", None, "a number of seconds"),
        ("HOLD", "call", "'transaction' or 'request'"),
    ],
)
def test_pool_settings_are_validated(key: str, value: object, expected: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=f"ASYNC_DBBRIDGE\\['{key}'\\]") as raised:
        parse_settings({key: value})
    assert expected in str(raised.value)


def test_pool_settings_defaults() -> None:
    parsed = parse_settings({"MAX_WORKERS": 3})
    assert (parsed.pool_size, parsed.pool_timeout, parsed.hold) == (3, 5.0, "transaction")
    parsed = parse_settings({"POOL_SIZE": 20, "POOL_TIMEOUT": 0.5, "HOLD": "request"})
    assert (parsed.pool_size, parsed.pool_timeout, parsed.hold) == (20, 0.5, "request")
