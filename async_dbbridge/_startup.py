"""What the ASGI wrapper says when it starts: the startup line, and one look at the server.

The startup line is INFO on the `async_dbbridge` logger. A project that never
configured logging has no handler for it, and Python's last-resort handler
prints only warnings, so the one line that confirms the wrapper is serving
would vanish: then it goes to stderr, as uvicorn's own startup lines do.

The look at the server: a pool the server cannot hold (`POOL_SIZE` above
`max_connections` minus the reserved slots) starts without complaint and
fails much later, under load, when the server refuses connections. At start,
one query per alias on a connection of its own, on a thread of its own (never
the event loop), reads the server's limit and logs a warning when the pool
cannot fit; once per alias per process, since every worker of a server
shares the answer's cause.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Final

from django.db import connections

from ._completions import deliver

__all__ = ("announce", "check_server_limits", "join_probes")

logger = logging.getLogger("async_dbbridge")

#: Seconds a lifespan startup (or the first request without lifespan) waits
#: for the look at the server before it goes on without the answer.
PROBE_WAIT: Final = 1.0

_probed: set[str] = set()
_probes: list[threading.Thread] = []
_lock = threading.Lock()


def announce(level: int, message: str, *args: object) -> None:
    """Log `message`, or print it to stderr when no handler would ever show it."""
    if logger.hasHandlers():
        logger.log(level, message, *args)
    else:
        print(message % args, file=sys.stderr, flush=True)


def check_server_limits(
    aliases: Sequence[str], pool_size: int, loop: asyncio.AbstractEventLoop
) -> asyncio.Future[None] | None:
    """Start the look at each server not looked at yet; a future done when it is over.

    `None` when there is nothing to look at (every alias seen already, or
    none on a server with a connection limit).
    """
    with _lock:
        todo = [
            alias
            for alias in aliases
            if alias not in _probed
            and alias in connections.settings
            # No thread for a file database; any other backend is asked for its
            # vendor on the thread (server_limits() knows PostgreSQL and MySQL).
            and "sqlite" not in connections.settings[alias]["ENGINE"]
        ]
        _probed.update(todo)
    if not todo:
        return None
    done: asyncio.Future[None] = loop.create_future()

    def probe() -> None:
        try:
            for alias in todo:
                _check_alias(alias, pool_size)
        finally:
            try:
                loop.call_soon_threadsafe(deliver, done, None, None)
            except RuntimeError:
                pass  # the loop has ended: nobody waits

    thread = threading.Thread(target=probe, name="dbbridge-server-limits", daemon=True)
    with _lock:
        _probes[:] = [t for t in _probes if t.is_alive()]
        _probes.append(thread)
    thread.start()
    return done


async def wait_for(done: asyncio.Future[None] | None) -> None:
    """Wait for the look at the servers, at most `PROBE_WAIT` seconds."""
    if done is None:
        return
    try:
        await asyncio.wait_for(asyncio.shield(done), PROBE_WAIT)
    except TimeoutError:
        pass  # a slow or unreachable server: the thread logs when it answers


def join_probes(timeout: float | None) -> bool:
    """Wait for the look at the servers to end (shutdown: its connection is closed by then)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _lock:
        probes = list(_probes)
    for thread in probes:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in probes)


def _check_alias(alias: str, pool_size: int) -> None:
    from ._deployment import look, processes
    from .conf import get_settings

    parsed = get_settings()
    # A wrapper of its own, outside Django's per-thread registry and the pool:
    # opened here, closed here, whatever happens.
    conn = connections.create_connection(alias)
    try:
        endpoint = look(conn, parsed.poolers.get(alias))
    except Exception as exc:
        # The server may be starting or unreachable: requests will say so
        # soon enough; this look is only advice.
        logger.debug("async_dbbridge: could not read max_connections of %r: %s", alias, exc)
        return
    finally:
        try:
            conn.close()
        except Exception:
            logger.debug("async_dbbridge: closing the server-limit probe failed", exc_info=True)
    if endpoint is None:
        return
    # Behind a pooler the processes are its clients: its max_client_conn is
    # their limit (None when its admin console would not say), not the
    # server's max_connections, which only PgBouncer's server pool meets.
    limit, where = endpoint.limit()
    if limit is None:
        return
    try:
        procs = processes(parsed)
    except ValueError:
        procs = None  # `check --deploy` says so; count this process alone
    sessions = pool_size if procs is None else procs.total * pool_size
    if sessions > limit:
        logger.warning(
            "async_dbbridge: %s for database %r is more than %s accepts (%d connections at "
            "most, %d for every client together). Once it is full it refuses new connections "
            "and requests get 503s; lower ASYNC_DBBRIDGE['POOL_SIZE'] so that processes x "
            "POOL_SIZE fits, or raise the limit.",
            f"POOL_SIZE={pool_size}"
            if procs is None or procs.total == 1
            else f"{procs.total} processes x POOL_SIZE={pool_size}",
            alias,
            where,
            sessions,
            limit,
        )


def _reset_for_tests() -> None:
    with _lock:
        _probed.clear()
