"""The process-wide bridge shared by several event loops, against the real database.

Scenarios that deadlocked before the per-loop default executor run in a
subprocess: a deadlock there is killed after a timeout and fails the test,
instead of hanging this process (its exit would join the stuck threads).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from async_dbbridge import (
    DBExecutor,
    db_call,
    get_bridge_executor,
    install_default_executor,
    reset_bridge_executor,
)
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import SetSetting, backend_id, off_loop, sessions_become
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

ROOT = Path(__file__).resolve().parent.parent

# Generous: the machine may be busy; a scenario that works takes a second or two.
SCENARIO_TIMEOUT = 90.0


def thread_name() -> str:
    return threading.current_thread().name


# -- loops in threads, one after another ------------------------------------------


async def test_a_loop_ending_in_another_thread_leaves_the_bridge_to_this_loop(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60)
    baseline = await off_loop(server_session_count)
    bridge = install_default_executor()
    first = await db_call(backend_id)  # a worker connects, and keeps it (CONN_MAX_AGE)
    await sessions_become(baseline + 1)
    opened = bridge.stats().connections_opened["default"]

    def other_loop() -> int:
        async def main() -> int:
            install_default_executor()
            return await asyncio.to_thread(Item.objects.count)

        return asyncio.run(main())

    assert await asyncio.wait_for(off_loop(other_loop), SCENARIO_TIMEOUT) == 0

    # The other loop's end left the bridge, its worker and its session alone.
    assert get_bridge_executor() is bridge
    assert not bridge.stats().shutdown
    assert await off_loop(server_session_count) == baseline + 1
    loop = asyncio.get_running_loop()
    assert await db_call(backend_id) == first
    assert (await asyncio.to_thread(thread_name)).startswith("dbbridge-")
    assert (await loop.run_in_executor(None, thread_name)).startswith("dbbridge-")
    assert (await sync_to_async(thread_name, thread_sensitive=False)()).startswith("dbbridge-")
    assert bridge.stats().connections_opened["default"] == opened


def test_loops_one_after_another_share_the_bridge_and_its_connection(
    db_settings: SetSetting,
) -> None:
    """What pytest-asyncio's per-test loops do: each ends; the bridge stays warm."""
    db_settings(CONN_MAX_AGE=60)
    baseline = server_session_count()

    async def main() -> tuple[DBExecutor, int]:
        bridge = install_default_executor()
        return bridge, await asyncio.to_thread(backend_id)

    first_bridge, first_session = asyncio.run(main())
    assert server_session_count() == baseline + 1  # still open after the loop ended
    opened = first_bridge.stats().connections_opened["default"]
    second_bridge, second_session = asyncio.run(main())
    assert second_bridge is first_bridge
    assert second_session == first_session
    assert first_bridge.stats().connections_opened["default"] == opened  # reused
    reset_bridge_executor(wait=True)  # the explicit close closes it
    wait_for_server_sessions("default", baseline)


async def test_a_loop_ending_does_not_wait_for_another_loops_calls() -> None:
    """Only what the ending loop submitted is waited for."""
    install_default_executor()
    release = threading.Event()
    started = threading.Barrier(3, timeout=SCENARIO_TIMEOUT)

    def held() -> bool:
        started.wait()
        # Longer than the test waits for the other loop: its failure is the
        # one reported.
        return release.wait(2 * SCENARIO_TIMEOUT)

    holding = asyncio.ensure_future(db_call(held))
    held_too = asyncio.ensure_future(asyncio.to_thread(held))

    def other_loop() -> str:
        async def main() -> str:
            install_default_executor()
            return await asyncio.to_thread(thread_name)

        return asyncio.run(main())

    try:
        await off_loop(started.wait)
        # Bounded: before, this ended by shutting the whole bridge down, which
        # waits for every worker, the two held ones included.
        name = await asyncio.wait_for(off_loop(other_loop), SCENARIO_TIMEOUT)
        assert name.startswith("dbbridge-")
        assert not holding.done()
        assert not held_too.done()
    finally:
        release.set()
        outcomes = await asyncio.gather(holding, held_too, return_exceptions=True)
    assert list(outcomes) == [True, True]


