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
  Optionally, the CPU time the worker's processes spent on the measured tasks
  (``worker_cpu_s``; see ``benchmarks/workers_project/harness.py``'s
  ``process_tree_cpu``).
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
    #: CPU seconds the worker's processes spent on the measured tasks, if the
    #: module measured it (steadier than tasks/s on a shared machine).
    worker_cpu_s: float | None = None

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0

    @property
    def opened_per_1000(self) -> float:
        return 1000.0 * self.opened / self.tasks if self.tasks else 0.0

    @property
    def cpu_ms_per_task(self) -> float | None:
        if self.worker_cpu_s is None or not self.tasks:
            return None
        return 1000.0 * self.worker_cpu_s / self.tasks

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "tasks_per_s": self.tasks_per_s,
            "opened_per_1000": self.opened_per_1000,
            "cpu_ms_per_task": self.cpu_ms_per_task,
        }
