"""Helpers to prove that code does not leak database connections.

Count what is really open — Django wrappers in this process, and sessions as
the database server sees them — and fail a test that leaves more behind than it
found. Loaded as a pytest plugin through the `pytest11` entry point, so the
`dbbridge_no_leaks` fixture is available as soon as the package is installed:

```python
# Not runnable: a test for pytest; run_report_in_threads() stands for your code.
@pytest.mark.django_db(transaction=True)
def test_report_job(dbbridge_no_leaks):
    run_report_in_threads()  # an error at teardown if a session is left behind
```

[Testing for leaks](testing.md) has complete tests. Server-side counts are the
ground truth: `pg_stat_activity` on PostgreSQL,
`information_schema.PROCESSLIST` on MySQL/MariaDB, and on SQLite the process's
open file descriptors on the database file (Linux), since there is no server.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import sysconfig
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import asgiref
import django
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.signals import connection_created

from ._connections import open_wrappers
from ._lending import pool_stats

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


def _counted(conn: BaseDatabaseWrapper) -> bool:
    # The monitor's own connections are tagged so that no count includes them.
    return not getattr(conn, "_dbbridge_monitor", False)


def process_open_connections(alias: str | None = None) -> int:
    """Django connections open in this process, on any thread.

    Counts wrappers that still hold a live connection, whichever thread owns
    them. Pass `alias` to count one database only.
    """
    return sum(
        1 for conn in open_wrappers() if _counted(conn) and (alias is None or conn.alias == alias)
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
    """Poll [`server_session_count`][async_dbbridge.testing.server_session_count] until it
    matches, within `timeout`.

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
    """Close the private connections used by
    [`server_session_count`][async_dbbridge.testing.server_session_count]."""
    _monitor.close()


# -- where each connection came from (only while the leak fixture runs) --------


@dataclass(frozen=True)
class _Origin:
    """Who opened a connection: the thread, and the innermost frames of the caller's code."""

    thread: weakref.ref[threading.Thread]
    thread_name: str
    frames: tuple[str, ...]


# Wrappers that connected while a leak fixture was active. Weak keys: a wrapper
# that is garbage has had its connection freed and is no longer of interest.
_origins: weakref.WeakKeyDictionary[BaseDatabaseWrapper, _Origin] = weakref.WeakKeyDictionary()
_origins_lock = threading.Lock()


# Frames from these directories are machinery, not the code that asked for a
# connection: Django, asgiref, this package, and the standard library (threading,
# concurrent.futures) — but not third-party packages, which may sit inside it.
def _directory(path: str) -> str:
    return os.path.join(os.path.abspath(path), "")


