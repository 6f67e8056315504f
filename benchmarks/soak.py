"""Soak: a long, bounded abuse run of the bridge that checks nothing is lost or leaked.

Many asyncio tasks drive ``db_call`` on one ``DBExecutor`` with a random but
reproducible mix of operations (weights in ``KINDS``):

* ``commit`` — INSERT a row in an atomic block; its row must exist afterwards;
* ``rollback`` — INSERT in an atomic block, then raise: its row must never be visible;
* ``error`` — a query, then a non-database exception;
* ``db_error`` — invalid SQL (the pool must close that connection);
* ``leftover`` — turn autocommit off, INSERT, return: the pool rolls it back,
  closes the connection and warns; its row must never be visible;
* ``cancel`` — a ``commit`` whose awaiting task is cancelled at a random
  moment: its row may or may not exist, but never twice;
* ``kill`` — a side connection ends a random session of the pool
  (``pg_terminate_backend`` / ``KILL``).

While it runs, a sampler counts the server's sessions on the database (from its
own connection, which is not counted) — never more than the pool's workers. At
the end: no session left, every committed row present, no rolled-back row
visible, no row twice, no error that a kill does not explain (each kill may
fail at most one call), and traced memory (``tracemalloc``, started after a
warm-up) flat: growth per operation and in total under fixed limits.

Run from the repository root::

    .venv/bin/python benchmarks/soak.py --backend postgresql|mysql|sqlite
        [--ops 100000] [--seconds 900] [--workers 8] [--concurrency 32] [--seed 0]
        [--no-health-checks] [--conn-max-age 60] [--no-tracemalloc]

It creates (and drops) its own database, ``dbbridge_soak``; on SQLite a
temporary file (and no kills: there is no server). The exit status is 1 if a
check fails. ``run_soak()`` runs the same on an already configured alias (the
test suite's small variant, ``tests/test_soak.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import logging
import os
import random
import sys
import threading
import time
import tracemalloc
import warnings
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ("SoakConfig", "SoakReport", "main", "run_soak")

TABLE: Final = "dbbridge_soak_rows"
SOAK_DATABASE: Final = "dbbridge_soak"

#: Operation kinds and their weights in the mix.
KINDS: Final[dict[str, int]] = {
    "commit": 40,
    "rollback": 12,
    "error": 10,
    "db_error": 5,
    "leftover": 5,
    "cancel": 25,
    "kill": 1,
}

#: Seconds the server's session count may stay over the bound (see _judge).
SUSTAINED_SECONDS: Final = 1.0

# Outcome codes, one byte per operation (so bookkeeping never grows while the
# memory is being traced).
PENDING, OK, EXPECTED_ERROR, DISRUPTED, CANCELLED, UNEXPECTED = range(6)


class SoakRollback(Exception):
    """Raised inside an atomic block by a ``rollback`` operation."""


class SoakError(Exception):
    """The non-database exception of an ``error`` operation."""


@dataclass(frozen=True)
class SoakConfig:
    ops: int = 100_000
    seconds: float = 900.0
    workers: int = 8
    concurrency: int = 32
    seed: int = 0
    alias: str = "default"
    #: Operations before tracemalloc starts (imports, caches, first connections).
    warmup: int | None = None
    trace_memory: bool = True
    #: Memory limits after warm-up: total, and per operation.
    max_growth_bytes: int = 4 * 1024 * 1024
    max_growth_per_op: float = 32.0
    sample_interval: float = 0.02


@dataclass
class SoakReport:
    config: SoakConfig
    vendor: str = ""
    health_checks: bool = False
    conn_max_age: Any = None
    ops_done: int = 0
    elapsed: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    errors_by_type: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    leftover_warnings: int = 0
    cleanup_log_records: int = 0
    connections_opened: int = 0
    calls: int = 0
    session_samples: int = 0
    session_peak: int = 0
    session_bound: int = 0
    samples_over_bound: int = 0
    longest_over_bound: float = 0.0
    over_bound_explained_by_kills: int = 0
    sessions_left: int = -1
    committed: int = 0
    committed_missing: int = 0
    uncertain_commits_present: int = 0
    rolled_back_visible: int = 0
    duplicated_ops: int = 0
    memory_start: int = 0
    memory_end: int = 0
    memory_peak: int = 0
    memory_curve: list[tuple[int, int]] = field(default_factory=list)
    memory_top: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    #: (leftover calls that returned, leftover calls that ran): the warnings' range.
    leftover_bounds: tuple[int, int] = (0, 0)

    @property
    def memory_growth(self) -> int:
        return self.memory_end - self.memory_start

    def format(self) -> str:
        cfg = self.config
        rate = self.ops_done / self.elapsed if self.elapsed else 0.0
        lines = [
            f"## soak: {self.vendor}, {self.ops_done} operations in {self.elapsed:.1f} s "
            f"({rate:.0f} ops/s), {cfg.workers} workers, {cfg.concurrency} concurrent callers, "
            f"CONN_MAX_AGE={self.conn_max_age}, CONN_HEALTH_CHECKS={self.health_checks}, "
            f"seed {cfg.seed}",
            "",
            "mix: " + ", ".join(f"{kind} {self.kinds[kind]}" for kind in KINDS),
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            "errors: " + (", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_type.items()))),
            f"kills performed: {self.kills}; leftover transactions rescued (warnings): "
            f"{self.leftover_warnings}; cleanup records logged: {self.cleanup_log_records}",
            f"pool: {self.calls} calls, {self.connections_opened} connections opened",
            f"sessions: peak {self.session_peak} (bound {self.session_bound}) over "
            f"{self.session_samples} samples, {self.samples_over_bound} sample(s) over the bound "
            f"(longest {self.longest_over_bound * 1000:.0f} ms; "
            f"{self.over_bound_explained_by_kills} of them listing a session killed < 2 s "
            f"earlier); left at the end: {self.sessions_left}",
            f"data: {self.committed} committed calls, {self.committed_missing} missing; "
            f"{self.rolled_back_visible} rolled-back row(s) visible; {self.duplicated_ops} "
            f"duplicated; {self.uncertain_commits_present} uncertain (cancelled or disrupted) "
            "commits present",
        ]
        if cfg.trace_memory:
            per_op = self.memory_growth / max(1, self.ops_done - self._warmup())
            lines.append(
                f"traced memory after warm-up: {self.memory_start / 1024:.0f} KiB -> "
                f"{self.memory_end / 1024:.0f} KiB (growth {self.memory_growth / 1024:+.1f} KiB, "
                f"{per_op:+.2f} B/op; peak {self.memory_peak / 1024:.0f} KiB)"
            )
            if self.memory_curve:
                lines.append(
                    "  curve (ops: KiB): "
                    + ", ".join(f"{n}: {size / 1024:.0f}" for n, size in self.memory_curve)
                )
            lines += [f"  {line}" for line in self.memory_top]
        if self.unexpected:
            lines.append("unexpected errors (first ones):")
            lines += [f"  {text}" for text in self.unexpected[:10]]
        lines.append("")
        lines += [f"FAIL {problem}" for problem in self.problems] or ["PASS all checks"]
        return "\n".join(lines)

    def _warmup(self) -> int:
        return _warmup_ops(self.config)


def _warmup_ops(config: SoakConfig) -> int:
    if config.warmup is not None:
        return min(config.warmup, config.ops)
    return min(config.ops // 10, 5_000)


# -- operations (run on the pool's threads) ---------------------------------------


def _insert(op: int, kind: str) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (op, kind) VALUES (%s, %s)", [op, kind])


def op_commit(op: int, kind: str = "commit") -> None:
    from django.db import transaction

    with transaction.atomic():
        _insert(op, kind)


def op_rollback(op: int) -> None:
    from django.db import transaction

    with transaction.atomic():
        _insert(op, "rollback")
        raise SoakRollback


def op_error(op: int) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE op = %s", [op])
    raise SoakError


def op_db_error(op: int) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT no_such_column FROM dbbridge_soak_no_such_table")


def op_leftover(op: int) -> None:
    from django.db import transaction

    transaction.set_autocommit(False)
    _insert(op, "leftover")


# -- side connections (not counted, not killed) -------------------------------------


class _SideConnection:
    """A private connection that is not on the soak database (so never counted)."""

    def __init__(self, alias: str) -> None:
        from django.db import connections

        target = connections[alias]
        self.vendor = target.vendor
        self.database = str(target.settings_dict["NAME"])
        settings_dict = copy.deepcopy(target.settings_dict)
        # PostgreSQL: the maintenance database; MySQL: no default database.
        settings_dict["NAME"] = "postgres" if self.vendor == "postgresql" else ""
        self.conn: BaseDatabaseWrapper = type(target)(settings_dict, alias)
        self.conn.inc_thread_sharing()  # created here, used on the sampler/killer thread

    def sessions(self) -> list[int]:
        """The ids of the sessions on the soak database."""
        if self.vendor == "postgresql":
            sql = (
                "SELECT pid FROM pg_stat_activity WHERE datname = %s "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
        else:
            sql = (
                "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s "
                "AND ID <> CONNECTION_ID()"
            )
        with self.conn.cursor() as cursor:
            cursor.execute(sql, [self.database])
            return [int(row[0]) for row in cursor.fetchall()]

    def kill(self, session: int) -> bool:
        from django.db import DatabaseError

        with self.conn.cursor() as cursor:
            try:
                if self.vendor == "postgresql":
                    cursor.execute("SELECT pg_terminate_backend(%s)", [session])
                    return bool(cursor.fetchone()[0])
                cursor.execute(f"KILL {int(session)}")
                return True
            except DatabaseError:
                return False  # it ended by itself meanwhile

    def close(self) -> None:
        self.conn.close()


class _Sampler:
    """Counts the soak database's sessions every few milliseconds, on its own thread."""

    def __init__(self, alias: str, interval: float, bound: int) -> None:
        from django.db import connections

        self.alias = alias
        self.interval = interval
        self.bound = bound
        self.server = connections[alias].vendor != "sqlite"
        self.side = _SideConnection(alias) if self.server else None
        self.samples = 0
        self.peak = 0
        self.over = 0
        # The longest time the count stayed over the bound, in seconds.
        self.longest_over = 0.0
        self._over_since: float | None = None
        # Sessions the killer ended lately, and over-bound samples they explain.
        self.recently_killed: deque[tuple[int, float]] = deque(maxlen=64)
        self.over_explained_by_kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def sessions(self) -> list[int]:
        """Session ids on a server; on SQLite, one dummy id per open connection."""
        if self.side is not None:
            return self.side.sessions()
        from async_dbbridge.testing import server_session_count

        return [-1] * server_session_count(self.alias)

    def count(self) -> int:
        return len(self.sessions())

    def _run(self) -> None:
        while not self._stop.is_set():
            ids = self.sessions()
            n = len(ids)
            self.samples += 1
            self.peak = max(self.peak, n)
            now = time.monotonic()
            if n > self.bound:
                self.over += 1
                killed = {pid for pid, when in list(self.recently_killed) if now - when < 2.0}
                if n - len(killed.intersection(ids)) <= self.bound:
                    self.over_explained_by_kills += 1
                if self._over_since is None:
                    self._over_since = now
                self.longest_over = max(self.longest_over, now - self._over_since)
            else:
                self._over_since = None
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        if self.side is not None:
            self.side.close()


