"""Run one ``benchmarks/_workers_<framework>.py`` module on its own: interleaved rounds, a table.

What ``bench_workers.py`` does for every framework module, for one, so that a
module can be measured by itself: create the benchmark database (the test
app's table, ten rows), run ``--rounds`` rounds of each variant back to back
(the order rotated each round), print the medians, drop the database.
"""

from __future__ import annotations

import argparse
import os
import statistics
from types import ModuleType
from typing import Final

from benchmarks._common import BenchDatabase, rotated, run_harness, server_version
from benchmarks._workers import WorkerRound

DB_NAME: Final = "dbbridge_bench_queues"


class Database(BenchDatabase):
    def create(self) -> None:
        from django.core.management import call_command

        from tests.testapp.models import Item

        self._create_objects()
        call_command("migrate", "testapp", database="default", interactive=False, verbosity=0)
        Item.objects.bulk_create(Item(pk=n, name=f"item {n}", value=n) for n in range(1, 11))
        self._created()


def _table(module: ModuleType, rounds: list[WorkerRound]) -> str:
    lines = [
        "| variant | tasks/s (median, min-max) | vs own | opened / 1,000 tasks "
        "| peak sessions | bound | left | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    own = [r.tasks_per_s for r in rounds if r.variant == "own"]
    for variant in module.VARIANTS:
        mine = [r for r in rounds if r.variant == variant]
        rates = [r.tasks_per_s for r in mine]
        ratios = [a / b for a, b in zip(rates, own, strict=False) if b > 0]
        lines.append(
            f"| {variant} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) "
            f"| {statistics.median(ratios):.2f}x "
            f"| {statistics.median(r.opened_per_1000 for r in mine):.0f} "
            f"| {max(r.peak_sessions for r in mine)} | {mine[0].bound} "
            f"| {max(r.left_sessions for r in mine)} | {sum(r.failed for r in mine)} |"
        )
    return "\n".join(lines)


def main(module: ModuleType) -> int:
    parser = argparse.ArgumentParser(prog=f"_workers_{module.FRAMEWORK}.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--backend", choices=("postgresql", "mysql"), default="postgresql")
    args = parser.parse_args()
    database = Database.for_run(args.backend, DB_NAME, session_cap=100)
    os.environ.update(
        {
            **database.server_env(),
            "DJANGO_SETTINGS_MODULE": "benchmarks.queues_project.settings",
            "BENCH_VARIANT": "own",
        }
    )
    import django

    django.setup()

    def body() -> list[WorkerRound]:
        database.create()
        rounds: list[WorkerRound] = []
        for round_no in range(args.rounds):
            for variant in rotated(tuple(module.VARIANTS), round_no):
                result = module.run_round(variant, database=database, tasks=args.tasks)
                print(
                    f"round {round_no + 1} {variant}: {result.tasks_per_s:.0f} tasks/s, "
                    f"{result.opened} opened, peak {result.peak_sessions}, "
                    f"left {result.left_sessions}, failed {result.failed}",
                    flush=True,
                )
                rounds.append(result)
        return rounds

    rounds = run_harness(f"_workers_{module.FRAMEWORK}", database, body)
    if rounds is None:
        return 2
    print(
        f"\n{module.FRAMEWORK} {module.VERSION}, {args.tasks} tasks, {args.rounds} rounds, "
        f"{database.version or server_version()}\n"
    )
    print(_table(module, rounds))
    return 0