_MACHINERY: Final = tuple(
    _directory(os.path.dirname(path))
    for path in (django.__file__, asgiref.__file__, __file__)
    if path
)
_STDLIB: Final = tuple(_directory(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib"))
_THIRD_PARTY: Final = tuple(
    _directory(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")
)


def _is_machinery(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(_MACHINERY):
        return True
    return path.startswith(_STDLIB) and not path.startswith(_THIRD_PARTY)


_ORIGIN_FRAMES: Final = 3


def _user_frames(stack: traceback.StackSummary) -> tuple[str, ...]:
    frames = [frame for frame in stack if not _is_machinery(frame.filename)]
    shown = []
    for frame in frames[-_ORIGIN_FRAMES:]:
        where = f"{_short_path(frame.filename)}:{frame.lineno} in {frame.name}"
        shown.append(f"{where}\n      {frame.line}" if frame.line else where)
    return tuple(shown)


def _short_path(path: str) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive, on Windows
        return path
    return path if relative.startswith(os.pardir) else relative


def _record_origin(sender: object, connection: BaseDatabaseWrapper, **kwargs: object) -> None:
    # Runs on the thread that connects, synchronously, inside Django's connect():
    # the stack here is the stack of the code that needed the connection.
    if not _counted(connection):
        return
    thread = threading.current_thread()
    origin = _Origin(weakref.ref(thread), thread.name, _user_frames(traceback.extract_stack()))
    with _origins_lock:
        _origins[connection] = origin


def _owner_ident(conn: BaseDatabaseWrapper) -> int:
    # Private Django attribute: the ident of the thread that created the wrapper
    # (what validate_thread_sharing() compares against). Checked on Django 5.2.19
    # and 6.1.3; only used for reporting and to recognise the test's own thread.
    ident: int = conn._thread_ident  # type: ignore[attr-defined]  # not in django-stubs
    return ident


# -- the leak fixture -----------------------------------------------------------

#: How long the count must stay unchanged, with no cleanup pending in this
#: process, before the fixture trusts it and reports a leak.
SETTLE_SECONDS: Final = 0.25
#: Before the test, how long sessions this process does not hold must stay put
#: before they are taken as part of the baseline (see `_LeakCheck.settled_baseline`).
BASELINE_SETTLE_SECONDS: Final = 1.0
_POLL_SECONDS: Final = 0.02
DEFAULT_LEAK_TIMEOUT: Final = 10.0
_TIMEOUT_OPTION: Final = "dbbridge_leak_timeout"
_ORIGIN_UID: Final = "async_dbbridge.testing.origin"

_FIX_HINT: Final = """\
How to fix: give every thread that touches the database an owner that closes its
connections when its work is done:
  - run the work on a DBExecutor (`with DBExecutor() as pool: pool.submit(fn)`), or from
    async code with `await db_call(fn)`;
  - start your own threads as DBThread instead of threading.Thread;
  - in a long-lived thread, wrap each job in `with db_connection_scope():`."""


@dataclass
class _Snapshot:
    """One look at every alias: the server's count and what this process holds."""

    sessions: dict[str, int]
    # Django connections open in this process, per alias (the monitor's excluded).
    held: dict[str, int]
    # Of those, the ones owned by the thread that runs the test.
    runner: dict[str, int]
    # Cleanup this process has under way that may still lower the count.
    pending: list[str] = field(default_factory=list)

    def key(self) -> tuple[object, ...]:
        return (self.sessions, self.held, self.runner, self.pending)


class _LeakCheck:
    """The bookkeeping of one `dbbridge_no_leaks` fixture."""

    def __init__(self, aliases: list[str], timeout: float) -> None:
        self.aliases = aliases
        self.timeout = timeout
        self.runner_ident = threading.get_ident()
        self.open_before = {id(conn) for conn in open_wrappers()}
        self.baseline = self.settled_baseline(time.monotonic() + timeout)

    def settled_baseline(self, deadline: float) -> _Snapshot:
        """The counts before the test, once sessions closed just before it are gone.

        The previous test's connections may have been closed a moment ago and
        still be on the server: counted into the baseline, they would hide a
        leak of the same size. Wait (within the deadline) until every session is
        one this process holds, or the rest has stayed put for
        `BASELINE_SETTLE_SECONDS` (sessions of somebody else, then).
        """
        last_key: tuple[object, ...] | None = None
        stable_since = time.monotonic()
        while True:
            snap = self.snapshot()
            if all(snap.sessions[a] <= snap.held[a] for a in self.aliases):
                return snap
            current = time.monotonic()
            key = snap.key()
            if key != last_key:
                last_key, stable_since = key, current
            if current >= deadline or (
                not snap.pending and current - stable_since >= BASELINE_SETTLE_SECONDS
            ):
                return snap
            time.sleep(_POLL_SECONDS)

    def snapshot(self) -> _Snapshot:
        held = dict.fromkeys(self.aliases, 0)
        runner = dict.fromkeys(self.aliases, 0)
        for conn in open_wrappers():
            if _counted(conn) and conn.alias in held:
                held[conn.alias] += 1
                if _owner_ident(conn) == self.runner_ident:
                    runner[conn.alias] += 1
        # Idle pooled connections are open sessions this process holds, in no
        # wrapper (the checked-out ones are in their wrapper, counted above).
        for alias, pool in pool_stats().items():
            if alias in held:
                held[alias] += pool.idle
        sessions = {alias: server_session_count(alias) for alias in self.aliases}
        return _Snapshot(sessions, held, runner, _pending_cleanup())

    def others(self, snap: _Snapshot, alias: str) -> int:
        """Sessions besides the ones the test's own thread holds.

        The test's own thread's connections belong to the test runner: Django
        closes them after every transactional test (a `db` test's stays in its
        transaction until the rollback). Whether one is open before or after
        the test depends on the tests that ran before, so it is left out on
        both sides — and a leak cannot hide behind the test closing its own.
        """
        return snap.sessions[alias] - snap.runner[alias]

    def explained(self, now: _Snapshot, alias: str) -> bool:
        """Every session above the start is one this process still holds open.

        A session the client has closed stays on the server for a moment
        (PostgreSQL and MySQL end it asynchronously), so until the surplus is
        made of connections somebody here still holds, the count may still fall.
        """
        unheld_before = max(0, self.baseline.sessions[alias] - self.baseline.held[alias])
        return now.sessions[alias] - now.held[alias] <= unheld_before

    def run(self, deadline: float) -> None:
        """Poll until every alias is back at its baseline, or the surplus has settled.

        The rule for "settled", which lets a leak fail at once instead of at the
        deadline: (1) nothing this library owns is still cleaning up (no bridge
        call running or queued, no shut-down executor with a worker still alive:
        each closes its connections when it is done); (2) every session above
        the baseline is a Django connection this process still holds (none is a
        closed session the server has yet to drop); (3) the counts and holders
        have not changed for `SETTLE_SECONDS`, so a thread that is closing its
        connections right now is not caught midway. Threads the test started and
        left running are not waited for: one still holding a connection after
        the test is the leak.
        """
        start = time.monotonic()
        last_key: tuple[object, ...] | None = None
        stable_since = start
        while True:
            now = self.snapshot()
            if all(self.others(now, a) <= self.others(self.baseline, a) for a in self.aliases):
                return
            current = time.monotonic()
            key = now.key()
            if key != last_key:
                last_key, stable_since = key, current
            settled = (
                not now.pending
                and all(self.explained(now, a) for a in self.aliases)
                and current - stable_since >= SETTLE_SECONDS
            )
            if settled or current >= deadline:
                raise _Leak(self.report(now, settled, current - start))
            time.sleep(_POLL_SECONDS)

    def report(self, now: _Snapshot, settled: bool, waited: float) -> str:
        surplus = sum(
            max(0, self.others(now, a) - self.others(self.baseline, a)) for a in self.aliases
        )
        lines = [
            f"dbbridge_no_leaks: the test left {surplus} database session(s) open.",
            "Sessions per database, besides the test's own thread's (Django closes those):",
        ]
        for alias in self.aliases:
            line = (
                f"  {alias!r}: {self.others(self.baseline, alias)} before the test, "
                f"{self.others(now, alias)} after"
            )
            if not self.explained(now, alias):
                line += " (some not held by any Django connection in this process)"
            lines.append(line)
        holders = self.holders()
        if holders:
            lines.append("Django connections still open in this process:")
            lines.extend(holders)
        if now.pending:
            lines.append("Cleanup still under way at the deadline:")
            lines.extend(f"  {item}" for item in now.pending)
        lines.append(_FIX_HINT)
        how = "the count settled" if settled else f"{_TIMEOUT_OPTION} = {self.timeout:g} s"
        lines.append(f"(reported after {waited:.1f} s: {how})")
        return "\n".join(lines)

    def holders(self) -> list[str]:
        """A line or a few per connection still open: its thread, and who opened it."""
        from ._executor import OwnerThread

        alive = {thread.ident: thread for thread in threading.enumerate()}
        with _origins_lock:
            origins = dict(_origins.items())
        lines = []
        for conn in open_wrappers():
            if not _counted(conn) or conn.alias not in self.aliases:
                continue
            ident = _owner_ident(conn)
            if ident == self.runner_ident:
                continue
            origin = origins.get(conn)
            thread = origin.thread() if origin is not None else alive.get(ident)
            if origin is not None:
                name = origin.thread_name
            else:
                name = thread.name if thread is not None else f"<thread {ident}>"
            running = thread is not None and thread.is_alive()
            state = "still running" if running else "ended without closing it"
            line = f"  {conn.alias!r} on thread {name!r} ({state})"
            if id(conn) in self.open_before and origin is None:
                line += ", opened before the test"
            lines.append(line)
            if isinstance(thread, OwnerThread):
                lines.append(
                    "    a bridge thread: it closes its connections once its DBExecutor"
                    " is shut down and its call has returned"
                )
            if origin is not None and origin.frames:
                lines.append("    opened at:")
                lines.extend(f"    {frame}" for frame in origin.frames)
        return lines


class _Leak(Exception):
    """Raised by the check; turned into a pytest failure with just the report."""


def _off_event_loop(fn: Callable[[], None]) -> None:
    """Run ``fn`` here, or on a helper thread if an event loop runs on this one.

    The counts are database queries, which Django refuses on a thread with a
    running event loop (an async test calling the check itself). Blocking the
    loop meanwhile is harmless: the test has nothing left to await, and the
    cleanup the check may wait for runs on other threads.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        fn()
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="leak-check") as helper:
        helper.submit(fn).result()


def _pending_cleanup() -> list[str]:
    """Cleanup under way in this process that will close connections by itself."""
    from ._executor import _executors
    from ._request_threads import _sets

    pending = []
    for threads in list(_sets):
        busy = threads.stats().busy
        if busy:
            # A request thread gives its connections back when its request ends.
            pending.append(f"{threads!r}: {busy} request(s) still running")
    for executor in list(_executors):
        stats = executor.stats()
        if stats.busy or stats.queued:
            pending.append(f"{executor!r}: {stats.busy} call(s) running, {stats.queued} queued")
        elif stats.shutdown and stats.workers:
            pending.append(f"{executor!r}: {stats.workers} worker(s) still exiting")
    return pending


def _leak_timeout(config: Any) -> float:
    raw = config.getini(_TIMEOUT_OPTION)
    try:
        timeout = float(raw)
    except (TypeError, ValueError):
        timeout = -1.0
    if not timeout > 0:
        raise pytest.UsageError(
            f"{_TIMEOUT_OPTION} must be a number of seconds greater than 0, not {raw!r}"
        )
    return timeout


# -- pytest plugin ------------------------------------------------------------

if pytest is not None:

    def pytest_addoption(parser: pytest.Parser) -> None:
        parser.addini(
            _TIMEOUT_OPTION,
            "dbbridge_no_leaks: the most seconds to wait for database sessions to go "
            f"(default {DEFAULT_LEAK_TIMEOUT:g}); a settled leak fails sooner",
            default=str(DEFAULT_LEAK_TIMEOUT),
        )

    def pytest_configure(config: pytest.Config) -> None:
        _leak_timeout(config)  # a bad value is a usage error now, not in every test

    @pytest.fixture
    def dbbridge_no_leaks(request: pytest.FixtureRequest) -> Iterator[Callable[[], None]]:
        """Fail the test if it leaves more database sessions than it found.

        Records each database's server-side session count before the test. After
        it, shuts the process-wide bridge down, closes the ASGI wrapper's
        request threads and the connection pools (whose idle connections are
        rightly kept open under `CONN_MAX_AGE`), then polls
        until every database is back at its count — or reports the leak as soon
        as the surplus has settled: per database, the count before and after,
        the threads that still hold Django connections, where each connection
        was opened, and how to fix it. `dbbridge_leak_timeout` in the pytest
        configuration bounds the wait (default 10 s).

        The check runs at teardown, after every fixture requested after this one
        has cleaned up, so a leak is reported as an error at teardown. Call the
        yielded function at the end of the test body to check earlier; a leak
        then fails the test itself, and the teardown does not check again.
        """
        from ._install import reset_bridge_executor
        from ._lending import close_pools
        from ._request_threads import _sets

        timeout = _leak_timeout(request.config)
        # Recording origins costs a stack walk per connect: only while a test
        # that asked for this fixture runs.
        connection_created.connect(_record_origin, weak=False, dispatch_uid=_ORIGIN_UID)
        # A thread that ends without closing its connection strands the wrapper
        # in a reference cycle: only the cyclic collector closes it, whenever it
        # happens to run. With the collector off until the check, such a leak is
        # reported every time instead of depending on allocation counts.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        leaked = False
        checked = False

        def check() -> None:
            nonlocal checked, leaked
            checked = True
            # One deadline for the whole check, whatever is slow in it.
            deadline = time.monotonic() + timeout
            # Not waiting here: a bridge call or a request that never returns
            # would hang the teardown. Workers and request threads still
            # running are cleanup under way, which the polling waits for,
            # within the deadline; what they give back to a closed pool is
            # closed then.
            reset_bridge_executor(wait=False)
            for threads in list(_sets):
                threads.close(0)
            # Idle pooled connections are kept open under CONN_MAX_AGE: close
            # them (the next use builds a fresh pool).
            close_pools(0)
            try:
                _off_event_loop(functools.partial(leak_check.run, deadline))
            except _Leak as leak:
                leaked = True
                report = str(leak)
            else:
                return
            # Only the report, outside the except block so that it is not
            # chained to _Leak: a traceback into this plugin would not help.
            pytest.fail(report, pytrace=False)

        try:
            leak_check = _LeakCheck(_aliases_for(request), timeout)
            yield check
            if not checked:
                check()
        finally:
            connection_created.disconnect(dispatch_uid=_ORIGIN_UID)
            with _origins_lock:
                _origins.clear()
            if gc_was_enabled:
                gc.enable()
            if leaked:
                # Free what the report named now: left to a later collection, the
                # drivers' "unclosed connection" ResourceWarnings would surface
                # (as errors, under filterwarnings=error) in some other test.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ResourceWarning)
                    gc.collect()

    def _aliases_for(request: Any) -> list[str]:
        marker = request.node.get_closest_marker("django_db")
        if marker is None and not {"db", "transactional_db"} & set(request.fixturenames):
            # Without it pytest-django blocks the counting queries, and no test
            # database has been set up to count sessions on.
            pytest.fail(
                "dbbridge_no_leaks needs database access: mark the test with "
                "@pytest.mark.django_db(transaction=True)",
                pytrace=False,
            )
        databases = marker.kwargs.get("databases") if marker is not None else None
        if databases == "__all__":
            return list(connections)
        if databases:
            return list(databases)
        return [DEFAULT_DB_ALIAS]

    def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
        close_monitor()
