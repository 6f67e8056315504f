"""Without lifespan, the server's SIGTERM / SIGINT handlers are chained with a drain of the pools.

The drain itself, under a real server that kills its worker with the signal it
re-raises (uvicorn ``--lifespan off``), is tests/test_servers.py's
``uvicorn-lifespan-off`` case; here, the chaining rules.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import pytest

from async_dbbridge import _signals


@pytest.fixture
def handlers() -> Iterator[None]:
    """The process's SIGTERM / SIGINT handlers, restored after the test."""
    saved = {signum: signal.getsignal(signum) for signum in _signals.SHUTDOWN_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@pytest.mark.usefixtures("handlers")
def test_a_server_handler_is_chained_once_and_still_runs_and_the_drain_runs_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drains: list[str] = []

    def drain_pools() -> int:
        drains.append("drained")
        return 0

    # The pools of this test process are the suite's: count the drain instead.
    monkeypatch.setattr(_signals, "drain_pools", drain_pools)
    received: list[int] = []

    def server_handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, server_handler)
    # Left to its default action: not the library's to chain.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    loop = asyncio.new_event_loop()
    try:
        assert _signals.drain_pools_on_shutdown_signals(loop) == ["SIGTERM"]
        assert _signals.drain_pools_on_shutdown_signals(loop) == []  # chained once
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        chained = signal.getsignal(signal.SIGTERM)
        assert callable(chained)
        assert chained is not server_handler
        chained(signal.SIGTERM, None)
        # The server's handler ran at once; the drain waits for the loop.
        assert received == [signal.SIGTERM]
        assert drains == []
        loop.run_until_complete(asyncio.sleep(0))
        assert drains == ["drained"]
    finally:
        loop.close()
    # The loop is gone: the server's handler still runs, the drain is skipped.
    chained(signal.SIGTERM, None)
    assert received == [signal.SIGTERM, signal.SIGTERM]
    assert drains == ["drained"]


@pytest.mark.usefixtures("handlers")
def test_nothing_is_chained_off_the_main_thread() -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    loop = asyncio.new_event_loop()
    try:
        result: list[list[str]] = []
        thread = threading.Thread(
            target=lambda: result.append(_signals.drain_pools_on_shutdown_signals(loop))
        )
        thread.start()
        thread.join(10)
        assert result == [[]]
    finally:
        loop.close()