# -- reset_bridge_executor() ---------------------------------------------------------


async def test_after_reset_bridge_executor_the_loop_runs_on_a_new_bridge(
    db_settings: SetSetting,
) -> None:
    db_settings(CONN_MAX_AGE=60)
    baseline = await off_loop(server_session_count)
    old = install_default_executor()
    assert await db_call(Item.objects.count) == 0
    await sessions_become(baseline + 1)

    await off_loop(reset_bridge_executor)  # waits for the workers: off the loop
    assert old.stats().shutdown
    await sessions_become(baseline)

    loop = asyncio.get_running_loop()
    names = [
        await db_call(thread_name),
        await asyncio.to_thread(thread_name),
        await loop.run_in_executor(None, thread_name),
        await sync_to_async(thread_name, thread_sensitive=False)(),
    ]
    assert all(name.startswith("dbbridge-") for name in names), names
    new = get_bridge_executor()
    assert new is not old
    assert new.stats().calls == 4
    # install_default_executor() is idempotent, and names the bridge in use.
    assert install_default_executor() is new
    assert await db_call(Item.objects.count) == 0
    await sessions_become(baseline + 1)


async def test_an_async_test_goes_on_after_the_leak_fixtures_check(
    dbbridge_no_leaks: Any,
) -> None:
    install_default_executor()
    assert await db_call(Item.objects.count) == 0
    await off_loop(dbbridge_no_leaks)  # resets the bridge
    assert await db_call(Item.objects.count) == 0
    assert await asyncio.to_thread(Item.objects.count) == 0


# -- an executor of the caller's -------------------------------------------------------


async def test_an_executor_of_the_callers_serves_every_loop_it_is_installed_on(
    db_settings: SetSetting,
) -> None:
    """The loop that installed it last shuts it down; earlier ends leave it alone."""
    db_settings(CONN_MAX_AGE=60)
    baseline = await off_loop(server_session_count)
    executor = DBExecutor(max_workers=2, thread_name_prefix="mine")
    try:
        assert install_default_executor(executor) is executor
        assert await db_call(Item.objects.count) == 0
        await sessions_become(baseline + 1)

        def other_loop() -> str:
            async def main() -> str:
                assert install_default_executor(executor) is executor
                return await asyncio.to_thread(thread_name)

            return asyncio.run(main())

        assert (await asyncio.wait_for(off_loop(other_loop), SCENARIO_TIMEOUT)).startswith("mine-")
        assert not executor.stats().shutdown
        assert (await asyncio.to_thread(thread_name)).startswith("mine-")
        assert await db_call(Item.objects.count) == 0
        await sessions_become(baseline + 1)
    finally:
        await off_loop(executor.shutdown)
    await sessions_become(baseline)


# -- a loop run inside a bridge call (these deadlocked) ------------------------------


