"""The tasks the workers run, free of any task framework (each project wraps them).

Every task writes one row naming the worker process and the server session
that ran it (``"<pid>:<backend id>"``), so that the test counts sessions used
and tasks done from the rows, on PostgreSQL and MariaDB alike. Every task run
through `journaled` also appends its outcome to the journal file the test
names (``DBBRIDGE_WORKER_JOURNAL``): a task that failed is seen at once, and a
task whose row is missing although it said "ok" wrote into a transaction that
was never committed.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import ParamSpec

from django.db import connection, transaction

from tests.testapp.models import Item

P = ParamSpec("P")


def journaled(fn: Callable[P, None]) -> Callable[P, None]:
    """``fn`` that appends "<name> <first argument> <ok | exception class>" to the journal."""

    @functools.wraps(fn)
    def task(*args: P.args, **kwargs: P.kwargs) -> None:
        outcome = "ok"
        try:
            fn(*args, **kwargs)
        except BaseException as exc:
            outcome = type(exc).__name__
            raise
        finally:
            line = f"{fn.__name__} {args[0] if args else '-'} {outcome}\n".encode()
            # One write() of a short line in append mode: lines of concurrent
            # tasks (threads, processes) never interleave.
            fd = os.open(os.environ["DBBRIDGE_WORKER_JOURNAL"], os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    return task


def backend_id() -> int:
    """The server's id of the calling thread's session."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_backend_pid()")
        else:
            cursor.execute("SELECT CONNECTION_ID()")
        row = cursor.fetchone()
    return int(row[0])


def record(n: int, kind: str = "task") -> None:
    """A short ORM task."""
    Item.objects.create(name=f"{kind}:{os.getpid()}:{backend_id()}", value=n)


def record_slowly(n: int) -> None:
    """`record` after 20 ms of sleep: while a thread sleeps the next message goes
    to another, so every worker thread runs tasks (and, under a framework's own
    handling, holds a session) however busy the machine is."""
    time.sleep(0.02)
    record(n)


def fail_with_database_error(n: int) -> None:
    """Writes its row (autocommit), then fails with a database error."""
    record(n, "error")
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM no_such_table_dbbridge")


def leave_transaction_open(n: int) -> None:
    """Starts a transaction, writes in it, and returns without ending it."""
    transaction.atomic().__enter__()
    record(n, "left-open")


def parent_session() -> None:
    """In a worker's parent process: hold a session (a fork must not end it)."""
    record(-1, "parent")
