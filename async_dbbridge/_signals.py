"""Without lifespan: drain the pools when the server is told to stop.

With no lifespan shutdown (uvicorn ``--lifespan off``, Daphne), nothing tells
the app that its server is stopping. Most servers then exit through the
interpreter's normal path, where ``_exit``'s hook closes the pools. uvicorn
does not: after its graceful shutdown it restores the signal handlers it
found and raises the signal again, whose default action (SIGTERM) kills the
worker before any exit hook runs, and every pooled connection is dropped
(MariaDB logs each as an aborted connection).

So, only when the wrapper was started without lifespan, and only on the main
thread (the only one where handlers can be set), its SIGTERM and SIGINT
handlers are chained: the server's own handler still runs, unchanged, and the
pools are drained on the serving loop — idle connections closed at once, the
rest as requests give them back, while requests go on being served (a
connection still opens when needed). By the time the server has waited for
its requests, every connection was closed with the driver's goodbye. Only a
handler the server set (a Python callable) is chained: a signal left to its
default action or ignored is left alone, and a server that restores its
previous handlers removes ours with its own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

from ._lending import drain_pools

__all__ = ()

logger = logging.getLogger("async_dbbridge")

#: The signals servers stop on.
SHUTDOWN_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[int, FrameType | None], Any]


def drain_pools_on_shutdown_signals(loop: asyncio.AbstractEventLoop) -> list[str]:
    """Chain the server's SIGTERM / SIGINT handlers with a drain of the pools on `loop`.

    Returns the names of the signals chained (none off the main thread, or
    where no server handler is set). Idempotent: a chained handler is not
    chained again.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    chained = []
    for signum in SHUTDOWN_SIGNALS:
        previous = signal.getsignal(signum)
        # SIG_DFL / SIG_IGN / None (set outside Python) are not callables.
        if not callable(previous) or getattr(previous, "_dbbridge_drains", False):
            continue
        signal.signal(signum, _chained(previous, loop))
        chained.append(signum.name)
    return chained


def _chained(previous: Handler, loop: asyncio.AbstractEventLoop) -> Handler:
    # Weak: a process-lifetime handler must not keep a finished loop alive.
    loop_ref = weakref.ref(loop)

    def handler(signum: int, frame: FrameType | None) -> Any:
        serving = loop_ref()
        if serving is not None:
            try:
                # On the loop, not here: a signal handler runs between two
                # bytecodes of the main thread, which may hold a pool's lock.
                # The callback runs before the server's next look at its
                # exit flag.
                serving.call_soon_threadsafe(_drain, signum)
            except RuntimeError:
                pass  # the loop is closed: the exit hook is all that is left
        return previous(signum, frame)

    handler._dbbridge_drains = True  # type: ignore[attr-defined]
    return handler


def _drain(signum: int) -> None:
    closed = drain_pools()
    logger.info(
        "async_dbbridge: %s without lifespan shutdown: closed %d idle pooled connection(s); "
        "the rest close as requests give them back",
        signal.Signals(signum).name,
        closed,
    )
