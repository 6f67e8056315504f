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
    # requests run at the top, the lanes' figures only under "lanes", the
    # bridge's (its connection policy by that name) only under "bridge".
    stats = json.loads(stats_json.read_text())
    assert set(stats) == {
        "request_mode",
        "lanes",
        "bridge",
        "server_sessions",
        "process_connections",
        "vendors",
        "time",
    }
    assert stats["request_mode"] == "lanes"
    bridge, lanes = stats["bridge"], stats["lanes"]
    assert not {"lanes", "lanes_in_use", "request_mode", "policy"} & set(bridge)
    assert bridge["connection_policy"] == "request"
    assert bridge["max_workers"] == 8  # the demo's MAX_WORKERS
    # db_call, @db_sync_to_async, the orders (GET and POST): calls on the bridge.
    assert bridge["calls"] >= 4
    assert lanes["size"] == 8  # LANES defaults to MAX_WORKERS
    assert lanes["lane_full"] == "wait"
    assert not {"lanes", "full", "requests", "closing"} & set(lanes)
    # The sync view and the async ORM ran on lanes.
    assert lanes["requests_served"] >= 2
    assert lanes["threads"] >= 1
    assert stats["vendors"]["default"] == connections["default"].vendor
