"""Task workers: each framework's own Django handling against its async_dbbridge integration.

Imports every ``benchmarks/_workers_<framework>.py`` module present (the
contract is in ``benchmarks/_workers.py``): each starts its framework's real
worker against a real broker, in a subprocess, runs short ORM tasks on the
benchmark database and counts on the server. Variants: ``own`` (the
framework's own Django handling) and ``bridge`` (the integration), at the same
Django settings (``CONN_MAX_AGE=60``, ``CONN_HEALTH_CHECKS=True``).

The database, ``dbbridge_bench_workers``, holds the test app's table
(``tests.testapp``'s ``Item``, ten rows), migrated by the role the workers
connect as (``BenchDatabase.server_env()``; ``benchmarks/workers_project/settings.py``
reads it), capped at ``--session-cap`` sessions; it is dropped at the end.

Rounds interleave: framework by framework, its variants back to back, both
orders rotated each round (``_common.rotated``). Figures are medians over the
rounds; the ratio bridge/own is the median of the per-round ratios. The
targets, printed as PASS/FAIL (INFO where a target does not apply):

* on PostgreSQL, where the framework's own handling connects per task (at
  least 500 sessions opened per 1,000 tasks): the bridge runs ≥ 1.5x its
  tasks/s, and opens ≥ 50x fewer sessions per 1,000 tasks;
* the bridge's peak sessions never above its bound (processes x POOL_SIZE),
  0 sessions left once its worker exited, no task failed.

```console
.venv/bin/python benchmarks/bench_workers.py [--frameworks celery,...] [--rounds 3]
    [--tasks 300] [--backend postgresql|mysql] [--json FILE] [--chart PNG | --no-chart]
.venv/bin/python benchmarks/bench_workers.py --replot FILE.json [--chart PNG]
```

The exit status is 0 when the run completed, whatever the targets say; 2 if
the harness itself failed (a database that cannot be created, no framework
module that imports).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final

# Run as a script, benchmarks/ is sys.path[0]: the repository root makes the
# shared helpers (and the framework modules) importable as the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common
from benchmarks._common import ROOT, rotated, run_harness, split_option
from benchmarks._workers import WorkerRound

DB_NAME: Final = "dbbridge_bench_workers"
SETTINGS_MODULE: Final = "benchmarks.workers_project.settings"
BACKENDS: Final = ("postgresql", "mysql")

#: Own handling that opens at least this many sessions per 1,000 tasks "connects per task".
PER_TASK: Final = 500.0
SPEED_TARGET: Final = 1.5
OPENED_TARGET: Final = 50.0


# -- the framework modules ------------------------------------------------------------


@dataclass(frozen=True)
class Framework:
    name: str
    module: ModuleType
    variants: tuple[str, ...]
    version: str | None


def discover() -> tuple[dict[str, Framework], dict[str, str]]:
    """Every ``benchmarks/_workers_*.py``: (importable ones by name, unusable ones and why)."""
    found: dict[str, Framework] = {}
    unusable: dict[str, str] = {}
    for path in sorted((ROOT / "benchmarks").glob("_workers_*.py")):
        module_name = f"benchmarks.{path.stem}"
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # Its framework is not installed (an optional extra).
            unusable[path.stem.removeprefix("_workers_")] = f"cannot import: {exc}"
            continue
        name = getattr(module, "FRAMEWORK", None)
        variants = tuple(getattr(module, "VARIANTS", ()))
        if not isinstance(name, str) or not callable(getattr(module, "run_round", None)):
            unusable[path.stem] = "no FRAMEWORK or run_round (see benchmarks/_workers.py)"
            continue
        if not {"own", "bridge"} <= set(variants):
            unusable[name] = f"VARIANTS must include 'own' and 'bridge', not {variants!r}"
            continue
        version = getattr(module, "VERSION", None)
        found[name] = Framework(name, module, variants, str(version) if version else None)
    return found, unusable


# -- the database -----------------------------------------------------------------------


class Database(_common.BenchDatabase):
    """The benchmark database: the test app's table, ten rows."""

    def create(self) -> None:
        from django.core.management import call_command

        from tests.testapp.models import Item

        self._create_objects()
        call_command("migrate", "testapp", database="default", interactive=False, verbosity=0)
        Item.objects.bulk_create(Item(pk=n, name=f"item {n}", value=n) for n in range(1, 11))
        self._created()


