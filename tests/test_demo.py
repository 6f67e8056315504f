"""The demo project, served by uvicorn through the wrapper, on the suite's backend."""

from __future__ import annotations

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
def test_demo_serves_every_view_and_leaves_no_session(demo_database_url: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    if demo_database_url:
        env["DATABASE_URL"] = demo_database_url
    result = subprocess.run(
        [sys.executable, str(ROOT / "demo_asgi" / "smoke_test.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
