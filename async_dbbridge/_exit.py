"""Process exit: close what lifespan shutdown did not, in one fixed order.

Lifespan shutdown (`DBBridgeASGIApp.aclose`) is where a server's worker
closes the library's threads and pooled connections. Not every server runs
it: Daphne has no lifespan at all, uvicorn and Hypercorn can be told
``--lifespan off``, and gunicorn's native ASGI worker leaves its loop on
SIGINT / SIGQUIT (``sys.exit`` from the signal handler) without it. The
process then still exits through the interpreter's normal path, and this
module's one `atexit` hook closes what is left: request threads first (they
give their connections back as their requests end), then the bridge's
workers, then the pools — so every connection is closed with the driver's
goodbye (PostgreSQL's Terminate, MariaDB's COM_QUIT) instead of dropped with
the process, which MariaDB logs as an aborted connection.

One hook, not one per module: `atexit` runs hooks in the reverse order of
their registration, which is the order in which modules happened to be
imported; the `ORDER_*` constants fix the sequence whatever that was. After
a clean lifespan shutdown every step finds nothing left and does nothing.

A process that ends with ``os._exit`` (a forked child of ``multiprocessing``'s
"fork" start method, a prefork pool's child) runs no `atexit` hook: such
children hold no connection of their parent (see ``_fork``), and their own are
the framework integrations' business.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Callable
from typing import Final

__all__ = ()

logger = logging.getLogger("async_dbbridge")

#: The order of the exit steps: threads that may hold connections first, the
#: pools that take them back last.
ORDER_REQUEST_THREADS: Final = 10
ORDER_EXECUTORS: Final = 20
ORDER_POOLS: Final = 30

_hooks: list[tuple[int, Callable[[], None]]] = []


def on_exit(hook: Callable[[], None], *, order: int) -> None:
    """Run `hook` at interpreter exit, in `order` (one of the `ORDER_*` constants).

    Modules register at import, so only what was imported runs.
    """
    _hooks.append((order, hook))
    _hooks.sort(key=lambda item: item[0])


def run_exit_hooks() -> None:
    """Every registered hook in order; one failing does not stop the next."""
    for _order, hook in list(_hooks):
        try:
            hook()
        except Exception:
            # At exit nobody can catch it: say which step failed, then go on,
            # so the pools are still closed when a thread step failed.
            logger.warning("async_dbbridge: exit step %r failed", hook, exc_info=True)


atexit.register(run_exit_hooks)