def _setup_django(database: Database) -> None:
    os.environ.update(
        {
            **database.server_env(),
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            # The harness is no worker (the settings of neither variant matter to it).
            "BENCH_VARIANT": "own",
        }
    )
    import django

    django.setup()


# -- the report -------------------------------------------------------------------------


@dataclass
class Summary:
    framework: str
    variant: str
    rounds: int
    tasks: int
    tasks_per_s: float
    tasks_per_s_min: float
    tasks_per_s_max: float
    #: Median of the per-round ratios to the framework's "own" variant (1.0 for "own").
    ratio: float | None
    opened_per_1000: float
    peak_sessions: int
    bound: int
    left_sessions: int
    failed: int
    #: Median CPU milliseconds the worker's processes spent per task (None: not measured).
    cpu_ms_per_task: float | None = None


@dataclass
class Check:
    framework: str
    status: str  # PASS, FAIL, INFO
    text: str


@dataclass
class Report:
    environment: dict[str, Any]
    config: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    summary: list[Summary] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    #: Frameworks whose rounds failed, with the error.
    errors: dict[str, str] = field(default_factory=dict)


def _rounds_of(
    rounds: Sequence[tuple[int, WorkerRound]], framework: str, variant: str
) -> dict[int, WorkerRound]:
    return {n: r for n, r in rounds if r.framework == framework and r.variant == variant}


