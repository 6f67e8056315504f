from __future__ import annotations

import asyncio
import functools
import gc
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from django.db import connections

from async_dbbridge import reset_bridge_executor
from async_dbbridge._binding import RequestBinding
from async_dbbridge._lending import close_pools
from async_dbbridge._request_threads import _sets as request_thread_sets
from async_dbbridge.testing import wait_for_server_sessions

#: The event loop the tests run on, and the uvicorn servers they start:
#: "asyncio" (with h11) or "uvloop" (with httptools, what uvicorn[standard]
#: picks in production). scripts/test_matrix.sh runs the wrapper's tests
#: under both. uvloop hides asyncio's private loop attributes: the library
#: must not depend on them.
LOOP = os.environ.get("DBBRIDGE_LOOP", "asyncio")
if LOOP not in ("asyncio", "uvloop"):
    raise RuntimeError(f"DBBRIDGE_LOOP must be 'asyncio' or 'uvloop', not {LOOP!r}")
#: uvicorn's matching HTTP implementation.
HTTP = "httptools" if LOOP == "uvloop" else "h11"


if LOOP == "uvloop":

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        """pytest-asyncio's loops are uvloop's (a hook defined only for that run)."""
        import uvloop

        return {"uvloop": uvloop.new_event_loop}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that do not apply to this run's backend are deselected, not skipped.

    ``requires_server`` (kill a backend, read the processlist) does not apply to
    SQLite; ``vendor("postgresql")`` applies to that vendor only. A skip would
    look the same as a server that is down, which must fail loudly instead.
    """
    from django.db import connections

    vendor = connections["default"].vendor
    # The task workers' end-to-end tests start real workers against real
    # brokers: the matrix runs them in one Django series (scripts/test_matrix.sh).
    workers = os.environ.get("DBBRIDGE_WORKERS", "1") != "0"
    # So do the fresh-venv and browser end-to-end runs (README's quick start, the demo).
    slow = os.environ.get("DBBRIDGE_SLOW", "1") != "0"
    # The scale-out tests (a streaming replica, app hosts in network
    # namespaces) build clusters and namespaces: only when asked for.
    scale = os.environ.get("DBBRIDGE_SCALE", "0") == "1"
    # The ASGI server matrix (tests/test_servers.py): "fast" (the default) runs the
    # cases marked servers(fast=True) on PostgreSQL, "all" every server on each
    # server backend, "0" none.
    servers = os.environ.get("DBBRIDGE_SERVERS", "fast")
    if servers not in ("0", "fast", "all"):
        raise pytest.UsageError(f"DBBRIDGE_SERVERS must be '0', 'fast' or 'all', not {servers!r}")

    def applies(item: pytest.Item) -> bool:
        if vendor == "sqlite" and item.get_closest_marker("requires_server"):
            return False
        if not workers and item.get_closest_marker("workers"):
            return False
        if not slow and item.get_closest_marker("slow"):
            return False
        if not scale and item.get_closest_marker("scale"):
            return False
        server_marker = item.get_closest_marker("servers")
        if server_marker is not None and servers != "all":
            fast = server_marker.kwargs.get("fast", False) and vendor == "postgresql"
            if servers == "0" or not fast:
                return False
        marker = item.get_closest_marker("vendor")
        return marker is None or vendor in marker.args

    kept = [item for item in items if applies(item)]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if not applies(item)])
        items[:] = kept


SetSetting = Callable[..., None]


@pytest.fixture
def db_settings() -> Iterator[SetSetting]:
    """Change per-alias database settings (CONN_MAX_AGE, ...) for one test.

    Every thread's wrapper shares the alias's settings dict, so a change is seen
    by worker threads at their next connect.
    """
    saved: list[tuple[str, str, object]] = []

    def set_setting(aliases: tuple[str, ...] = ("default", "other"), **values: object) -> None:
        for alias in aliases:
            settings_dict = connections.settings[alias]
            for key, value in values.items():
                saved.append((alias, key, settings_dict[key]))
                settings_dict[key] = value

    yield set_setting
    for alias, key, value in reversed(saved):
        connections.settings[alias][key] = value


def close_request_threads_and_pools(timeout: float = 10.0) -> None:
    """End every request thread set and close every pool (the next use builds a new one)."""
    for threads in list(request_thread_sets):
        assert threads.close(timeout), f"{threads!r} did not end within {timeout}s"
    assert close_pools(timeout), "pooled connections still in use"


@pytest.fixture(autouse=True)
def _no_stray_bridge() -> Iterator[None]:
    """Each test starts and ends without the bridge's threads, request threads or pools.

    The pools are built from the settings on first use: a test that sets
    POOL_SIZE must not find the previous test's pool.
    """
    close_pools(10.0)
    yield
    reset_bridge_executor(wait=True)
    close_request_threads_and_pools()


@pytest.fixture
def main_thread_closed() -> Iterator[None]:
    """Start from zero server sessions: the test thread's own connections are
    closed, and sessions of earlier tests that the server is still tearing down
    are waited out, so a baseline taken next is exact."""
    connections.close_all()
    for alias in connections:
        wait_for_server_sessions(alias, 0)
    yield
    connections.close_all()


_T = TypeVar("_T")

# Session counts and thread joins are blocking calls: run them off the event
# loop (Django refuses database I/O on it), on a thread that is not a bridge
# worker, so it does not show up in the bridge's stats.
_off_loop = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-off-loop")


async def off_loop(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_off_loop, functools.partial(fn, *args, **kwargs))


async def sessions_become(expected: int | Callable[[int], bool], alias: str = "default") -> int:
    return await off_loop(wait_for_server_sessions, alias, expected, timeout=10.0)


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a polling deadline, not a cancel scope
    """Bounded polling on the event loop (it keeps serving requests meanwhile)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def bridge_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dbbridge")]


def backend_id(alias: str = "default") -> int:
    """The server's id for the calling thread's session (on SQLite: the object's id)."""
    conn = connections[alias]
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute("SELECT pg_backend_pid()")
        elif conn.vendor == "mysql":
            cursor.execute("SELECT CONNECTION_ID()")
        else:
            cursor.execute("SELECT 1")
            return id(conn.connection)
        return int(cursor.fetchone()[0])


def kill_backend(alias: str, backend: int) -> None:
    """End another session from the server side, and wait until it is gone."""
    conn = connections[alias]
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute("SELECT pg_terminate_backend(%s)", [backend])
            probe = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
        else:
            cursor.execute(f"KILL {int(backend)}")
            probe = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s"
        deadline = time.monotonic() + 10
        while True:
            cursor.execute(probe, [backend])
            if cursor.fetchone()[0] == 0:
                return
            assert time.monotonic() < deadline, f"backend {backend} still there after 10s"
            time.sleep(0.01)


@pytest.fixture
def gc_disabled() -> Iterator[None]:
    """Stranded wrappers sit in reference cycles; only the cyclic GC frees them.

    Whether a collection happens to run mid-test would decide how much of a
    leak is visible; with it off, the test sees what a long-running process
    accumulates between full collections — and the bridge must not rely on it.
    """
    gc.collect()
    gc.disable()
    yield
    gc.enable()
    with warnings.catch_warnings():
        # The drivers rightly complain that stranded connections were never closed.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def count_submits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every thread-sensitive call a request submits to its binding."""
    names: list[str] = []
    real = RequestBinding.submit

    def submit(self: RequestBinding, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        names.append(getattr(fn, "__qualname__", repr(fn)))
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(RequestBinding, "submit", submit)
    return names
