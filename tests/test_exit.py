"""Process exit: the one exit hook closes what lifespan shutdown did not, in a fixed order."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection

from async_dbbridge import _exit

ROOT = Path(__file__).resolve().parent.parent

#: A process that serves one bridge call on a pooled connection, prints the
#: server's id for that session, and ends without closing anything itself.
SCRIPT = """\
import asyncio, logging, os, sys
logging.basicConfig(level=logging.INFO)
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
from django.conf import settings
settings.DATABASES["default"]["NAME"] = sys.argv[1]
# Pooled connections stay open between calls, as in production.
settings.DATABASES["default"]["CONN_MAX_AGE"] = 60
import django
django.setup()
from django.db import connection
from async_dbbridge import db_call

def session_id():
    pg = connection.vendor == "postgresql"
    sql = "SELECT pg_backend_pid()" if pg else "SELECT CONNECTION_ID()"
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]

print(asyncio.run(db_call(session_id)), flush=True)
if sys.argv[2] == "os._exit":
    os._exit(0)  # the control: no exit hook runs
"""


def test_hooks_run_in_their_order_and_one_failing_does_not_stop_the_next(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_exit, "_hooks", [])
    ran: list[str] = []

    def failing() -> None:
        ran.append("executors")
        raise RuntimeError("boom")

    # Registered in the reverse of the order they must run in.
    _exit.on_exit(lambda: ran.append("pools"), order=_exit.ORDER_POOLS)
    _exit.on_exit(failing, order=_exit.ORDER_EXECUTORS)
    _exit.on_exit(lambda: ran.append("request threads"), order=_exit.ORDER_REQUEST_THREADS)
    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        _exit.run_exit_hooks()
    assert ran == ["request threads", "executors", "pools"]
    assert "exit step" in caplog.text
    assert "boom" in caplog.text


def _session_open(session_id: int, timeout: float = 10.0) -> bool:
    """Whether the server still has the session after `timeout` s of bounded polling."""
    deadline = time.monotonic() + timeout
    while _session_listed(session_id):
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)
    return False


def _session_listed(session_id: int) -> bool:
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
        if connection.vendor == "postgresql"
        else "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [session_id])
        return bool(cursor.fetchone()[0])


def _mariadb_error_log() -> Path:
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@log_error, @@datadir")
        path, datadir = cursor.fetchone()
    return Path(path) if os.path.isabs(path) else Path(datadir) / path


def _run(ending: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(connection.settings_dict["NAME"]), ending],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout.strip()), done.stderr


@pytest.mark.requires_server
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("ending", ["normal exit", "os._exit"])
def test_a_process_without_lifespan_closes_its_pooled_connections_at_exit(ending: str) -> None:
    log = _mariadb_error_log() if connection.vendor == "mysql" else None
    offset = log.stat().st_size if log is not None else 0
    session_id, stderr = _run(ending)
    # The session really existed (the child read its id from the server), and it is gone.
    assert session_id > 0
    assert not _session_open(session_id)
    closed_line = "closed 1 pooled connection(s) at process exit"
    if ending == "normal exit":
        assert closed_line in stderr, stderr
    else:
        assert closed_line not in stderr, stderr
    if log is None:
        return
    with log.open("rb") as text:
        text.seek(offset)
        lines = text.read().decode(errors="replace").splitlines()
    aborted = [line for line in lines if f"Aborted connection {session_id} " in line]
    # Closed with COM_QUIT: nothing logged. Dropped with the process (the control): logged.
    assert len(aborted) == (0 if ending == "normal exit" else 1), aborted
