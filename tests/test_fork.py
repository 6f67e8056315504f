"""fork(): a child forgets every inherited connection without touching the parent's sessions.

The parent uses connections on its main thread, on a plain thread, on the
process-wide bridge's workers and on a DBExecutor of its own; then a child is
forked (bare ``os.fork()`` and ``multiprocessing`` with the "fork" start method),
runs queries through ``db_call`` and the ORM and exits. The parent's next queries
must run on the very same sessions (backend pid / CONNECTION_ID) as before.

With mysqlclient this fails without the library: CPython frees the other
threads' thread-local wrappers inside ``fork()``, before any at-fork hook, and
mysqlclient's finalizer sends COM_QUIT on the socket the parent still uses.
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import os
import select
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connections

from async_dbbridge import DBExecutor, db_call, get_bridge_executor, reset_bridge_executor
from async_dbbridge.testing import open_connection_aliases, wait_for_server_sessions
from tests.conftest import SetSetting, backend_id
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

FORK_STYLES = ["os.fork", "multiprocessing"]
CHILD_DEADLINE = 60.0


def _child_main(body: Callable[[], dict[str, Any]], write_fd: int) -> None:
    """Run ``body`` in the child, report through the pipe, and never return into pytest."""
    code = 1
    try:
        try:
            report: dict[str, Any] = {"ok": True, **body()}
            code = 0
        except BaseException:
            report = {"ok": False, "error": traceback.format_exc()}
        os.write(write_fd, json.dumps(report).encode())
    finally:
        os._exit(code)


def _read_report(read_fd: int, pid: int) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + CHILD_DEADLINE
    while True:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([read_fd], [], [], max(0.0, remaining))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"the forked child did not finish within {CHILD_DEADLINE}s")
        chunk = os.read(read_fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def run_forked(style: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork, run ``body`` in the child, and return the report it sent back."""
    read_fd, write_fd = os.pipe()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns (DeprecationWarning) that fork() in a process with
            # threads may deadlock the child. Forking while threads hold
            # connections is exactly the situation under test, and under
            # filterwarnings=error the warning would be raised in the parent
            # after the child already exists.
            warnings.simplefilter("ignore", DeprecationWarning)
            if style == "os.fork":
                pid = os.fork()
                if pid == 0:
                    _child_main(body, write_fd)
                process = None
            else:
                process = multiprocessing.get_context("fork").Process(
                    target=_child_main, args=(body, write_fd)
                )
                process.start()
                assert process.pid is not None
                pid = process.pid
        os.close(write_fd)
        write_fd = -1
        raw = _read_report(read_fd, pid)
        if process is None:
            _, status = os.waitpid(pid, 0)
            exit_code = os.waitstatus_to_exitcode(status)
        else:
            process.join(CHILD_DEADLINE)
            exit_code = process.exitcode if process.exitcode is not None else -1
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    report: dict[str, Any] = json.loads(raw) if raw else {"ok": False, "error": "no report"}
    assert report["ok"], report.get("error")
    assert exit_code == 0, report
    return report


class ConnectedThread:
    """A plain ``threading.Thread`` holding a persistent connection while parked."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.errors: list[str] = []
        self._again = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plain-db-thread")

    def _run(self) -> None:
        try:
            self.ids.append(backend_id())
            self._first.set()
            self._again.wait(CHILD_DEADLINE)
            self.ids.append(backend_id())
        except Exception:
            self.errors.append(traceback.format_exc())
        finally:
            self._first.set()
            connections.close_all()

    def start(self) -> int:
        self._thread.start()
        assert self._first.wait(CHILD_DEADLINE)
        assert not self.errors, self.errors
        return self.ids[0]

    def query_again(self) -> int:
        self._again.set()
        self._thread.join(CHILD_DEADLINE)
        assert not self.errors, self.errors
        return self.ids[1]


def pg_connection() -> Any:
    """The calling thread's PostgreSQL wrapper (``close_pool()`` is not in django-stubs)."""
    return connections["default"]


def ids_of_all_workers(run: Callable[[Callable[[], int]], list[int]], n: int) -> set[int]:
    """Backend ids of ``n`` workers: a barrier keeps each call on its own thread.

    The barrier comes after the query: a pooled worker (the bridge's) holds its
    connection until its call returns, so the ``n`` calls hold ``n``
    connections at once — all the pool has, when it has ``n``.
    """
    barrier = threading.Barrier(n, timeout=CHILD_DEADLINE)

    def together() -> int:
        backend = backend_id()
        barrier.wait()
        return backend

    return set(run(together))


@pytest.fixture
def dedicated_executor() -> Iterator[DBExecutor]:
    executor = DBExecutor(max_workers=3, thread_name_prefix="dbbridge-forktest")
    yield executor
    executor.shutdown(wait=True)


