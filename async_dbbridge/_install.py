"""Which DBExecutor serves a loop: the one installed on it, or the process-wide bridge."""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import Executor

from ._executor import DBExecutor

__all__ = ("get_bridge_executor", "install_default_executor", "reset_bridge_executor")

_lock = threading.Lock()
_bridge: DBExecutor | None = None
# Executors installed through install_default_executor(), per loop. Weak keys:
# a closed, dropped loop must not keep its executor (or itself) alive.
_installed: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DBExecutor] = (
    weakref.WeakKeyDictionary()
)


def get_bridge_executor() -> DBExecutor:
    """The process-wide [`DBExecutor`][async_dbbridge.DBExecutor], built from the settings.

    Created on first use, from `settings.ASYNC_DBBRIDGE` (see
    [Settings](settings.md)). If it has been shut
    down (for example by `asyncio.run()` closing a loop it was the default
    executor of, or by the ASGI lifespan shutdown), the next call builds a
    fresh one.

    Raises:
        django.core.exceptions.ImproperlyConfigured: `ASYNC_DBBRIDGE` is invalid;
            the message names the key.
    """
    global _bridge
    bridge = _bridge
    if bridge is not None and not bridge._closing:
        return bridge
    with _lock:
        if _bridge is None or _bridge._closing:
            from .conf import get_settings

            _bridge = DBExecutor(**get_settings().executor_kwargs())
        return _bridge


def reset_bridge_executor(*, wait: bool = True) -> None:
    """Shut down the process-wide bridge (closing its connections); the next use rebuilds it.

    Args:
        wait: Return only once every worker has closed its connections.
    """
    global _bridge
    with _lock:
        bridge, _bridge = _bridge, None
    if bridge is not None:
        bridge.shutdown(wait=wait)


def _loop_default(loop: asyncio.AbstractEventLoop) -> Executor | None:
    # asyncio has no public getter for the default executor. The attribute has
    # existed under this name since Python 3.4; if it ever goes, only executors
    # set with loop.set_default_executor() directly go unnoticed.
    default = getattr(loop, "_default_executor", None)
    return default if isinstance(default, Executor) else None


def executor_for_loop(loop: asyncio.AbstractEventLoop) -> DBExecutor:
    """The executor db_call uses on ``loop``."""
    installed = _installed.get(loop)
    if installed is not None:
        return installed
    default = _loop_default(loop)
    if isinstance(default, DBExecutor):
        return default
    return get_bridge_executor()


def install_default_executor(
    executor: DBExecutor | None = None, *, loop: asyncio.AbstractEventLoop | None = None
) -> DBExecutor:
    """Make a [`DBExecutor`][async_dbbridge.DBExecutor] the default executor of an event loop.

    After this, `loop.run_in_executor(None, fn)`, `asyncio.to_thread(fn)`
    and `sync_to_async(fn, thread_sensitive=False)` on that loop all run
    with connection cleanup, and `asyncio.run()` shuts it down (closing its
    connections) when the loop ends.

    Args:
        executor: The executor to install; by default the process-wide bridge.
        loop: The loop; by default the running one.

    Returns:
        The executor now installed. Calling again with the same executor does
            nothing. The previous default (unless it is the process-wide bridge,
            which other loops share) is shut down without waiting: its running
            calls finish and its connections close, but waiting would block the
            loop.

    Raises:
        RuntimeError: `loop` is not given and no event loop is running.
        TypeError: `executor` is not a [`DBExecutor`][async_dbbridge.DBExecutor].
    """
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "install_default_executor() needs a running event loop, or pass loop="
            ) from None
    if executor is None:
        executor = get_bridge_executor()
    elif not isinstance(executor, DBExecutor):
        raise TypeError(
            f"install_default_executor() takes a DBExecutor, not {type(executor).__name__}"
        )
    previous = _loop_default(loop)
    if previous is executor:
        _installed[loop] = executor
        return executor
    loop.set_default_executor(executor)
    _installed[loop] = executor
    if previous is not None and previous is not _bridge:
        # The loop would have shut its default down when it ended; now that it
        # is replaced nobody will, so do it here. The process-wide bridge is
        # shared with other loops and stays.
        previous.shutdown(wait=False)
    return executor
