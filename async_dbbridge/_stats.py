"""`async_dbbridge.stats()`: one snapshot of what the library holds in this process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._executor import ExecutorStats
from ._lending import pool_stats
from ._pool import PoolStats
from ._request_threads import RequestThreadStats, combined_stats

__all__ = ("BridgeStats", "stats")


@dataclass(frozen=True)
class BridgeStats:
    """A snapshot of this process: connection pools, request threads and the bridge.

    Returned by [`stats()`][async_dbbridge.stats]; `as_dict()` gives a
    JSON-serialisable copy (for a metrics exporter or a health endpoint).
    Counts only, never credentials.

    Attributes:
        pools: Per database alias, its connection pool's
            [`PoolStats`][async_dbbridge.PoolStats] (`max_size`, `in_use`,
            `idle`, `waiting`, wait times, timeouts...). An alias appears once
            its pool was first used.
        request_threads: The ASGI wrapper's request threads, a
            [`RequestThreadStats`][async_dbbridge.RequestThreadStats] (`busy`,
            `idle`, `started`, `retired`) over every wrapper in the process;
            `None` when no wrapper serves requests on request threads.
        bridge: The process-wide bridge's
            [`ExecutorStats`][async_dbbridge.ExecutorStats]; `None` when it
            does not exist (not used yet, or shut down).
    """

    pools: dict[str, PoolStats]
    request_threads: RequestThreadStats | None
    bridge: ExecutorStats | None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "pools": {alias: pool.as_dict() for alias, pool in self.pools.items()},
            "request_threads": (
                self.request_threads.as_dict() if self.request_threads is not None else None
            ),
            "bridge": self.bridge.as_dict() if self.bridge is not None else None,
        }


def stats() -> BridgeStats:
    """A snapshot of the connection pools, request threads and bridge of this process.

    Never creates anything: a pool, the request threads or the bridge that
    does not exist yet is left out (or `None`).

    ```python
    import async_dbbridge

    snapshot = async_dbbridge.stats()
    for alias, pool in snapshot.pools.items():
        print(alias, pool.in_use, "of", pool.max_size, "in use;", pool.waiting, "waiting")
    ```
    """
    from . import _install

    bridge = _install._bridge
    return BridgeStats(
        pools=pool_stats(),
        request_threads=combined_stats(),
        bridge=bridge.stats() if bridge is not None and not bridge._closing else None,
    )
