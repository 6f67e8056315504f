"""`CLOSE_STRANDED`: close the connections of threads the library does not own, once they end.

Django keeps one connection per alias per thread and closes it only at the end
of a request (`close_old_connections()`). Code that queries from a plain
`threading.Thread`, a third-party `ThreadPoolExecutor`, or
`sync_to_async(thread_sensitive=False)` on someone else's executor never gets
there: when the thread ends, its wrapper — held in reference cycles — and the
server session it keeps open wait for a garbage collection that may not come
for a long time (with `gc` idle, three rounds of `ThreadPoolExecutor(20)` left
61 PostgreSQL sessions open).

How the end of a thread is noticed without the collector: the first time a
thread that the library does not own connects, a sentinel object is stored in
a `threading.local` and nowhere else. When the thread ends, CPython clears its
thread-local storage, the sentinel's reference count drops to zero, and a
`weakref.finalize` on it runs — right then, garbage collector or not — and
hands the thread's wrappers to one library thread, which closes their raw
connections. A live thread's connection is never touched from another thread:
the closer only ever sees the wrappers of threads that have ended. Closing
goes through `_compat.close_dead_threads_connection()` (Django's `close()`
refuses any thread but the owner's).

The hot path is a thread that connects again and again (a pooled checkout is
a `connect()` to Django, and sends `connection_created`): after a thread's
first connection the receiver costs one thread-local read and a dict lookup.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import sys
import threading
import traceback
import weakref
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import asgiref
import django
from django.core.signals import setting_changed
from django.db import connections

from . import _compat, _fork, _observers
from ._connections import on_connect

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ("closed_count", "configure")

logger = logging.getLogger("async_dbbridge")

#: With STRANDED_STACKS, frames walked per connection (Django's own connect
#: path is about 15 deep), and the caller's frames shown in the log.
STACK_LIMIT: Final = 64
STACK_SHOWN: Final = 6
_MACHINERY: Final = tuple(
    os.path.join(os.path.dirname(os.path.abspath(module.__file__ or "")), "")
    for module in (django, asgiref, _compat)
)

_Frame = tuple[str, int, str]


def _capture_stack() -> list[_Frame]:
    """The calling thread's frames, innermost first: file, line, function; nothing read.

    Cheap enough for every first connection of a thread: no source lines are
    read (traceback.extract_stack() would), that is left to the log line.
    """
    frames: list[_Frame] = []
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and len(frames) < STACK_LIMIT:
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return frames


def _format_stack(frames: list[_Frame]) -> str:
    """The innermost frames of the caller's own code, outermost first, as a traceback shows."""
    mine = [f for f in frames if not os.path.abspath(f[0]).startswith(_MACHINERY)]
    summary = traceback.StackSummary.from_list(
        [
            traceback.FrameSummary(path, line, name)
            for path, line, name in reversed(mine[:STACK_SHOWN])
        ]
    )
    return "".join(summary.format())


#: Thread names already logged (digits folded, see _close); bounded all the same.
_LOGGED_NAMES_MAX: Final = 1024
_DIGITS: Final = re.compile(r"\d+")

_enabled = False
_stacks = False
_local = threading.local()


class _Sentinel:
    """Lives only in its thread's `threading.local`: freed (by refcount) when the thread ends."""

    __slots__ = ("__weakref__",)


