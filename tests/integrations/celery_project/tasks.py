"""The tasks: each names the worker process and the server session that ran it.

A session is named ``<pid>@<backend start>`` on PostgreSQL (backend pids are
reused) and by its ``CONNECTION_ID()`` on MariaDB. The tasks that end badly
write a row first (in autocommit, so it stays), naming where they ran.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import shared_task
from django.db import connection, transaction

from tests.testapp.models import Item


def session_id() -> str:
    """The server's name for the calling thread's session on ``default``."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT pid || '@' || backend_start FROM pg_stat_activity "
                "WHERE pid = pg_backend_pid()"
            )
        else:
            cursor.execute("SELECT CONNECTION_ID()")
        row = cursor.fetchone()
    return str(row[0])


@shared_task(name="probe")
def probe(n: int, hold: float = 0.0) -> dict[str, Any]:
    """A short ORM task that reports the state of the connection it was given.

    ``hold``: seconds it keeps its process busy after its queries, so that a
    batch sent at once spreads over every process of a prefork pool.
    """
    report = {
        "n": n,
        "started": time.monotonic(),  # one clock for every process of the machine
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "session": session_id(),
        "left_open_rows": Item.objects.filter(name__startswith="left-open").count(),
        "autocommit": connection.get_autocommit(),
        "in_atomic_block": connection.in_atomic_block,
    }
    if hold:
        time.sleep(hold)
    return report


def _mark(kind: str) -> None:
    Item.objects.create(name=f"{kind}:{os.getpid()}:{session_id()}")


@shared_task(name="fail_with_database_error")
def fail_with_database_error() -> None:
    _mark("error")
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM no_such_table_dbbridge")


@shared_task(name="leave_transaction_open")
def leave_transaction_open() -> None:
    _mark("marker")
    transaction.atomic().__enter__()
    Item.objects.create(name=f"left-open:{os.getpid()}")


@shared_task(name="slow_query")
def slow_query(seconds: float) -> None:
    """Sent with a soft time limit shorter than the query: interrupted mid-query."""
    _mark("slow")
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_sleep(%s)", [seconds])
        else:
            cursor.execute("SELECT SLEEP(%s)", [seconds])
