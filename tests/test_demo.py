"""The demo project, served by uvicorn through the wrapper, on the suite's backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connections

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_database_url() -> Iterator[str | None]:
    """A database of the demo's own next to the suite's: created by the smoke
    run, dropped here (SQLite: a temporary file the smoke run removes)."""
    vendor = connections["default"].vendor
    if vendor == "sqlite":
        yield None
        return
    name = f"dbbridge_demo_{os.getpid()}"
    if vendor == "postgresql":
        yield f"postgres://postgres@127.0.0.1:5432/{name}"
    else:
        yield f"mysql://root@127.0.0.1:3306/{name}"
    with connections["default"]._nodb_cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")


@pytest.mark.django_db(transaction=True)
def test_demo_serves_every_view_and_leaves_no_session(
    demo_database_url: str | None, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    # This checkout's package, not whichever one the environment has installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if demo_database_url:
        env["DATABASE_URL"] = demo_database_url
    stats_json = tmp_path / "stats.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "demo_asgi" / "smoke_test.py"),
            "--stats-json",
            str(stats_json),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # /stats says each thing once, under names that say what they are: how
    # requests run at the top, the request threads' figures under
    # "request_threads", each alias's pool under "pools", the bridge's threads
    # and calls (its connection policy by that name) under "bridge".
    stats = json.loads(stats_json.read_text())
    assert set(stats) == {
        "request_mode",
        "request_threads",
        "pools",
        "bridge",
        "server_sessions",
        "process_connections",
        "vendors",
        "time",
    }
    assert stats["request_mode"] == "request-threads"
    bridge, threads, pools = stats["bridge"], stats["request_threads"], stats["pools"]
    assert bridge["connection_policy"] == "request"
    assert bridge["max_workers"] == 8  # the demo's MAX_WORKERS
    # Connection figures are the pools', shown once: not under "bridge".
    assert not {"connections_open", "connections_opened", "policy"} & set(bridge)
    # db_call, @db_sync_to_async, the orders (GET and POST): calls on the bridge.
    assert bridge["calls"] >= 4
    # The refused order (404) was an answer of the view, not a failed call.
    assert bridge["errors"] == 0
    # The sync view and the async ORM ran on request threads.
    assert set(threads) == {"busy", "idle", "started", "retired", "closing"}
    assert threads["started"] >= 1
    assert threads["busy"] + threads["idle"] >= 1
    # One pool for the default alias, of the demo's POOL_SIZE.
    pool = pools["default"]
    assert pool["max_size"] == 4
    assert pool["opened"] >= 1
    assert pool["checkouts"] >= 4
    assert pool["in_use"] + pool["idle"] <= pool["max_size"]
    assert pool["timeouts"] == 0
    assert stats["vendors"]["default"] == connections["default"].vendor