class _ThreadState:
    """A foreign thread's wrappers, by alias; referenced by the finalizer, never by the sentinel."""

    __slots__ = ("name", "pid", "stacks", "wrappers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid = os.getpid()
        self.wrappers: dict[str, BaseDatabaseWrapper] = {}
        self.stacks: dict[str, list[_Frame]] = {}


#: What `_local.state` holds on a thread the library owns (request threads,
#: executor workers, DBThread: their classes say `_dbbridge_owned`) and on the
#: main thread: their connections are the library's business, or the process's.
_OWNED: Final = object()


def _is_owned(thread: threading.Thread) -> bool:
    return bool(getattr(thread, "_dbbridge_owned", False))


def _on_connect(connection: BaseDatabaseWrapper, thread: threading.Thread) -> None:
    if not _enabled:
        return
    state = getattr(_local, "state", None)
    if state is _OWNED:
        return
    if state is None:
        state = _start_tracking(thread)
        if state is _OWNED:
            return
    assert isinstance(state, _ThreadState)
    alias = connection.alias
    if alias in state.wrappers:
        return  # the same wrapper connecting again
    # Only the thread's own wrapper: a private one (a monitor, `_nodb_cursor`)
    # is closed by whoever made it.
    if connection is not connections[alias]:
        return
    state.wrappers[alias] = connection
    if _stacks:
        state.stacks[alias] = _capture_stack()


def _start_tracking(thread: threading.Thread) -> _ThreadState | object:
    if _is_owned(thread) or thread is threading.main_thread():
        # The main thread ends with the process (which closes every socket).
        _local.state = _OWNED
        return _OWNED
    state = _ThreadState(thread.name)
    sentinel = _Sentinel()
    _local.state = state
    _local.sentinel = sentinel
    # The closer is started here, on a live thread, so that the finalizer
    # (which runs as the thread is torn down) only has to queue.
    _ensure_closer()
    finalizer = weakref.finalize(sentinel, _thread_ended, state)
    # Never at interpreter exit: the process's end closes the sockets anyway,
    # and the closer thread may be gone by then.
    finalizer.atexit = False
    return state


# -- closing, on the library's thread ---------------------------------------------------------

_queue: queue.SimpleQueue[_ThreadState] = queue.SimpleQueue()
_closer: threading.Thread | None = None
_closer_lock = threading.Lock()
_closed = 0
_logged: set[str] = set()


def _thread_ended(state: _ThreadState) -> None:
    """Run by the finalizer, on the ending thread itself, as its thread-locals are cleared.

    Only a queue put: the thread is in its last moments (no Python code of
    its own will run again), so the closing is done elsewhere.
    """
    if state.pid != os.getpid():
        # A forked child clears the parent's other threads' states (and so
        # runs this): their connections are the parent's sessions, which
        # _fork discards without a word to the server. Never close them here.
        return
    if any(conn.connection is not None for conn in state.wrappers.values()):
        _queue.put(state)
        if _closer is None:
            # Only in a forked child whose closer thread was the parent's.
            _ensure_closer()


def _ensure_closer() -> None:
    global _closer
    if _closer is not None and _closer.is_alive():
        return
    with _closer_lock:
        if _closer is None or not _closer.is_alive():
            _closer = threading.Thread(
                target=_close_forever, name="async_dbbridge-stranded", daemon=True
            )
            _closer._dbbridge_owned = True  # type: ignore[attr-defined]
            _closer.start()


def _close_forever() -> None:
    while True:
        state = _queue.get()
        try:
            _close(state)
        except Exception:
            logger.warning(
                "closing the connections of ended thread %r failed", state.name, exc_info=True
            )


def _close(state: _ThreadState) -> None:
    global _closed
    closed: list[str] = []
    for alias, conn in state.wrappers.items():
        # A pooled wrapper (a task worker's thread that ended without
        # end_thread()): its checked-out slot is freed once the raw connection
        # is closed, or the pool would be one connection short for good.
        entry = getattr(conn, "_dbbridge_entry", None)
        if entry is not None and entry.raw is not conn.connection:
            entry = None
        if _compat.close_dead_threads_connection(conn):
            if entry is not None:
                conn._dbbridge_entry = None  # type: ignore[attr-defined]
                entry.pool.release(entry)
            closed.append(alias)
            for observer in _observers.active:
                observer.stranded_closed(alias)
    state.wrappers.clear()
    if not closed:
        return
    with _closer_lock:
        _closed += len(closed)
        # Once per kind of thread: "ThreadPoolExecutor-3_7" and
        # "ThreadPoolExecutor-9_0" are the same code's threads.
        kind = _DIGITS.sub("N", state.name)
        first = kind not in _logged
        if first:
            if len(_logged) >= _LOGGED_NAMES_MAX:
                _logged.clear()
            _logged.add(kind)
    if first:
        stacks = "".join(
            f"\n{alias!r} was opened at:\n" + _format_stack(state.stacks[alias])
            for alias in closed
            if alias in state.stacks
        )
        logger.warning(
            "closed %d database connection(s) (%s) stranded by thread %r, which ended "
            "without closing them (CLOSE_STRANDED; logged once per thread name, digits aside; "
            "ASYNC_DBBRIDGE['STRANDED_STACKS'] = True shows where they were opened)%s",
            len(closed),
            ", ".join(repr(a) for a in closed),
            state.name,
            stacks,
        )
    state.stacks.clear()


def closed_count() -> int:
    """Stranded connections closed in this process so far."""
    return _closed


# -- settings ---------------------------------------------------------------------------------


def configure() -> None:
    """Read `CLOSE_STRANDED` and `STRANDED_STACKS` (at startup and when the setting changes)."""
    global _enabled, _stacks
    from .conf import SettingsError, get_settings

    try:
        settings = get_settings()
    except SettingsError:
        # Reported by the system checks and at first use; stay as before.
        return
    _enabled = settings.close_stranded
    _stacks = settings.stranded_stacks


def _on_setting_changed(setting: str, **kwargs: Any) -> None:
    if setting == "ASYNC_DBBRIDGE":
        configure()


def _reset_after_fork() -> None:
    """In a forked child: the closer thread is the parent's; the queue may hold its threads."""
    global _queue, _closer, _closer_lock
    _queue = queue.SimpleQueue()
    _closer = None
    _closer_lock = threading.Lock()


on_connect(_on_connect)
setting_changed.connect(_on_setting_changed, dispatch_uid="async_dbbridge.stranded")
_fork.on_child(_reset_after_fork, order=_fork.ORDER_POOLS)