class _Counting(logging.Handler):
    """Counts the library's cleanup records without keeping them (or printing them);
    `leftover` is filled in from the warnings caught during the run."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.leftover = 0
        self.cleanup = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "cleanup" in message or "closing" in message:
            self.cleanup += 1


# -- the run ----------------------------------------------------------------------


def _create_table(alias: str) -> None:
    from django.db import connections

    conn = connections[alias]
    key = {
        "postgresql": "BIGSERIAL PRIMARY KEY",
        "mysql": "BIGINT AUTO_INCREMENT PRIMARY KEY",
    }.get(conn.vendor, "INTEGER PRIMARY KEY AUTOINCREMENT")
    engine = " ENGINE=InnoDB" if conn.vendor == "mysql" else ""
    with conn.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(
            f"CREATE TABLE {TABLE} (id {key}, op BIGINT NOT NULL, kind VARCHAR(16) NOT NULL)"
            f"{engine}"
        )
    conn.close()


def _verify(report: SoakReport, alias: str, status: bytearray, kinds: list[str]) -> None:
    from django.db import connections

    conn = connections[alias]
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT op, kind FROM {TABLE}")
        rows = cursor.fetchall()
        cursor.execute(f"DROP TABLE {TABLE}")
    conn.close()
    seen: Counter[int] = Counter()
    for op, kind in rows:
        seen[int(op)] += 1
        if kind in ("rollback", "leftover"):
            report.rolled_back_visible += 1
    report.duplicated_ops = sum(1 for n in seen.values() if n > 1)
    for op, kind in enumerate(kinds[: report.ops_done]):
        if kind == "commit" and status[op] == OK:
            report.committed += 1
            if op not in seen:
                report.committed_missing += 1
        elif kind in ("commit", "cancel") and op in seen:
            report.uncertain_commits_present += 1


def run_soak(config: SoakConfig) -> SoakReport:
    """Run the soak on ``config.alias`` (Django must be set up); return the report."""
    from django.db import DatabaseError, connections

    from async_dbbridge import DBExecutor, TransactionLeftOpenWarning

    conn = connections[config.alias]
    report = SoakReport(
        config=config,
        vendor=conn.vendor,
        health_checks=bool(conn.settings_dict["CONN_HEALTH_CHECKS"]),
        conn_max_age=conn.settings_dict["CONN_MAX_AGE"],
        session_bound=config.workers,
    )
    server = conn.vendor != "sqlite"
    rng = random.Random(config.seed)
    weights = {k: w for k, w in KINDS.items() if server or k != "kill"}
    kinds = rng.choices(list(weights), weights=list(weights.values()), k=config.ops)
    delays = [rng.randrange(4) for _ in range(config.ops)]
    status = bytearray(config.ops)
    warmup = _warmup_ops(config)
    checkpoints = {warmup + (config.ops - warmup) * i // 5 for i in range(1, 6)}

    _create_table(config.alias)
    sampler = _Sampler(config.alias, config.sample_interval, config.workers)
    # Sessions already there (a test runner's own) are not the pool's: not
    # counted against the bound, never killed.
    spared = set(sampler.side.sessions()) if sampler.side is not None else set()
    baseline = len(spared) if sampler.side is not None else sampler.count()
    sampler.bound = config.workers + baseline
    report.session_bound = sampler.bound
    killer = _SideConnection(config.alias) if server else None
    killer_thread = ThreadPoolExecutor(1, thread_name_prefix="soak-killer")
    executor = DBExecutor(max_workers=config.workers, thread_name_prefix="soak")
    library_logger = logging.getLogger("async_dbbridge")
    counting = _Counting()
    saved_propagate, saved_level = library_logger.propagate, library_logger.level
    library_logger.addHandler(counting)
    library_logger.setLevel(logging.DEBUG)
    # The warnings and records are counted, not printed: a soak makes thousands.
    library_logger.propagate = False
    tracing = False
    started = time.monotonic()

    def expect(
        op: int, error: BaseException | None, expected: tuple[type[BaseException], ...]
    ) -> None:
        if error is None:
            status[op] = OK
        elif isinstance(error, expected):
            status[op] = EXPECTED_ERROR
        elif isinstance(error, DatabaseError):
            status[op] = DISRUPTED  # explained by a kill, or not (checked against kills)
            report.errors_by_type[type(error).__name__] += 1
        else:
            status[op] = UNEXPECTED
            report.errors_by_type[type(error).__name__] += 1
            if len(report.unexpected) < 10:
                report.unexpected.append(f"op {op} ({kinds[op]}): {error!r}")

    async def one(op: int) -> None:
        from async_dbbridge import db_call

        kind = kinds[op]
        error: BaseException | None = None
        loop = asyncio.get_running_loop()
        if kind == "kill":
            assert killer is not None
            found = await loop.run_in_executor(killer_thread, killer.sessions)
            sessions = [session for session in found if session not in spared]
            if sessions:
                victim = sessions[delays[op] % len(sessions)]
                if await loop.run_in_executor(killer_thread, killer.kill, victim):
                    report.kills += 1
                    sampler.recently_killed.append((victim, time.monotonic()))
            status[op] = OK
            return
        if kind == "cancel":
            task = asyncio.ensure_future(db_call(op_commit, op, "cancel"))
            for _ in range(delays[op]):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                status[op] = CANCELLED
                return
            except Exception as exc:
                error = exc
            expect(op, error, ())
            return
        try:
            if kind == "commit":
                await db_call(op_commit, op)
            elif kind == "rollback":
                await db_call(op_rollback, op)
            elif kind == "error":
                await db_call(op_error, op)
            elif kind == "db_error":
                await db_call(op_db_error, op)
            else:
                await db_call(op_leftover, op)
        except Exception as exc:
            error = exc
        expected: dict[str, tuple[type[BaseException], ...]] = {
            "rollback": (SoakRollback,),
            "error": (SoakError,),
            "db_error": (DatabaseError,),
        }
        expect(op, error, expected.get(kind, ()))

    async def drive() -> None:
        nonlocal tracing
        from async_dbbridge import install_default_executor

        install_default_executor(executor)
        next_op = 0
        done = 0
        deadline = started + config.seconds

        async def caller() -> None:
            nonlocal next_op, done, tracing
            while next_op < config.ops and time.monotonic() < deadline:
                op = next_op
                next_op += 1
                await one(op)
                done += 1
                if config.trace_memory and done == warmup and not tracing:
                    tracing = True
                    gc.collect()
                    tracemalloc.start(8)
                    report.memory_start = tracemalloc.get_traced_memory()[0]
                elif tracing and done in checkpoints:
                    report.memory_curve.append((done, tracemalloc.get_traced_memory()[0]))

        await asyncio.gather(*(caller() for _ in range(config.concurrency)))
        report.ops_done = next_op
        if tracing:
            # Measured with the pool still up (its idle workers and their
            # connections included), nothing in flight.
            gc.collect()
            report.memory_end, report.memory_peak = tracemalloc.get_traced_memory()
            snapshot = tracemalloc.take_snapshot()
            tracemalloc.stop()
            report.memory_top = [
                f"{stat.size / 1024:.1f} KiB in {stat.count} blocks at {stat.traceback[0]}"
                for stat in snapshot.statistics("lineno")[:5]
            ]

    sampler.start()
    try:
        # The library reports a rescued transaction once, as a warning (not a log
        # record): count them. record=True swaps the process-wide showwarning, so
        # warnings issued on the pool's threads are caught too.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TransactionLeftOpenWarning)
            asyncio.run(drive())
        counting.leftover = sum(issubclass(w.category, TransactionLeftOpenWarning) for w in caught)
        report.elapsed = time.monotonic() - started
        executor.shutdown(wait=True)
        stats_now = executor.stats()
        report.calls = stats_now.calls
        report.connections_opened = sum(stats_now.connections_opened.values())
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        executor.shutdown(wait=True)
        sampler.stop()
        library_logger.removeHandler(counting)
        library_logger.propagate, library_logger.level = saved_propagate, saved_level
        if killer is not None:
            killer_thread.submit(killer.close).result()
        killer_thread.shutdown(wait=True)
    # The server drops a closed session a moment after the client closed it.
    deadline = time.monotonic() + 30
    while (left := sampler.count() - baseline) > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    report.sessions_left = left
    sampler.close()
    report.session_samples, report.session_peak = sampler.samples, sampler.peak
    report.samples_over_bound = sampler.over
    report.over_bound_explained_by_kills = sampler.over_explained_by_kills
    report.longest_over_bound = sampler.longest_over
    report.leftover_warnings = counting.leftover
    report.cleanup_log_records = counting.cleanup
    report.kinds = Counter(kinds[: report.ops_done])
    names = {
        OK: "ok",
        EXPECTED_ERROR: "expected error",
        DISRUPTED: "disrupted",
        CANCELLED: "cancelled",
        UNEXPECTED: "unexpected",
        PENDING: "not run",
    }
    report.outcomes = Counter(names[code] for code in status[: report.ops_done])
    leftover_codes = [status[op] for op in range(report.ops_done) if kinds[op] == "leftover"]
    # A call whose connection died inside an atomic block can leave autocommit
    # off too (Django could not turn it back on): the pool rescues and warns.
    report.leftover_bounds = (
        sum(1 for code in leftover_codes if code == OK),
        len(leftover_codes) + report.outcomes["disrupted"],
    )
    _verify(report, config.alias, status, kinds)
    _judge(report)
    return report


def _judge(report: SoakReport) -> None:
    cfg = report.config
    problems = report.problems
    if report.ops_done < cfg.ops and report.elapsed < cfg.seconds:
        problems.append(f"only {report.ops_done} of {cfg.ops} operations ran")
    if report.outcomes["unexpected"]:
        problems.append(f"{report.outcomes['unexpected']} unexpected error(s)")
    if report.outcomes["not run"]:
        problems.append(f"{report.outcomes['not run']} operation(s) never finished")
    if report.outcomes["disrupted"] > report.kills:
        problems.append(
            f"{report.outcomes['disrupted']} database errors, more than the "
            f"{report.kills} kills explain (each may fail at most one call)"
        )
    # A server lists a closed or killed session for a moment after the client
    # let go of it (the backend has yet to notice and exit) while the worker
    # already has its next one: that is a blip over the bound. A leaked
    # session stays.
    if report.longest_over_bound >= SUSTAINED_SECONDS:
        problems.append(
            f"sessions over the bound {report.session_bound} for "
            f"{report.longest_over_bound:.2f} s (peak {report.session_peak})"
        )
    if report.sessions_left != 0:
        problems.append(f"{report.sessions_left} session(s) left at the end")
    if report.committed_missing:
        problems.append(f"{report.committed_missing} committed call(s) lost their row")
    if report.rolled_back_visible:
        problems.append(f"{report.rolled_back_visible} rolled-back row(s) visible")
    if report.duplicated_ops:
        problems.append(f"{report.duplicated_ops} operation(s) wrote their row twice")
    low, high = report.leftover_bounds
    if not low <= report.leftover_warnings <= high:
        problems.append(
            f"{report.leftover_warnings} leftover-transaction warnings; expected one per "
            f"leftover call that returned ({low}) and at most one per leftover or "
            f"disrupted call ({high})"
        )
    if cfg.trace_memory and report.ops_done > _warmup_ops(cfg):
        growth = report.memory_growth
        per_op = growth / (report.ops_done - _warmup_ops(cfg))
        if growth > cfg.max_growth_bytes or per_op > cfg.max_growth_per_op:
            problems.append(
                f"traced memory grew by {growth / 1024:.0f} KiB ({per_op:.1f} B/op) after "
                f"warm-up; limits {cfg.max_growth_bytes / 1024:.0f} KiB, "
                f"{cfg.max_growth_per_op} B/op"
            )


# -- command line -------------------------------------------------------------------


def _configure_django(backend: str, health_checks: bool, conn_max_age: int | None) -> str:
    """Settings for a dedicated database; returns the SQLite file or ''."""
    import django
    from django.conf import settings

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests import dbconfig

    common: dict[str, Any] = {
        "CONN_MAX_AGE": conn_max_age,
        "CONN_HEALTH_CHECKS": health_checks,
    }
    database = {**dbconfig.database(backend, SOAK_DATABASE), **common}
    path = database["NAME"] if backend == "sqlite" else ""
    settings.configure(
        DATABASES={"default": database},
        INSTALLED_APPS=["async_dbbridge"],
        USE_TZ=True,
        SECRET_KEY="soak-only",
    )
    django.setup()
    return path


def _database_sql(vendor: str, quoted: str, create: bool) -> list[str]:
    # FORCE ends the sessions a crashed earlier run may have left.
    drop = f"DROP DATABASE IF EXISTS {quoted}" + (" WITH (FORCE)" if vendor == "postgresql" else "")
    if not create:
        return [drop]
    charset = " CHARACTER SET utf8mb4" if vendor == "mysql" else ""
    return [drop, f"CREATE DATABASE {quoted}{charset}"]


def _manage_database(create: bool) -> None:
    from django.db import connections

    conn = connections["default"]
    with conn._nodb_cursor() as cursor:
        for sql in _database_sql(conn.vendor, conn.ops.quote_name(SOAK_DATABASE), create):
            cursor.execute(sql)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--backend",
        default=os.environ.get("DB_BACKEND", "postgresql"),
        choices=["postgresql", "mysql", "sqlite"],
    )
    parser.add_argument("--ops", type=int, default=SoakConfig.ops, help="operations (100000)")
    parser.add_argument("--seconds", type=float, default=SoakConfig.seconds, help="time cap")
    parser.add_argument("--workers", type=int, default=SoakConfig.workers)
    parser.add_argument("--concurrency", type=int, default=SoakConfig.concurrency)
    parser.add_argument("--seed", type=int, default=SoakConfig.seed)
    parser.add_argument("--warmup", type=int, default=None, help="ops before tracing memory")
    parser.add_argument("--no-health-checks", action="store_true")
    parser.add_argument("--conn-max-age", type=int, default=60, help="CONN_MAX_AGE (60)")
    parser.add_argument("--no-tracemalloc", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ops <= 0 or args.seconds <= 0:
        raise SystemExit("--ops and --seconds must be positive")
    sqlite_path = _configure_django(args.backend, not args.no_health_checks, args.conn_max_age)
    config = SoakConfig(
        ops=args.ops,
        seconds=args.seconds,
        workers=args.workers,
        concurrency=args.concurrency,
        seed=args.seed,
        warmup=args.warmup,
        trace_memory=not args.no_tracemalloc,
    )
    if not sqlite_path:
        _manage_database(create=True)
    try:
        report = run_soak(config)
    finally:
        from django.db import connections

        from async_dbbridge.testing import close_monitor

        connections.close_all()
        close_monitor()
        if sqlite_path:
            if os.path.exists(sqlite_path):
                os.remove(sqlite_path)
        else:
            _manage_database(create=False)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