@pytest.mark.parametrize("style", FORK_STYLES)
def test_child_discards_inherited_connections_and_parent_keeps_its_sessions(
    style: str, db_settings: SetSetting, dedicated_executor: DBExecutor
) -> None:
    db_settings(CONN_MAX_AGE=60)  # every thread keeps its session across calls
    bridge_workers = 4

    def on_bridge(fn: Callable[[], int]) -> list[int]:
        async def calls() -> list[int]:
            return list(await asyncio.gather(*(db_call(fn) for _ in range(bridge_workers))))

        return asyncio.run(calls())

    def on_dedicated(fn: Callable[[], int]) -> list[int]:
        futures = [dedicated_executor.submit(fn) for _ in range(3)]
        return [future.result(CHILD_DEADLINE) for future in futures]

    main_ids = (backend_id("default"), backend_id("other"))
    plain = ConnectedThread()
    plain_id = plain.start()
    bridge_ids = ids_of_all_workers(on_bridge, bridge_workers)
    dedicated_ids = ids_of_all_workers(on_dedicated, 3)
    assert len(bridge_ids) == bridge_workers
    assert len(dedicated_ids) == 3
    parent_ids = {*main_ids, plain_id, *bridge_ids, *dedicated_ids}
    assert get_bridge_executor().stats().open_connections == bridge_workers

    def child() -> dict[str, Any]:
        # Wrappers sit in reference cycles: the other threads' ones that fork()
        # dropped are freed by the next full collection, which a long-lived
        # child would run sooner or later; run it now.
        gc.collect()
        # Everything inherited is forgotten: the forking thread's own
        # connections, and the executors' (which have no threads here).
        assert open_connection_aliases() == []
        for executor in (get_bridge_executor(), dedicated_executor):
            stats = executor.stats()
            assert (stats.workers, stats.open_connections, stats.shutdown) == (0, 0, False)

        async def calls() -> list[int]:
            return list(await asyncio.gather(*(db_call(backend_id) for _ in range(3))))

        call_ids = asyncio.run(calls())  # a new event loop, the child's own bridge threads
        Item.objects.create(name="from-child")  # a plain ORM call on the main thread
        main_id = backend_id()
        executor_id = dedicated_executor.submit(backend_id).result(CHILD_DEADLINE)
        reset_bridge_executor(wait=True)
        dedicated_executor.shutdown(wait=True)
        connections.close_all()
        return {"ids": [*call_ids, main_id, executor_id]}

    report = run_forked(style, child)

    # The child worked on sessions of its own...
    assert not set(report["ids"]) & parent_ids
    # ... and every session of the parent is alive and still the same one.
    assert (backend_id("default"), backend_id("other")) == main_ids
    assert plain.query_again() == plain_id
    assert ids_of_all_workers(on_bridge, bridge_workers) == bridge_ids
    assert ids_of_all_workers(on_dedicated, 3) == dedicated_ids
    assert Item.objects.filter(name="from-child").count() == 1
    assert get_bridge_executor().stats().errors == 0


@pytest.mark.parametrize("style", FORK_STYLES)
def test_executor_shut_down_before_fork_stays_shut_down_in_the_child(style: str) -> None:
    closed = DBExecutor(max_workers=1)
    closed.submit(backend_id).result()
    closed.shutdown(wait=True)
    running = DBExecutor(max_workers=1)
    try:
        running.submit(backend_id).result()

        def child() -> dict[str, Any]:
            try:
                closed.submit(int)
            except RuntimeError:
                refused = True
            else:
                refused = False
            value = running.submit(int, "7").result(CHILD_DEADLINE)
            running.shutdown(wait=True)
            return {"refused": refused, "value": value}

        assert run_forked(style, child) == {"ok": True, "refused": True, "value": 7}
        assert running.submit(int, "8").result() == 8
    finally:
        running.shutdown(wait=True)


@pytest.mark.vendor("postgresql")  # Django's connection pool is PostgreSQL-only
@pytest.mark.parametrize("style", FORK_STYLES)
def test_child_gets_a_fresh_django_connection_pool(style: str, db_settings: SetSetting) -> None:
    from django.db.backends.postgresql.base import DatabaseWrapper as PostgresWrapper

    # Django >= 5.1; not in django-stubs.
    wrapper_class: Any = PostgresWrapper
    db_settings(
        aliases=("default",),
        CONN_MAX_AGE=0,
        OPTIONS={"pool": {"min_size": 2, "max_size": 2, "timeout": 10}},
    )
    pools = wrapper_class._connection_pools
    try:
        main_id = backend_id()
        parent_pool = pools["default"]
        # Both pooled sessions exist (min_size) before the fork.
        wait_for_server_sessions("default", 2)

        def child() -> dict[str, Any]:
            assert "default" not in wrapper_class._connection_pools
            assert open_connection_aliases() == []
            child_id = backend_id()
            child_pool = wrapper_class._connection_pools["default"]
            assert child_pool is not parent_pool
            connections["default"].close()
            pg_connection().close_pool()
            return {"id": child_id}

        report = run_forked(style, child)
        assert report["id"] != main_id
        assert pools["default"] is parent_pool
        # The parent's checked-out connection and its idle pooled one both work.
        assert backend_id() == main_id
        connections["default"].close()  # back to the pool
        for _ in range(4):
            backend_id()
            connections["default"].close()
        assert parent_pool.get_stats()["pool_size"] == 2
    finally:
        connections["default"].close()
        pg_connection().close_pool()
