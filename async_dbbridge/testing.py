"""Helpers to prove that code does not leak database connections.

Count what is really open — Django wrappers in this process, and sessions as
the database server sees them — and fail a test that leaves more behind than it
found. Loaded as a pytest plugin through the `pytest11` entry point, so the
fixtures are available as soon as the package is installed:

```python
# Not runnable: a test for pytest; run_report_in_threads() stands for your code.
def test_report_job(dbbridge_no_leaks):
    run_report_in_threads()  # fails the test if a session is left behind
```

[Testing for leaks](testing.md) has complete tests. Server-side counts are the
ground truth: `pg_stat_activity` on PostgreSQL,
`information_schema.PROCESSLIST` on MySQL/MariaDB, and on SQLite the process's
open file descriptors on the database file (Linux), since there is no server.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections

from ._connections import open_wrappers

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

try:
    import pytest
except ImportError:  # pragma: no cover - pytest is needed only for the fixtures
    pytest = None  # type: ignore[assignment]

__all__ = (
    "open_connection_aliases",
    "process_open_connections",
    "server_session_count",
    "wait_for_server_sessions",
)


def open_connection_aliases() -> list[str]:
    """Aliases with an open connection on the calling thread."""
    return [
        conn.alias for conn in connections.all(initialized_only=True) if conn.connection is not None
    ]


def process_open_connections(alias: str | None = None) -> int:
    """Django connections open in this process, on any thread.

    Counts wrappers that still hold a live connection, whichever thread owns
    them. Pass `alias` to count one database only.
    """
    return sum(
        1
        for conn in open_wrappers()
        if not getattr(conn, "_dbbridge_monitor", False) and (alias is None or conn.alias == alias)
    )


class _Monitor:
    """One private connection per alias that counts the others, from any thread.

    On PostgreSQL it connects to the `postgres` maintenance database, so it
    never holds a session on the database it counts (which would block the
    test runner's DROP DATABASE).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[str, BaseDatabaseWrapper] = {}

    def _connect(self, alias: str) -> BaseDatabaseWrapper:
        target = connections[alias]
        settings_dict = dict(target.settings_dict)
        if target.vendor == "postgresql":
            settings_dict["NAME"] = "postgres"
        conn = type(target)(settings_dict, alias)
        # Tagged, so process_open_connections() does not count it.
        conn._dbbridge_monitor = True  # type: ignore[attr-defined]
        conn.inc_thread_sharing()
        return conn

    def count(self, alias: str) -> int:
        target = connections[alias]
        name = target.settings_dict["NAME"]
        if target.vendor == "postgresql":
            sql = (
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()"
            )
        elif target.vendor == "mysql":
            sql = (
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                "WHERE DB = %s AND ID <> CONNECTION_ID()"
            )
        else:
            raise ValueError(f"no server-side session count for vendor {target.vendor!r}")
        with self._lock:
            conn = self._conns.get(alias)
            if conn is None:
                conn = self._conns[alias] = self._connect(alias)
            with conn.cursor() as cursor:
                cursor.execute(sql, [name])
                row = cursor.fetchone()
            return int(row[0])

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, {}
        for conn in conns.values():
            conn.close()


_monitor = _Monitor()


def _sqlite_open_files(path: str) -> int:
    """Open descriptors on an SQLite file: one per open connection (ground truth)."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                count += 1
        except OSError:
            continue
    return count


def server_session_count(alias: str = DEFAULT_DB_ALIAS) -> int:
    """Sessions the database server has open on `alias`'s database.

    Excludes the session used to count (a private connection, which the
    pytest plugin closes when the test session ends). On SQLite (no server) this is the number of
    connections this process has open on the database file.

    Raises:
        ValueError: `alias` is an in-memory SQLite database, which cannot be
            observed, or a vendor other than PostgreSQL, MySQL/MariaDB and SQLite.
    """
    conn = connections[alias]
    if conn.vendor == "sqlite":
        name = str(conn.settings_dict["NAME"])
        if name == ":memory:" or "mode=memory" in name or not name:
            raise ValueError(
                f"database {alias!r} is an in-memory SQLite database: its connections "
                "cannot be observed; use a file for leak tests"
            )
        if os.path.isdir("/proc/self/fd"):
            return _sqlite_open_files(name)
        return process_open_connections(alias)
    return _monitor.count(alias)


def wait_for_server_sessions(
    alias: str = DEFAULT_DB_ALIAS,
    expected: int | Callable[[int], bool] = 0,
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
) -> int:
    """Poll [`server_session_count`][async_dbbridge.testing.server_session_count] until it matches.

    A server notices a closed session a moment after the client closed it,
    so assertions on counts poll with a deadline rather than sleep.

    Args:
        alias: The database.
        expected: The count to wait for, or a predicate on the count.
        timeout: Seconds before giving up.
        interval: Seconds between polls.

    Returns:
        The matching count.

    Raises:
        AssertionError: The count did not match in time; the message gives the last one.
    """

    def matches(n: int) -> bool:
        return expected(n) if callable(expected) else n == expected

    deadline = time.monotonic() + timeout
    while True:
        count = server_session_count(alias)
        if matches(count):
            return count
        if time.monotonic() >= deadline:
            wanted = expected if not callable(expected) else getattr(expected, "__name__", "?")
            raise AssertionError(
                f"database {alias!r}: {count} server session(s) after {timeout}s, expected {wanted}"
            )
        time.sleep(interval)


def close_monitor() -> None:
    """Close the private connections used by `server_session_count()`."""
    _monitor.close()


# -- pytest plugin ------------------------------------------------------------

if pytest is not None:

    @pytest.fixture
    def dbbridge_no_leaks(request: pytest.FixtureRequest) -> Iterator[Callable[[], None]]:
        """Fail the test if it leaves more server sessions than it found.

        Yields a function that performs the check early (call it after your own
        teardown). At the end, the process-wide bridge is shut down first — its
        idle workers may legitimately hold connections under `CONN_MAX_AGE` —
        and then every database the test may use must be back at its baseline.
        """
        from ._install import reset_bridge_executor
        from ._lanes import close_all_lane_sets

        aliases = _aliases_for(request)
        baseline = {alias: server_session_count(alias) for alias in aliases}
        checked = False

        def check() -> None:
            nonlocal checked
            checked = True
            # An ASGI app left running holds lane connections under CONN_MAX_AGE.
            close_all_lane_sets(timeout=10.0)
            reset_bridge_executor(wait=True)
            for alias in aliases:
                limit = baseline[alias]

                def at_most_baseline(n: int, limit: int = limit) -> bool:
                    return n <= limit

                wait_for_server_sessions(alias, at_most_baseline, timeout=10.0)

        yield check
        if not checked:
            check()

    def _aliases_for(request: Any) -> list[str]:
        marker = request.node.get_closest_marker("django_db")
        databases = marker.kwargs.get("databases") if marker is not None else None
        if databases == "__all__":
            return list(connections)
        if databases:
            return list(databases)
        return [DEFAULT_DB_ALIAS]

    def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
        close_monitor()
