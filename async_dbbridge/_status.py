"""The live status report: `manage.py dbbridge_status` and `async_dbbridge.views.status`.

One snapshot of this process — per alias, the pool's size and use, the threads
waiting, and every open connection with who holds it — as a JSON-serialisable
dict, and as the text the command prints. Never creates a pool, a thread or a
connection (the command's `--connect` does, on purpose). No credentials: an
alias is named, never its host, user or password.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from . import _stranded
from ._lending import pools
from ._stats import stats

__all__ = ("format_text", "snapshot")


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def snapshot() -> dict[str, Any]:
    """This process's pools, request threads and bridge, with every pooled connection."""
    bridge_stats = stats()
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "pools": {},
        "request_threads": (
            bridge_stats.request_threads.as_dict() if bridge_stats.request_threads else None
        ),
        "bridge": bridge_stats.bridge.as_dict() if bridge_stats.bridge else None,
        "stranded_closed": _stranded.closed_count(),
    }
    for pool in pools():
        pool_stats = pool.stats()
        last_error = pool.last_error
        report["pools"][pool.alias] = {
            "max_size": pool_stats.max_size,
            "in_use": pool_stats.in_use,
            "idle": pool_stats.idle,
            "waiting": pool_stats.waiting,
            "max_waiting": pool_stats.max_waiting,
            "opened": pool_stats.opened,
            "closed": pool_stats.closed,
            "checkouts": pool_stats.checkouts,
            "timeouts": pool_stats.timeouts,
            "rejected": pool_stats.rejected,
            "last_error": (
                None
                if last_error is None
                else {
                    "time": datetime.datetime.fromtimestamp(last_error[0], datetime.UTC).isoformat(
                        timespec="seconds"
                    ),
                    "error": last_error[1],
                }
            ),
            "connections": [
                {
                    "state": info.state,
                    "owner_thread": info.owner_thread,
                    "age": _round(info.age),
                    "idle_for": _round(info.idle_for),
                    "suspect": info.suspect,
                }
                for info in pool.connections()
            ],
        }
    return report


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s"


def format_text(report: dict[str, Any]) -> str:
    """The report as the command prints it: a block per alias, a line per connection."""
    lines = [f"async_dbbridge status of process {report['pid']} at {report['time']}"]
    if not report["pools"]:
        lines.append("no connection pool in this process yet (none is built before first use)")
    for alias, pool in report["pools"].items():
        waiting = f"{pool['waiting']} waiting"
        if pool["max_waiting"] is not None:
            waiting += f" (at most {pool['max_waiting']})"
        lines.append(
            f"pool {alias!r}: {pool['in_use']} used + {pool['idle']} idle of {pool['max_size']}, "
            f"{waiting}; {pool['opened']} opened, {pool['closed']} closed, "
            f"{pool['checkouts']} checkouts, {pool['timeouts'] + pool['rejected']} timeouts"
        )
        if pool["last_error"]:
            lines.append(
                f"  last error at {pool['last_error']['time']}: {pool['last_error']['error']}"
            )
        for conn in pool["connections"]:
            owner = conn["owner_thread"] or "-"
            flag = "  suspect (pinged before next use)" if conn["suspect"] else ""
            lines.append(
                f"  {conn['state']:4}  age {_seconds(conn['age']):>6}  idle "
                f"{_seconds(conn['idle_for']):>6}  thread {owner}{flag}"
            )
    threads = report["request_threads"]
    if threads is not None:
        lines.append(f"request threads: {threads['busy']} busy, {threads['idle']} idle")
    bridge = report["bridge"]
    if bridge is not None:
        lines.append(
            f"bridge: {bridge['busy']} busy + {bridge['idle']} idle workers of "
            f"{bridge['max_workers']}, {bridge['queued']} queued; {bridge['calls']} calls, "
            f"{bridge['errors']} errors"
        )
    lines.append(f"stranded connections closed (CLOSE_STRANDED): {report['stranded_closed']}")
    return "\n".join(lines)
