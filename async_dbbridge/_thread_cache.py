"""Reused threads: started on demand, kept idle on a LIFO stack, retired after idling.

The one thread cache behind the bridge's executor workers (`_executor`) and the
ASGI wrapper's request threads (`_request_threads`). Its owner decides what a
thread runs and when it is handed work; the cache keeps the threads:

* **LIFO.** Work goes to the most recently idle thread, so a light load is
  served by one hot thread (and one connection) while the threads at the
  bottom of the stack stay idle long enough to retire. A shared FIFO queue, as
  in the standard library's executor, would wake them in turn and keep every
  thread — and every connection — of a past burst alive for ever.
* **Retirement without a reaper.** A thread waits for its next item with
  `idle_timeout`; when the wait times out it retires only if it is still on
  the idle stack. The check and the removal happen under the cache's lock, so
  an item handed over just as the wait timed out is never lost: the owner
  pops a thread and puts the item in its inbox under that same lock, and the
  thread, no longer on the stack, simply waits again.
* **A fresh context.** Each thread runs in a new `contextvars.Context()`:
  Python 3.14 can make a thread inherit its starter's context
  (`Thread(context=...)`, `sys.flags.thread_inherit_context`), and the starter
  is a request or a caller whose context must not live on in a reused thread.

The owner holds `cache.lock` around every `*_locked` call, and around its own
state that must change together with the cache's (the executor's backlog).
"""

from __future__ import annotations

import contextvars
import enum
import itertools
import threading
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any, Generic, TypeVar

__all__ = ("RETIRE", "CachedThread", "ThreadCache")


class _Retire(enum.Enum):
    RETIRE = "retire"


#: What `ThreadCache.next_item()` returns to a thread that idled out.
RETIRE = _Retire.RETIRE


class CachedThread(threading.Thread):
    """A thread a `ThreadCache` keeps: a daemon with an inbox, run in a fresh context.

    Subclasses implement `main()`.
    """

    # The library cleans up after its own threads: CLOSE_STRANDED leaves them be.
    _dbbridge_owned = True

    def __init__(self, name: str) -> None:
        # Daemon: an idle thread blocks on its inbox, and a non-daemon thread
        # would hang interpreter exit (the owners' atexit hooks stop them).
        super().__init__(name=name, daemon=True)
        self.inbox: SimpleQueue[Any] = SimpleQueue()
        # Waits for an item that reached idle_timeout (idle, or between two
        # items of the same owner's job); written by the thread only.
        self.waits_timed_out = 0

    def run(self) -> None:
        contextvars.Context().run(self.main)

    def main(self) -> None:
        raise NotImplementedError


_ThreadT = TypeVar("_ThreadT", bound=CachedThread)


class ThreadCache(Generic[_ThreadT]):
    """Threads made by `make(name)`, named `<prefix>-N`, idle ones on a LIFO stack.

    Args:
        make: Builds a (not yet started) thread with the given name.
        prefix: The threads' names are `<prefix>-0`, `<prefix>-1`, ...
        idle_timeout: Seconds an idle thread waits for work before it
            retires; `None`: until the owner stops it.
    """

    def __init__(
        self, make: Callable[[str], _ThreadT], *, prefix: str, idle_timeout: float | None
    ) -> None:
        self._make = make
        self._prefix = prefix
        self.idle_timeout = idle_timeout
        self.lock = threading.Lock()
        # Notified whenever a thread ends: what wait_ended() waits on.
        self._ended = threading.Condition(self.lock)
        # Idle threads, the most recently idle last.
        self.idle: list[_ThreadT] = []
        # Every started thread until its very end, busy, idle or retiring.
        self.alive: set[_ThreadT] = set()
        self._counter = itertools.count()
        self.started = 0
        self.retired = 0

    # -- the owner, holding self.lock ---------------------------------------------------

    def pop_idle_locked(self) -> _ThreadT | None:
        """The most recently idle thread, taken off the stack, or None."""
        return self.idle.pop() if self.idle else None

    def new_locked(self) -> _ThreadT:
        """A new thread, counted alive; the caller starts it with `start()` after the lock."""
        thread = self._make(f"{self._prefix}-{next(self._counter)}")
        self.alive.add(thread)
        self.started += 1
        return thread

    def park_locked(self, thread: _ThreadT) -> None:
        """`thread` has nothing to do: on top of the idle stack."""
        self.idle.append(thread)

    def take_all_idle_locked(self) -> list[_ThreadT]:
        """Every idle thread, taken off the stack (to be stopped)."""
        idle, self.idle = self.idle, []
        return idle

    # -- the owner, without the lock ----------------------------------------------------

    def start(self, thread: _ThreadT) -> None:
        """Start a thread from `new_locked()`; outside the lock (the one pause it makes).

        Raises:
            RuntimeError: "can't start new thread": the thread is forgotten, so
                nothing counts a thread that will never run.
        """
        try:
            thread.start()
        except BaseException:
            with self.lock:
                self.alive.discard(thread)
                self.started -= 1
                self._ended.notify_all()
            raise

    def wait_ended(
        self, timeout: float | None, *, spare: Callable[[_ThreadT], bool] = lambda t: False
    ) -> bool:
        """Wait up to `timeout` for every thread to end, but those `spare` says not to wait for.

        Returns whether they all ended in time. Called on one of the cache's
        own threads, it never waits for that thread.
        """
        current = threading.current_thread()
        with self._ended:
            return self._ended.wait_for(
                lambda: all(t is current or spare(t) for t in self.alive), timeout
            )

    # -- the threads themselves ---------------------------------------------------------

    def next_item(self, thread: _ThreadT) -> Any:
        """The thread's next inbox item, waiting; `RETIRE` once it idled out.

        The wait times out while the thread serves its owner's job too (its
        next item may be an await away); only a thread on the idle stack
        retires then, and it is taken off the stack first.
        """
        while True:
            try:
                return thread.inbox.get(timeout=self.idle_timeout)
            except Empty:
                thread.waits_timed_out += 1
                with self.lock:
                    if thread in self.idle:
                        self.idle.remove(thread)
                        return RETIRE
                # Busy, or handed work just as the wait timed out: that item
                # is on its way (put under the lock); wait again.

    def exited(self, thread: _ThreadT) -> None:
        """Called by a thread as its very last act."""
        with self.lock:
            self.alive.discard(thread)
            if thread in self.idle:
                self.idle.remove(thread)
            self.retired += 1
            self._ended.notify_all()
