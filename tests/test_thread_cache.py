"""The thread cache shared by executor workers and request threads: LIFO, retirement, failures."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from async_dbbridge._thread_cache import RETIRE, CachedThread, ThreadCache

DEADLINE = 10.0
marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="fresh")


class Echo(CachedThread):
    """Runs callables from its inbox; parks itself when done; None stops it."""

    def __init__(self, cache: ThreadCache[Echo], name: str) -> None:
        super().__init__(name)
        self.cache = cache
        self.results: list[Any] = []
        self.retired = threading.Event()

    def main(self) -> None:
        try:
            while True:
                item = self.cache.next_item(self)
                if item is RETIRE:
                    self.retired.set()
                    return
                if item is None:
                    return
                self.results.append(item())
                with self.cache.lock:
                    self.cache.park_locked(self)
        finally:
            self.cache.exited(self)


def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"not within {DEADLINE}s: {what}"
        time.sleep(0.002)


@pytest.fixture
def make_cache() -> Iterator[Callable[..., ThreadCache[Echo]]]:
    caches: list[ThreadCache[Echo]] = []

    def make(idle_timeout: float | None = None) -> ThreadCache[Echo]:
        cache: ThreadCache[Echo] = ThreadCache(
            lambda name: Echo(cache, name), prefix="cache-test", idle_timeout=idle_timeout
        )
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        with cache.lock:
            idle = cache.take_all_idle_locked()
        for thread in idle:
            thread.inbox.put(None)
        assert cache.wait_ended(DEADLINE)


def run_on_new(cache: ThreadCache[Echo], fn: Callable[[], Any]) -> Echo:
    with cache.lock:
        thread = cache.new_locked()
    thread.inbox.put(fn)
    cache.start(thread)
    return thread


def test_the_most_recently_idle_thread_is_reused_first(
    make_cache: Callable[..., ThreadCache[Echo]],
) -> None:
    cache = make_cache()
    first = run_on_new(cache, lambda: 1)
    until(lambda: first in cache.idle, "the first thread parked")
    second = run_on_new(cache, lambda: 2)
    until(lambda: second in cache.idle, "the second thread parked")
    with cache.lock:
        assert cache.pop_idle_locked() is second
        assert cache.pop_idle_locked() is first
        assert cache.pop_idle_locked() is None
        cache.park_locked(first)
        cache.park_locked(second)
    assert [t.name for t in (first, second)] == ["cache-test-0", "cache-test-1"]
    assert (cache.started, cache.retired) == (2, 0)


def test_an_idle_thread_retires_and_a_busy_one_waits_on(
    make_cache: Callable[..., ThreadCache[Echo]],
) -> None:
    cache = make_cache(idle_timeout=0.05)
    thread = run_on_new(cache, lambda: "ran")
    until(lambda: thread in cache.idle, "it parked")
    # Taken off the stack (as an owner does before handing work), its wait
    # may time out any number of times: it does not retire.
    with cache.lock:
        assert cache.pop_idle_locked() is thread
    until(lambda: thread.waits_timed_out >= 3, "its wait timed out three times")
    assert thread.is_alive()
    thread.inbox.put(lambda: "late")
    until(lambda: thread.results == ["ran", "late"], "the late item ran")
    # Back on the stack, it retires at its next timeout and leaves the cache.
    assert thread.retired.wait(DEADLINE)
    until(lambda: not cache.alive, "it ended")
    assert (cache.idle, cache.retired) == ([], 1)


def test_threads_run_in_a_fresh_context(make_cache: Callable[..., ThreadCache[Echo]]) -> None:
    cache = make_cache()
    marker.set("the starter's")
    thread = run_on_new(cache, marker.get)
    until(lambda: thread.results == ["fresh"], "it ran")


def test_a_thread_that_cannot_start_is_forgotten(
    make_cache: Callable[..., ThreadCache[Echo]], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache()
    with cache.lock:
        thread = cache.new_locked()

    def refuse() -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(thread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start"):
        cache.start(thread)
    assert (cache.alive, cache.started) == (set(), 0)
    assert cache.wait_ended(0)


def test_wait_ended_spares_what_it_is_told_to(
    make_cache: Callable[..., ThreadCache[Echo]],
) -> None:
    cache = make_cache()
    release = threading.Event()
    busy = run_on_new(cache, lambda: release.wait(DEADLINE))
    assert not cache.wait_ended(0.01)
    assert cache.wait_ended(0.01, spare=lambda t: t is busy)
    release.set()
    until(lambda: busy in cache.idle, "it parked")
