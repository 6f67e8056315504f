"""The contract between ``bench_workers.py`` and one module per task framework.

Each ``benchmarks/_workers_<framework>.py`` measures one framework's real
worker, started as a subprocess against a real broker, on the benchmark
database, with two variants: ``"own"`` (the framework's own Django handling)
and ``"bridge"`` (the async_dbbridge integration), at the same Django
settings. ``bench_workers.py`` imports every such module it finds, runs their
rounds interleaved (variants back to back within a round, rotated), and
reports ratios, a table and a chart.

A framework module defines:

* ``FRAMEWORK: str`` (its name in tables, e.g. ``"celery"``);
* ``VARIANTS: tuple[str, ...]`` (``("own", "bridge")``, plus any extra, e.g.
  a pool kind);
* ``def run_round(variant: str, *, database: BenchDatabase, tasks: int) ->
  WorkerRound``: start the worker, enqueue ``tasks`` short ORM tasks, time
  them from the first enqueue to the last result, stop the worker, and count
  on the server (sessions sampled during the run; sessions opened, from
  ``pg_stat_database.sessions`` on PostgreSQL; sessions left after the stop).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class WorkerRound:
    """One variant's figures from one round."""

    framework: str
    variant: str
    tasks: int
    seconds: float
    failed: int
    opened: int
    peak_sessions: int
    left_sessions: int
    bound: int

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0

    @property
    def opened_per_1000(self) -> float:
        return 1000.0 * self.opened / self.tasks if self.tasks else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "tasks_per_s": self.tasks_per_s,
            "opened_per_1000": self.opened_per_1000,
        }