def _median_or_none(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(
    rounds: Sequence[tuple[int, WorkerRound]], frameworks: dict[str, tuple[str, ...]]
) -> list[Summary]:
    """Per framework and variant; ``rounds``: (round number, figures)."""
    summary: list[Summary] = []
    for name, variants in frameworks.items():
        own = _rounds_of(rounds, name, "own")
        for variant in variants:
            by_round = _rounds_of(rounds, name, variant)
            if not by_round:
                continue
            mine = list(by_round.values())
            rates = [r.tasks_per_s for r in mine]
            # Within a round both variants ran back to back: the ratio of that round.
            ratios = [
                r.tasks_per_s / own[n].tasks_per_s
                for n, r in by_round.items()
                if n in own and own[n].tasks_per_s > 0
            ]
            summary.append(
                Summary(
                    framework=name,
                    variant=variant,
                    rounds=len(mine),
                    tasks=mine[0].tasks,
                    tasks_per_s=statistics.median(rates),
                    tasks_per_s_min=min(rates),
                    tasks_per_s_max=max(rates),
                    ratio=statistics.median(ratios) if ratios else None,
                    opened_per_1000=statistics.median(r.opened_per_1000 for r in mine),
                    peak_sessions=max(r.peak_sessions for r in mine),
                    bound=mine[0].bound,
                    left_sessions=max(r.left_sessions for r in mine),
                    failed=sum(r.failed for r in mine),
                    cpu_ms_per_task=_median_or_none(r.cpu_ms_per_task for r in mine),
                )
            )
    return summary


def check_targets(summary: Sequence[Summary], errors: dict[str, str], backend: str) -> list[Check]:
    checks: list[Check] = []
    by_key = {(s.framework, s.variant): s for s in summary}
    for name in dict.fromkeys(s.framework for s in summary) | dict.fromkeys(errors):
        if name in errors:
            checks.append(Check(name, "FAIL", f"the benchmark failed: {errors[name]}"))
            continue
        own, bridge = by_key.get((name, "own")), by_key.get((name, "bridge"))
        if own is None or bridge is None:
            checks.append(Check(name, "FAIL", "own and bridge did not both run"))
            continue
        # The speed and connection targets are PostgreSQL's, where a session costs a
        # server process; on MariaDB connecting is cheap (figures, no target).
        per_task = own.opened_per_1000 >= PER_TASK and backend == "postgresql"
        applies = "PASS" if per_task else "INFO"
        if per_task:
            why = ""
        elif backend != "postgresql":
            why = " (a PostgreSQL target)"
        else:
            why = " (own does not connect per task: no target)"
        ratio = bridge.ratio or 0.0
        checks.append(
            Check(
                name,
                applies if ratio >= SPEED_TARGET or not per_task else "FAIL",
                f"tasks/s bridge/own {ratio:.2f}x (target >= {SPEED_TARGET}x){why}",
            )
        )
        fewer = own.opened_per_1000 / bridge.opened_per_1000 if bridge.opened_per_1000 else None
        fewer_text = "no session opened by the bridge" if fewer is None else f"{fewer:.0f}x"
        checks.append(
            Check(
                name,
                applies if fewer is None or fewer >= OPENED_TARGET or not per_task else "FAIL",
                f"sessions opened per 1,000 tasks: own {own.opened_per_1000:.1f}, bridge "
                f"{bridge.opened_per_1000:.1f}: {fewer_text} fewer "
                f"(target >= {OPENED_TARGET:.0f}x){why}",
            )
        )
        if own.cpu_ms_per_task and bridge.cpu_ms_per_task:
            checks.append(
                Check(
                    name,
                    "INFO",
                    f"worker CPU per task: own {own.cpu_ms_per_task:.2f} ms, bridge "
                    f"{bridge.cpu_ms_per_task:.2f} ms "
                    f"({own.cpu_ms_per_task / bridge.cpu_ms_per_task:.2f}x less)",
                )
            )
        checks.append(
            Check(
                name,
                "PASS" if bridge.peak_sessions <= bridge.bound else "FAIL",
                f"bridge peak sessions {bridge.peak_sessions} <= bound {bridge.bound}",
            )
        )
        checks.append(
            Check(
                name,
                "PASS" if bridge.left_sessions == 0 else "FAIL",
                f"bridge sessions left after the worker exited: {bridge.left_sessions}",
            )
        )
        checks.append(
            Check(
                name,
                "PASS" if bridge.failed == 0 else "FAIL",
                f"bridge tasks failed: {bridge.failed} (own: {own.failed})",
            )
        )
    return checks


def markdown_table(summary: Sequence[Summary], framework: str) -> str:
    lines = [
        "| variant | tasks/s (min-max) | bridge/own | opened per 1,000 tasks | worker CPU "
        "ms/task | peak sessions | bound | left | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        if s.framework != framework:
            continue
        ratio = "" if s.ratio is None else f"{s.ratio:.2f}x"
        cpu = "-" if s.cpu_ms_per_task is None else f"{s.cpu_ms_per_task:.2f}"
        lines.append(
            f"| {s.variant} | {s.tasks_per_s:,.0f} ({s.tasks_per_s_min:,.0f}-"
            f"{s.tasks_per_s_max:,.0f}) | {ratio} | {s.opened_per_1000:,.1f} | {cpu} | "
            f"{s.peak_sessions} | {s.bound} | {s.left_sessions} | {s.failed} |"
        )
    return "\n".join(lines)


def print_report(report: Report) -> None:
    env, config = report.environment, report.config
    print(
        f"\nbench_workers — {env['server']}, Python {env['python']}, Django {env['django']}, "
        f"async_dbbridge {env['async_dbbridge']}, {env['cpus']} CPUs, "
        f"{config['rounds']} round(s) x {config['tasks']} tasks "
        f"(load {env['loadavg_before']} -> {env.get('loadavg_after', '?')})"
    )
    for name in dict.fromkeys(s.framework for s in report.summary):
        version = env["frameworks"].get(name)
        print(f"\n{name}{f' {version}' if version else ''}\n")
        print(markdown_table(report.summary, name))
    for name, error in report.errors.items():
        print(f"\n{name}: FAILED: {error}")
    print()
    for check in report.checks:
        print(f"{check.status:4}  {check.framework}: {check.text}")


_COLORS: Final = {"own": "#9e9e9e", "bridge": "#3aa675"}


def write_chart(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(s.framework for s in report.summary))
    if not names:
        return
    width = max(5.0, 2.8 * len(names) + 1.2)
    fig, axes = plt.subplots(
        2, len(names), figsize=(width, 6.4), squeeze=False, height_ratios=(3, 2)
    )
    for col, name in enumerate(names):
        rows = [s for s in report.summary if s.framework == name]
        xs = list(range(len(rows)))
        colors = [_COLORS.get(s.variant, "#5b8fd9") for s in rows]
        rate_ax, opened_ax = axes[0][col], axes[1][col]
        rate_ax.bar(
            xs,
            [s.tasks_per_s for s in rows],
            color=colors,
            yerr=[
                [s.tasks_per_s - s.tasks_per_s_min for s in rows],
                [s.tasks_per_s_max - s.tasks_per_s for s in rows],
            ],
            capsize=3,
        )
        for x, s in zip(xs, rows, strict=True):
            ratio = "" if s.ratio is None or s.variant == "own" else f"\n{s.ratio:.2f}x"
            cpu = "" if s.cpu_ms_per_task is None else f"\nCPU {s.cpu_ms_per_task:.1f} ms/task"
            rate_ax.annotate(
                f"{s.tasks_per_s:,.0f}{ratio}{cpu}",
                (x, s.tasks_per_s_max),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        version = report.environment["frameworks"].get(name)
        rate_ax.set_title(f"{name}{f' {version}' if version else ''}", fontsize=9)
        rate_ax.margins(y=0.3)
        opened = [max(s.opened_per_1000, 0.1) for s in rows]
        opened_ax.bar(xs, opened, color=colors)
        opened_ax.set_yscale("log")
        for x, s in zip(xs, rows, strict=True):
            opened_ax.annotate(
                f"{s.opened_per_1000:,.1f}\npeak {s.peak_sessions}/{s.bound}",
                (x, max(s.opened_per_1000, 0.1)),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
        opened_ax.margins(y=0.5)
        for ax in (rate_ax, opened_ax):
            ax.set_xticks(xs, [s.variant for s in rows], fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
    axes[0][0].set_ylabel("tasks/s, median (min-max)")
    axes[1][0].set_ylabel("sessions opened\nper 1,000 tasks (log)")
    env, config = report.environment, report.config
    fig.suptitle(
        f"bench_workers — {env['server']}, {env['cpus']} CPUs\n"
        f"{config['rounds']} round(s) x {config['tasks']} short ORM tasks",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------


def _default_chart(backend: str) -> Path:
    return ROOT / "docs" / "img" / f"bench_workers_{backend}.png"


def replot(source: Path, chart: Path | None) -> Path:
    """Redraw the chart of an earlier run from its JSON: no workers, no database."""
    data = json.loads(source.read_text())
    report = Report(
        environment=data["environment"],
        config=data["config"],
        summary=[Summary(**item) for item in data["summary"]],
    )
    path = chart or _default_chart(report.config["backend"])
    write_chart(report, path)
    return path


def parse_args(
    argv: Sequence[str] | None, available: Sequence[str], unusable: dict[str, str]
) -> tuple[argparse.Namespace, tuple[str, ...]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--frameworks",
        help=f"comma-separated, from {', '.join(available) or '(none found)'} (default: all)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--tasks", type=int, default=300, help="tasks per measured run (300)")
    parser.add_argument("--backend", choices=BACKENDS, default="postgresql")
    parser.add_argument(
        "--session-cap",
        type=int,
        default=64,
        help="most sessions the workers' role may hold (64; 0: no cap)",
    )
    parser.add_argument(
        "--json", metavar="FILE", help="raw results (default: bench_workers_<backend>.json)"
    )
    parser.add_argument(
        "--chart",
        metavar="PNG",
        help="where to write the chart (default: docs/img/bench_workers_<backend>.png)",
    )
    parser.add_argument("--no-chart", action="store_true", help="write no chart")
    parser.add_argument(
        "--replot", metavar="JSON", help="only redraw the chart from an earlier run's JSON"
    )
    args = parser.parse_args(argv)
    if args.replot:
        return args, ()
    if not available:
        parser.error("no benchmarks/_workers_<framework>.py module could be imported")
    for name in (args.frameworks or "").split(","):
        if name.strip() in unusable:
            parser.error(f"--frameworks: {name.strip()}: {unusable[name.strip()]}")
    try:
        frameworks = (
            tuple(available)
            if args.frameworks is None
            else split_option(args.frameworks, available, "--frameworks")
        )
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.rounds < 1 or args.tasks < 1:
        parser.error("--rounds and --tasks must be at least 1")
    if args.session_cap < 0:
        parser.error("--session-cap must be 0 or more")
    return args, frameworks


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def main(argv: Sequence[str] | None = None) -> int:
    found, unusable = discover()
    args, names = parse_args(argv, sorted(found), unusable)
    if args.replot:
        print(f"chart: {replot(Path(args.replot), Path(args.chart) if args.chart else None)}")
        return 0
    for name, why in unusable.items():
        print(f"bench_workers: skipping {name}: {why}", file=sys.stderr)
    frameworks = {name: found[name] for name in names}
    database = Database.for_run(args.backend, DB_NAME, args.session_cap)
    _setup_django(database)
    started = time.monotonic()
    config = {
        "backend": args.backend,
        "frameworks": list(names),
        "rounds": args.rounds,
        "tasks": args.tasks,
        "session_cap": args.session_cap,
    }

    def run() -> Report:
        database.create()
        report = Report(
            environment={
                **_common.software_versions(database.version),
                "frameworks": {f.name: f.version for f in frameworks.values()},
                "cpus": os.cpu_count(),
                "loadavg_before": _common.loadavg(),
            },
            config=config,
        )
        rounds: list[tuple[int, WorkerRound]] = []
        # Framework by framework, its variants back to back, both orders rotated each round.
        for round_no in range(args.rounds):
            for name in rotated(names, round_no):
                if name in report.errors:
                    continue
                framework = frameworks[name]
                for variant in rotated(framework.variants, round_no):
                    try:
                        result = framework.module.run_round(
                            variant, database=database, tasks=args.tasks
                        )
                    except Exception as exc:
                        # One framework failing must not cost the others their figures.
                        traceback.print_exc()
                        report.errors[name] = f"round {round_no + 1}, {variant}: {exc!r}"
                        break
                    print(
                        f"[round {round_no + 1}] {name:10} {variant:8} "
                        f"{result.tasks_per_s:8,.0f} tasks/s  opened {result.opened:5}  "
                        f"cpu/task {_ms(result.cpu_ms_per_task)}  "
                        f"peak {result.peak_sessions}/{result.bound}  left "
                        f"{result.left_sessions}  failed {result.failed}",
                        file=sys.stderr,
                    )
                    rounds.append((round_no, result))
                    report.rounds.append({**result.as_dict(), "round": round_no})
        report.summary = summarize(rounds, {n: frameworks[n].variants for n in names})
        return report

    report = run_harness("bench_workers", database, run)
    if report is None:
        return 2
    report.environment["loadavg_after"] = _common.loadavg()
    report.environment["seconds"] = round(time.monotonic() - started, 1)
    report.checks = check_targets(report.summary, report.errors, args.backend)
    print_report(report)
    out = Path(args.json or f"bench_workers_{args.backend}.json")
    out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"\nraw results: {out}")
    if not args.no_chart:
        chart = Path(args.chart) if args.chart else _default_chart(args.backend)
        try:
            write_chart(report, chart)
            print(f"chart: {chart}")
        except ImportError as exc:
            # The results are in the JSON: --replot draws the chart where matplotlib is.
            print(f"no chart ({exc}): use --replot with the JSON where matplotlib is installed")
    print(f"({report.environment['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
