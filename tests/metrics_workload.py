"""A known pool state for the metrics tests: N connections used, M threads waiting, K rejected.

Threads the library does not start lend themselves pooled connections as task
workers do (`begin_job`), open a transaction (so the connection cannot be
given back) and hold it until released. Everything is synchronised on pool
state read with bounded polling, never on sleeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

from django.db import connections, transaction

from async_dbbridge import PoolTimeout
from async_dbbridge._lending import begin_job, end_job, end_thread, get_pool

ALIAS = "default"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.005)


class HeldPool:
    """`used` threads hold a connection, `pending` wait for one, `rejected` fail at once.

    Needs `POOL_SIZE == used` and `MAX_WAITING == pending`, so that the
    rejected checkouts fail at once with `PoolTimeout` (a `timeouts` count)
    rather than after `POOL_TIMEOUT`.
    """

    def __init__(self, used: int, pending: int, rejected: int) -> None:
        self.used, self.pending, self.rejected = used, pending, rejected
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.timeouts: list[PoolTimeout] = []
        # Threads past their query: their connection is open on the server.
        self.holding = 0
        self._lock = threading.Lock()

    def _hold(self) -> None:
        begin_job([ALIAS])
        error: BaseException | None = None
        try:
            with transaction.atomic(using=ALIAS), connections[ALIAS].cursor() as cursor:
                cursor.execute("SELECT 1")
                with self._lock:
                    self.holding += 1
                # The transaction pins the connection to this thread until released.
                if not self.release.wait(60):
                    raise AssertionError("never released")
        except PoolTimeout as exc:
            self.timeouts.append(exc)
        except BaseException as exc:
            error = exc
            self.errors.append(exc)
        finally:
            end_job(error, owner=self._hold, databases=[ALIAS])
            end_thread([ALIAS])

    def _start(self, count: int) -> list[threading.Thread]:
        started = [threading.Thread(target=self._hold, name="held") for _ in range(count)]
        for thread in started:
            thread.start()
        self.threads.extend(started)
        return started

    def __enter__(self) -> HeldPool:
        pool = get_pool(ALIAS)
        self._start(self.used)
        # A slot counts as in use while its connection is being opened: wait
        # for the queries, so the sessions exist on the server.
        wait_until(lambda: self.holding == self.used, f"{self.used} holding")
        self._start(self.pending)
        wait_until(lambda: pool.stats().waiting == self.pending, f"{self.pending} waiting")
        for thread in self._start(self.rejected):
            thread.join(30)  # rejected at once: MAX_WAITING threads already wait
        assert len(self.timeouts) == self.rejected, self.errors
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release.set()
        for thread in self.threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self.threads)
        assert not self.errors, self.errors