def run_scenario(body: str) -> Any:
    """Run ``body`` in a fresh interpreter set up on this test's databases.

    ``body`` is the inside of a function returning something JSON-serialisable.
    Fails the test if the interpreter does not finish within the timeout (a
    deadlock) or does not exit cleanly.
    """
    databases = {alias: dict(connections[alias].settings_dict) for alias in connections}
    script = "\n".join(
        [
            "import asyncio, json, os, sys, threading",
            "import django",
            "from django.conf import settings",
            "from tests.e2e_project.settings import OVERRIDES",
            "settings.configure(",
            "    DATABASES=json.loads(os.environ['DBBRIDGE_SCENARIO_DATABASES']),",
            "    INSTALLED_APPS=['async_dbbridge', 'tests.testapp'],",
            "    SECRET_KEY='tests-only', USE_TZ=True,",
            "    DEFAULT_AUTO_FIELD='django.db.models.BigAutoField',",
            "    ASYNC_DBBRIDGE={'MAX_WORKERS': 4, 'POOL_SIZE': 2}, **OVERRIDES,",
            ")",
            "django.setup()",
            "def scenario():",
            textwrap.indent(textwrap.dedent(body), "    "),
            "print(json.dumps(scenario()))",
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = str(ROOT)
    env["DBBRIDGE_SCENARIO_DATABASES"] = json.dumps(databases)
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=SCENARIO_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the scenario hung (killed after {SCENARIO_TIMEOUT}s); stderr: {exc.stderr!r}")
    assert done.returncode == 0, done.stderr
    # Nothing but the wrapper's startup line (stderr: the scenario configures no logging).
    stray = [
        line for line in done.stderr.splitlines() if not line.startswith("async_dbbridge started (")
    ]
    assert stray == []
    return json.loads(done.stdout)


def test_asyncio_run_inside_a_bridge_call_installing_the_bridge_ends() -> None:
    Item.objects.create(name="seen")
    result = run_scenario(
        """
        from async_dbbridge import db_call, install_default_executor
        from tests.testapp.models import Item

        async def inner():
            install_default_executor()
            return await asyncio.to_thread(Item.objects.count)

        async def main():
            bridge = install_default_executor()
            # The inner loop runs on a bridge worker; its end used to join
            # every bridge worker, that one included.
            nested = await asyncio.to_thread(lambda: asyncio.run(inner()))
            loop = asyncio.get_running_loop()
            after = [
                await asyncio.to_thread(Item.objects.count),
                await loop.run_in_executor(None, Item.objects.count),
                await db_call(Item.objects.count),
            ]
            return nested, after, bridge.stats().shutdown

        return asyncio.run(main())
        """
    )
    assert result == [1, [1, 1, 1], False]


def test_async_to_sync_of_the_asgi_app_inside_db_call_ends() -> None:
    """The wrapper installs the bridge on asgiref's new loop, run from a bridge worker."""
    result = run_scenario(
        """
        from asgiref.sync import async_to_sync
        from django.core.handlers.asgi import ASGIHandler
        from async_dbbridge import db_call, get_bridge_executor
        from async_dbbridge.asgi import DBBridgeASGIApp
        from tests.e2e_project.driver import call_http

        app = DBBridgeASGIApp(ASGIHandler())

        async def main():
            response = await db_call(lambda: async_to_sync(call_http)(app, "/db-call/"))
            # This loop still has the bridge: the inner loop's end left it.
            again = await db_call(lambda: async_to_sync(call_http)(app, "/db-call/"))
            return response.status, response.json()["count"], again.status, (
                get_bridge_executor().stats().shutdown
            )

        return asyncio.run(main())
        """
    )
    assert result == [200, 0, 200, False]


def test_asyncio_run_inside_a_call_of_the_executor_it_installs_ends() -> None:
    """The loop is the executor's only one: its end shuts it down, sparing the
    worker the loop runs on (which waits for that very shutdown)."""
    result = run_scenario(
        """
        from async_dbbridge import DBExecutor, install_default_executor
        from tests.testapp.models import Item

        executor = DBExecutor(max_workers=2)

        async def main():
            install_default_executor(executor)
            return await asyncio.to_thread(Item.objects.count)

        count = executor.submit(asyncio.run, main()).result()
        stats = executor.stats()
        return count, stats.shutdown, stats.connections_opened.get("default", 0)
        """
    )
    count, shutdown, opened = result
    assert (count, shutdown) == (0, True)
    assert opened >= 1  # the loop's call really connected


def test_a_loop_inside_a_call_of_an_executor_installed_on_the_outer_loop_ends() -> None:
    result = run_scenario(
        """
        from async_dbbridge import DBExecutor, db_call, install_default_executor
        from tests.testapp.models import Item

        executor = DBExecutor(max_workers=2)

        async def inner():
            install_default_executor(executor)
            return await asyncio.to_thread(Item.objects.count)

        async def main():
            install_default_executor(executor)
            nested = await asyncio.to_thread(lambda: asyncio.run(inner()))
            # The inner loop's end left the executor to this loop.
            return nested, await db_call(Item.objects.count), executor.stats().shutdown

        nested, after, shut_during = asyncio.run(main())
        # This loop was the last one using it: its end shut it down.
        stats = executor.stats()
        return nested, after, shut_during, stats.shutdown, stats.open_connections
        """
    )
    assert result == [0, 0, False, True, 0]
