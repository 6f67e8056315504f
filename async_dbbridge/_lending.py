"""Lending pooled connections to threads the library does not start: a job at a time.

Task workers (Celery, Dramatiq, Huey, RQ) and Channels consumers run ORM work
on threads of their own framework. What a request gets from the ASGI wrapper,
a job on such a thread gets from three calls made on that thread:

* [`begin_job()`][async_dbbridge._lending.begin_job] before the job: the
  thread's wrappers take their connections from the alias's pool (one bounded
  pool per alias per process, shared with request threads and the bridge's
  executor), and an alias the bridge cannot pool (Django's own psycopg pool,
  `OPTIONS["pool"]`) is prepared as `request_started` would;
* [`end_job()`][async_dbbridge._lending.end_job] after it: a transaction left
  open is rolled back with a `TransactionLeftOpenWarning`; after a database
  error, or a job that was *interrupted* (a time limit, a worker shutting
  down: the driver may be mid-protocol), the connection is really closed;
  otherwise it goes back to the pool, reused under `CONN_MAX_AGE`;
* [`end_thread()`][async_dbbridge._lending.end_thread] when the thread ends:
  nothing of the pool may stay on a dead thread.

Forked children need nothing from here: `_fork` discards every inherited
connection (the pool's too) without network I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

from ._connections import (
    Policy,
    cleanup_after_call,
    close_all_for_exit,
    prepare_connections,
)
from ._executor import _cleanup_pooled
from ._pool import end_of_request, make_pooled

__all__ = ("begin_job", "end_job", "end_thread")

logger = logging.getLogger("async_dbbridge")

_REQUEST: Policy = Policy.request()
_CLOSE: Policy = Policy.always_close()


def _wrappers(databases: Iterable[str] | None) -> list[BaseDatabaseWrapper]:
    aliases = list(connections.settings) if databases is None else list(databases)
    return [connections[alias] for alias in aliases]


def _is_pooled(conn: BaseDatabaseWrapper) -> bool:
    return bool(getattr(conn, "_dbbridge_pooled", False))


def begin_job(databases: Iterable[str] | None = None) -> None:
    """On a worker's own thread, before a job: lend it pooled connections.

    The first call on a thread makes its wrappers pooled; a connection the
    thread opened before (outside any job, e.g. at worker start) is closed
    first, unless a caller's `atomic()` block holds it. Later calls cost a few
    attribute reads per alias.

    Args:
        databases: The aliases to handle; `None`: every alias in `DATABASES`.
    """
    unpooled: list[BaseDatabaseWrapper] = []
    for conn in _wrappers(databases):
        if _is_pooled(conn):
            continue
        if conn.in_atomic_block:
            # The caller's transaction (a job run eagerly inside atomic()):
            # its connection is the caller's business.
            continue
        if conn.vendor == "sqlite" and getattr(conn, "is_in_memory_db", lambda: False)():
            # Django never closes an in-memory database's connection (closing
            # would destroy the database): it keeps the thread's own.
            unpooled.append(conn)
            continue
        if conn.settings_dict.get("OPTIONS", {}).get("pool"):
            # Django's own psycopg pool: request-like handling gives a
            # connection back to it (close() returns it there), never closes it.
            unpooled.append(conn)
            continue
        if conn.connection is not None:
            conn.close()
        try:
            make_pooled(conn)
        except (ImproperlyConfigured, ValueError):
            logger.warning("database %r: its connections cannot be pooled", conn.alias)
            unpooled.append(conn)
    if unpooled:
        prepare_connections(conns=unpooled)


def end_job(
    error: BaseException | None,
    *,
    owner: Callable[..., object],
    interrupted: bool = False,
    databases: Iterable[str] | None = None,
) -> None:
    """On the same thread, after the job: give its connections back, or close them.

    Never raises for a cleanup problem (logged instead): the job's own outcome
    is what the framework must see. A `TransactionLeftOpenWarning` is raised
    through `warnings` (a filter may turn it into an error).

    Args:
        error: What the job raised, or `None`.
        owner: The job's function, named in warnings.
        interrupted: The job was stopped from outside (a time limit, a worker
            shutdown): its connections are closed, whatever `error` is.
        databases: As for `begin_job()`.
    """
    policy = _CLOSE if interrupted else _REQUEST
    conns = [conn for conn in _wrappers(databases) if conn.connection is not None]
    if not conns:
        return
    pooled = [conn for conn in conns if _is_pooled(conn)]
    unpooled = [conn for conn in conns if not _is_pooled(conn)]
    try:
        if pooled:
            _cleanup_pooled(policy, error=error, fn=owner, conns=pooled)
        if unpooled:
            cleanup_after_call(policy, error=error, fn=owner, conns=unpooled)
    except Exception as exc:
        if isinstance(exc, Warning) and error is None:
            raise
        logger.warning("connection cleanup after a job raised", exc_info=True)


def end_thread(databases: Iterable[str] | None = None) -> None:
    """When a worker thread ends: give back and close everything it holds."""
    for conn in _wrappers(databases):
        if _is_pooled(conn):
            try:
                end_of_request(conn)
            except Exception:
                logger.warning("giving %r back on thread exit failed", conn.alias, exc_info=True)
    close_all_for_exit(databases)
