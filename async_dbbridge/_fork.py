"""Fork safety: a forked child never touches the parent's database sessions.

A child made by ``os.fork()`` — directly, through ``multiprocessing``'s "fork"
start method, gunicorn ``--preload``, a prefork task pool — inherits every open
socket of the parent, among them the database connections of *every* thread.
Two processes talking on one socket corrupt both sessions, and a clean close in
the child sends Terminate / COM_QUIT and ends the *parent's* session. So the
child forgets them all without network I/O, and every `DBExecutor`
starts afresh with no threads (its first call in the child starts a worker).

Two facts about CPython and the drivers shape this module (observed on CPython
3.11 and 3.13; the 3.14 sources clear thread states after fork the same way):

* Before any ``after_in_child`` hook runs, the interpreter has already cleared
  the thread state of every thread but the forking one, and with it that
  thread's ``threading.local`` storage — Django's per-thread connection
  wrappers. A wrapper sits in reference cycles (with its ``ops``,
  ``features``...), so the child's next full garbage collection frees it and
  its driver connection. mysqlclient's finalizer does not check the pid: it
  sends COM_QUIT on the shared socket and the parent's session dies. (psycopg's
  does check, and sends nothing in a child.) Hence the ``before`` hook: in the
  parent, it takes strong references to every wrapper with an open connection,
  so they survive into the child until they have been discarded. Executor
  workers also keep their wrappers (``_Worker.wrappers``).
* A discarded connection must stay alive for the rest of the child's life: its
  descriptor is pointed at ``/dev/null`` (so whatever the driver writes when it
  is finally freed goes nowhere), and keeping the object means the descriptor
  number is never reused for a new socket that such a late write could hit.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ._affinity import _reset_after_fork as _reset_affinity
from ._completions import _reset_after_fork as _reset_completions
from ._connections import (
    _INHERITED,
    discard_inherited,
    forget_wrappers,
    initialized_connections,
    open_wrappers,
)

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ()

logger = logging.getLogger("async_dbbridge")

# Strong references taken just before fork() (see the module docstring).
_held: list[BaseDatabaseWrapper] = []

#: The order in which modules' child hooks run, after the inherited wrappers
#: were discarded: executors' workers (their wrappers are discarded with them),
#: then request threads, then the pools (whose checked-out connections went
#: with the wrappers; their idle ones are discarded last).
ORDER_EXECUTORS: Final = 10
ORDER_REQUEST_THREADS: Final = 20
ORDER_POOLS: Final = 30

_child_hooks: list[tuple[int, Callable[[], None]]] = []


def on_child(hook: Callable[[], None], *, order: int) -> None:
    """Run `hook` in a forked child, after the inherited connections were discarded.

    Modules register at import (so only what was imported runs); `order`
    (one of the `ORDER_*` constants) fixes the sequence whatever the import
    order was.
    """
    _child_hooks.append((order, hook))
    _child_hooks.sort(key=lambda item: item[0])


def _discard_pools() -> int:
    """Forget Django's class-level psycopg pools (Django >= 5.1) and their connections.

    The pool's threads do not exist in the child and its idle connections are
    the parent's sessions; the next use builds a fresh pool here. Only looked
    up if the PostgreSQL backend is already imported: importing it without
    psycopg installed raises.
    """
    module = sys.modules.get("django.db.backends.postgresql.base")
    wrapper_class = getattr(module, "DatabaseWrapper", None)
    pools = getattr(wrapper_class, "_connection_pools", None)
    if not isinstance(pools, dict) or not pools:
        return 0
    count = len(pools)
    # Kept, never closed or freed: closing would join threads that do not exist
    # here and close the idle connections, which are the parent's sessions.
    # (psycopg never says goodbye from a process that did not open the
    # connection, so keeping them is enough.) Connections checked out belong
    # to wrappers and are discarded with them.
    _INHERITED.extend(pools.values())
    pools.clear()
    return count


def _before_fork() -> None:
    global _held
    _held = open_wrappers()


def _after_fork_in_parent() -> None:
    global _held
    _held = []


def _after_fork_in_child() -> None:
    global _held
    # First, and outside the try below: neither touches Django (a child of a
    # process without settings must reset them too), and neither can fail.
    # The parent's loops do not run here; its CPU lock stays the parent's.
    _reset_completions()
    _reset_affinity()
    forget_wrappers()
    held, _held = _held, []
    discarded = 0
    try:
        # The forking thread's own wrappers survive the fork in its thread
        # locals (and may predate the tracking); the other threads' are in held.
        wrappers = {id(conn): conn for conn in held}
        wrappers.update((id(conn), conn) for conn in initialized_connections())
        for conn in wrappers.values():
            if conn.connection is not None:
                discarded += 1
            discard_inherited(conn)
        pooled = _discard_pools()
        for _order, hook in list(_child_hooks):
            hook()
    except Exception:
        # An exception here would be printed and ignored by os.fork(); say
        # what failed instead, through the library's logger.
        logger.exception("discarding inherited database connections after fork() failed")
        return
    logger.debug(
        "forked child %d: discarded %d inherited connection(s) and %d connection pool(s)",
        os.getpid(),
        discarded,
        pooled,
    )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
