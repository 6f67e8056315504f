"""The pool on its own (no Django): misuse refused, no slot lost, waiters bounded, idle reaped.

`_pool.ConnectionPool` knows nothing of Django, so these tests drive it with
fake connections whose every step can be made to fail. The pool's promises:
`in_use + idle <= max_size` always, and every slot comes back, whatever raises.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from async_dbbridge import _pool
from async_dbbridge._pool import (
    LIFETIME_JITTER,
    ConnectionPool,
    PoolClosedError,
    PooledConnection,
    PoolMisuseError,
    PoolTimeoutError,
)

DEADLINE = 10.0


class Fake:
    """A raw connection: counts closes; `close()` can be made to raise."""

    def __init__(self, *, close_raises: bool = False) -> None:
        self.closed = 0
        self.close_raises = close_raises

    def close(self) -> None:
        self.closed += 1
        if self.close_raises:
            raise OSError("close failed")


class Boom(Exception):
    pass


def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.002)


@pytest.fixture
def pools() -> Iterator[Callable[..., ConnectionPool]]:
    made: list[ConnectionPool] = []

    def make(max_size: int = 2, timeout: float = DEADLINE, **kwargs: Any) -> ConnectionPool:
        pool = ConnectionPool("fake", max_size, timeout, **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close(0)


def assert_whole(pool: ConnectionPool) -> None:
    """No slot lost: every slot can be taken (then is given back)."""
    stats = pool.stats()
    assert stats.in_use + stats.idle <= stats.max_size
    assert stats.in_use == 0, stats
    taken = [pool.take(Fake, max_age=None) for _ in range(pool.max_size)]
    assert pool.stats().in_use == pool.max_size
    for entry in taken:
        pool.put(entry)
    assert pool.stats().in_use == 0


# -- misuse ----------------------------------------------------------------------------


def test_a_connection_given_back_twice_is_refused_and_nothing_changes(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools()
    entry = pool.take(Fake, max_age=None)
    assert pool.put(entry)
    before = pool.stats()
    with pytest.raises(PoolMisuseError, match="not checked out"):
        pool.put(entry)
    with pytest.raises(PoolMisuseError, match="not checked out"):
        pool.release(entry)
    assert pool.stats() == before
    # Handed out once more, it is one holder's again.
    again = pool.take(Fake, max_age=None)
    assert again is entry
    pool.put(again)
    assert_whole(pool)


def test_a_connection_of_another_pool_is_refused(pools: Callable[..., ConnectionPool]) -> None:
    mine, theirs = pools(), pools()
    entry = theirs.take(Fake, max_age=None)
    with pytest.raises(PoolMisuseError, match="belongs to the pool"):
        mine.put(entry)
    with pytest.raises(PoolMisuseError, match="belongs to the pool"):
        mine.release(entry)
    assert mine.stats().in_use == 0
    assert theirs.stats().in_use == 1
    theirs.put(entry)
    assert_whole(mine)
    assert_whole(theirs)


def test_bad_arguments_are_named() -> None:
    for kwargs, name in (
        ({"max_size": 0}, "max_size"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"max_waiting": 0}, "max_waiting"),
        ({"max_idle": float("nan")}, "max_idle"),
    ):
        arguments: dict[str, Any] = {"max_size": 1, "timeout": 1.0, **kwargs}
        with pytest.raises(ValueError, match=name):
            ConnectionPool("fake", arguments.pop("max_size"), arguments.pop("timeout"), **arguments)


# -- fault injection: every step of take and give-back ----------------------------------


def test_a_failing_connect_frees_its_slot(pools: Callable[..., ConnectionPool]) -> None:
    pool = pools()

    def refuse() -> Any:
        raise Boom("refused")

    with pytest.raises(Boom):
        pool.take(refuse, max_age=None)
    assert pool.stats().opened == 0
    assert_whole(pool)


@pytest.mark.parametrize("failing", ["ping", "probe", "both"])
def test_a_health_check_that_raises_counts_as_dead_and_loses_no_slot(
    pools: Callable[..., ConnectionPool], failing: str
) -> None:
    pool = pools(health_check_idle=3600.0)
    entry = pool.take(Fake, max_age=None)
    raw = entry.raw
    pool.put(entry)

    def ping(raw: Any) -> bool:
        if failing in ("ping", "both"):
            raise Boom("ping")
        return False  # dead

    def probe(raw: Any) -> bool:
        if failing in ("probe", "both"):
            raise Boom("probe")
        return True  # may be dead: ping it

    fresh = pool.take(Fake, max_age=None, ping=ping, probe=probe)
    assert fresh.raw is not raw  # replaced
    assert raw.closed == 1
    assert pool.stats().replaced == 1
    pool.put(fresh)
    assert_whole(pool)


def test_replacing_a_dead_connection_whose_reconnect_fails_frees_the_slot(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools(health_check_idle=0.0)
    pool.put(pool.take(lambda: Fake(close_raises=True), max_age=None))

    def refuse() -> Any:
        raise Boom("refused")

    with pytest.raises(Boom):
        pool.take(refuse, max_age=None, ping=lambda raw: False)
    assert pool.stats().idle == 0
    assert_whole(pool)


def test_closing_that_raises_loses_no_slot_on_give_back_prune_and_release(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools(max_idle=0.001)
    # Past its lifetime at give-back: really closed, close() raises.
    expired = pool.take(lambda: Fake(close_raises=True), max_age=0.0)
    assert pool.put(expired) is False
    assert expired.raw.closed == 1
    # Idle past max_idle: pruned at the next checkout, close() raises.
    stale = pool.take(lambda: Fake(close_raises=True), max_age=None)
    pool.put(stale)
    until(lambda: stale.raw.closed == 1, "the idle connection was closed")
    # A holder that really closed its connection frees the slot.
    held = pool.take(lambda: Fake(close_raises=True), max_age=None)
    pool.discard(held)
    assert held.raw.closed == 1
    assert_whole(pool)


class Interrupt(BaseException):
    """What KeyboardInterrupt is to the pool: a BaseException at any bytecode."""


def test_a_waiter_interrupted_after_its_grant_passes_the_connection_on(
    pools: Callable[..., ConnectionPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt can hit a waiting thread just as it is handed a slot."""
    pool = pools(max_size=1)
    held = pool.take(Fake, max_age=None)
    outcome: list[BaseException] = []

    class InterruptedCondition(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            super().wait(timeout)  # woken by the grant below
            raise Interrupt

    class InterruptedWaiter(_pool._Waiter):
        __slots__ = ()

        def __init__(self, lock: threading.Lock) -> None:
            super().__init__(lock)
            self.ready = InterruptedCondition(lock)

    def waiter() -> None:
        try:
            pool.take(Fake, max_age=None)
        except BaseException as exc:
            outcome.append(exc)

    monkeypatch.setattr(_pool, "_Waiter", InterruptedWaiter)
    thread = threading.Thread(target=waiter)
    thread.start()
    until(lambda: pool.stats().waiting == 1, "the thread waits in line")
    pool.put(held)  # granted to the waiter, which is interrupted
    thread.join(DEADLINE)
    assert [type(exc) for exc in outcome] == [Interrupt]
    assert pool.stats().idle == 1  # the connection it was handed went back
    assert_whole(pool)


# -- waiters: bounded ---------------------------------------------------------------------


def test_beyond_max_waiting_a_checkout_fails_at_once(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools(max_size=1, max_waiting=3)
    held = pool.take(Fake, max_age=None)
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(pool.take(Fake, max_age=None)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    until(lambda: pool.stats().waiting == 3, "three threads wait")
    started = time.monotonic()
    with pytest.raises(PoolTimeoutError) as caught:
        pool.take(Fake, max_age=None)
    assert time.monotonic() - started < DEADLINE / 2  # at once, not after the timeout
    assert caught.value.max_waiting == 3
    assert "3 threads were already waiting" in str(caught.value)
    stats = pool.stats()
    assert (stats.rejected, stats.timeouts, stats.waiting) == (1, 0, 3)
    # The waiters are still served, in order, one connection at a time.
    pool.put(held)
    for _ in range(3):
        until(lambda: len(results) >= 1, "a waiter was served")
        entry = results.pop()
        assert isinstance(entry, PooledConnection)
        pool.put(entry)
    for thread in threads:
        thread.join(DEADLINE)
    assert_whole(pool)


def test_a_timeout_and_a_closed_pool_raise_what_the_owner_chose(
    pools: Callable[..., ConnectionPool],
) -> None:
    class MyTimeout(Exception):
        def __init__(self, alias: str, size: int, timeout: float, **kw: object) -> None:
            super().__init__(alias, size, timeout, kw)

    class MyClosed(Exception):
        pass

    pool = pools(max_size=1, timeout=0.05, timeout_error=MyTimeout, closed_error=MyClosed)
    held = pool.take(Fake, max_age=None)
    with pytest.raises(MyTimeout):
        pool.take(Fake, max_age=None)
    assert pool.stats().timeouts == 1
    pool.put(held)
    pool.close(0)
    with pytest.raises(MyClosed):
        pool.take(Fake, max_age=None)
    default = ConnectionPool("fake", 1, 1.0)
    default.close(0)
    with pytest.raises(PoolClosedError):
        default.take(Fake, max_age=None)


# -- idle connections close without traffic; lifetimes are jittered ----------------------


def test_idle_connections_are_closed_after_max_idle_with_no_traffic(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools(max_size=3, max_idle=0.2)
    taken = [pool.take(Fake, max_age=None) for _ in range(3)]
    for entry in taken:
        pool.put(entry)
    assert pool.stats().idle == 3
    given_back = time.monotonic()
    # Nothing touches the pool from here on: the reaper thread must.
    until(lambda: pool.stats().idle == 0, "every idle connection was closed", timeout=5.0)
    assert time.monotonic() - given_back >= 0.2
    assert all(entry.raw.closed == 1 for entry in taken)
    assert pool.stats().closed == 3
    assert any(t.name == "async_dbbridge-pool-reaper" for t in threading.enumerate())
    pool.close(0)
    until(
        lambda: not any(t.name == "async_dbbridge-pool-reaper" for t in threading.enumerate()),
        "the reaper thread ended once no pool was left to watch",
    )


def test_an_idle_connection_past_its_lifetime_is_closed_with_no_traffic(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools(max_size=1, max_idle=60.0)
    entry = pool.take(Fake, max_age=0.2)
    pool.put(entry)
    until(lambda: entry.raw.closed == 1, "the expired idle connection was closed", timeout=5.0)
    assert pool.stats().idle == 0


def test_lifetimes_are_jittered_down_by_at_most_five_percent(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools(max_size=64)
    entries = [pool.take(Fake, max_age=100.0) for _ in range(64)]
    lifetimes = [entry.deadline - entry.opened_at for entry in entries if entry.deadline]
    assert len(lifetimes) == 64
    assert all(100.0 * (1 - LIFETIME_JITTER) <= life <= 100.0 for life in lifetimes)
    assert len({round(life, 6) for life in lifetimes}) > 32  # spread, not one value


# -- health: probe, ping, suspects --------------------------------------------------------


def test_a_fresh_connection_is_probed_not_pinged_unless_the_probe_doubts_it(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools(health_check_idle=3600.0)
    pings: list[Any] = []
    doubtful: set[int] = set()

    def ping(raw: Any) -> bool:
        pings.append(raw)
        return True

    def probe(raw: Any) -> bool:
        return id(raw) in doubtful

    entry = pool.take(Fake, max_age=None, ping=ping, probe=probe)
    pool.put(entry)
    pool.put(pool.take(Fake, max_age=None, ping=ping, probe=probe))
    assert pings == []  # trusted: no round trip
    doubtful.add(id(entry.raw))
    pool.put(pool.take(Fake, max_age=None, ping=ping, probe=probe))
    assert pings == [entry.raw]
    assert pool.stats().health_checks == 1


def test_after_a_disconnect_every_idle_sibling_is_pinged_before_reuse(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools(max_size=3, health_check_idle=3600.0)
    entries = [pool.take(Fake, max_age=None) for _ in range(3)]
    for entry in entries:
        pool.put(entry)
    pool.suspect_idle()
    dead = {id(entries[0].raw), id(entries[1].raw)}
    pinged: list[Any] = []

    def ping(raw: Any) -> bool:
        pinged.append(raw)
        return id(raw) not in dead

    handed = [pool.take(Fake, max_age=None, ping=ping, probe=lambda raw: False) for _ in range(3)]
    assert len(pinged) == 3
    assert sum(1 for entry in handed if id(entry.raw) in dead) == 0
    assert pool.stats().replaced == 2
    for entry in handed:
        pool.put(entry)
    # Checked once: no longer suspect.
    pool.put(pool.take(Fake, max_age=None, ping=ping, probe=lambda raw: False))
    assert len(pinged) == 3
    assert_whole(pool)


def test_the_reaper_restarts_in_a_forked_child_state() -> None:
    """After fork the parent's reaper thread does not exist: the state is fresh."""
    reaper = _pool._Reaper()
    pool = ConnectionPool("fake", 1, 1.0)
    reaper.reset_after_fork()
    assert reaper._thread is None
    pool.close(0)


# -- drain -----------------------------------------------------------------------------


def test_a_drained_pool_closes_idle_connections_and_each_given_back_but_still_lends(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools(max_size=3)
    kept = pool.take(Fake, max_age=None)
    idle = pool.take(Fake, max_age=None)
    assert pool.put(idle)
    assert pool.drain() == 1
    assert idle.raw.closed == 1
    assert pool.stats().idle == 0
    # Given back after the drain: closed, not kept.
    assert not pool.put(kept)
    assert kept.raw.closed == 1
    # Checkouts go on: a new connection, closed in turn when given back.
    fresh = pool.take(Fake, max_age=None)
    assert fresh is not kept
    assert fresh is not idle
    assert not pool.put(fresh)
    assert fresh.raw.closed == 1
    assert pool.stats().idle == 0
    assert_whole(pool)


def test_a_drained_pool_still_hands_a_connection_given_back_to_a_waiting_thread(
    pools: Callable[..., ConnectionPool],
) -> None:
    pool = pools(max_size=1)
    held = pool.take(Fake, max_age=None)
    pool.drain()
    got: list[PooledConnection] = []
    waiter = threading.Thread(target=lambda: got.append(pool.take(Fake, max_age=None)))
    waiter.start()
    until(lambda: pool.has_waiters, "the thread waits")
    assert pool.put(held)  # kept, for the waiter
    waiter.join(DEADLINE)
    assert got == [held]
    assert held.raw.closed == 0
    assert not pool.put(held)  # nobody waits now: closed
    assert held.raw.closed == 1
    assert_whole(pool)
