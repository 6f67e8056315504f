"""What the task workers' tests share: a worker subprocess, rows, sessions.

A test starts the framework's real worker CLI as a subprocess on the test
database (`worker_env`), enqueues tasks of `tests.integrations.workload`
through the real broker, and reads the outcome from the database: one row per
task that ran, naming the process and the server session that ran it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from django.db import connections

from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import kill_backend
from tests.settings import BACKEND
from tests.testapp.models import Item

ROOT = Path(__file__).resolve().parents[2]

#: Seconds a worker may take to start, to drain a burst, to stop after SIGTERM.
START_TIMEOUT = 30.0
DRAIN_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

#: Short ORM tasks per burst (the acceptance asks for at least 500).
TASKS = 500


def unique_name(framework: str) -> str:
    """Queue names of this test process: other checkouts share the brokers."""
    return f"dbbridge-{framework}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


def worker_env(variant: str, *, pool_size: int = 2, **extra: str) -> dict[str, str]:
    """The environment of a worker on the test process's own test database."""
    env = {
        **os.environ,
        "DBBRIDGE_WORKER_BACKEND": BACKEND,
        "DBBRIDGE_WORKER_DB": str(connections["default"].settings_dict["NAME"]),
        "DBBRIDGE_WORKER_VARIANT": variant,
        "DBBRIDGE_WORKER_POOL_SIZE": str(pool_size),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        **extra,
    }
    # Warnings are errors in the test process only; a worker logs them.
    env.pop("PYTHONWARNINGS", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


def bin_path(name: str) -> str:
    """A console script of the running venv (the framework's own CLI)."""
    return str(Path(sys.executable).with_name(name))


class Worker:
    """The framework's worker CLI as a subprocess; SIGTERM and a bounded wait to stop it.

    Its output goes to a file, shown when the test fails. Started in a
    session of its own: if it does not stop in time, its whole process group
    is killed (a worker's children must not outlive the test).
    """

    def __init__(
        self, command: Sequence[str], env: dict[str, str], *, sigterm_again: float | None = None
    ) -> None:
        self.command = list(command)
        self.env = env
        self.sigterm_again = sigterm_again
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115  # closed in __exit__
            prefix="dbbridge-worker-", suffix=".log", delete=False
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def __enter__(self) -> Worker:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the worker exited ({self.process.returncode}):\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self) -> int:
        """SIGTERM, then wait; a worker that does not exit in time fails the test.

        With ``sigterm_again``, a worker still there that many seconds after
        the first SIGTERM gets a second one (the framework's cold shutdown).
        """
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            if self.sigterm_again is not None:
                try:
                    self.returncode = self.process.wait(self.sigterm_again)
                    return self.returncode
                except subprocess.TimeoutExpired:
                    self.process.send_signal(signal.SIGTERM)
            self.returncode = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            raise AssertionError(
                f"the worker did not exit within {STOP_TIMEOUT}s of SIGTERM:\n{self.tail()}"
            ) from None
        return self.returncode

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.returncode is None and self.process is not None:
                if exc is None:
                    self.stop()
                else:
                    # The test failed: stop whatever runs, and show the log.
                    with _suppress():
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(10)
        finally:
            if exc is not None:
                sys.stderr.write(f"--- worker output ({' '.join(self.command)}) ---\n")
                sys.stderr.write(self.tail(200) + "\n")
            self.log.close()
            os.unlink(self.log.name)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> bool:
        return isinstance(exc_info[1], ProcessLookupError)


@dataclass(frozen=True)
class Row:
    kind: str
    pid: int
    backend: int
    value: int


def rows(kind: str | None = None) -> list[Row]:
    """The rows tasks wrote (committed ones: the test reads in autocommit)."""
    found = []
    for name, value in Item.objects.values_list("name", "value"):
        row_kind, pid, backend = name.split(":")
        if kind is None or row_kind == kind:
            found.append(Row(row_kind, int(pid), int(backend), value))
    return found


def wait_for_rows(
    n: int, worker: Worker, *, kind: str = "task", timeout: float = DRAIN_TIMEOUT
) -> list[Row]:
    """Bounded poll until ``n`` rows of ``kind`` are there (the tasks ran)."""
    deadline = time.monotonic() + timeout
    while True:
        count = Item.objects.filter(name__startswith=f"{kind}:").count()
        if count >= n:
            return rows(kind)
        worker.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{count} of {n} {kind!r} tasks done after {timeout}s:\n{worker.tail()}"
            )
        time.sleep(0.02)


class SessionSampler(threading.Thread):
    """Samples the server's session count on the test database until stopped.

    The count includes the test's own session (it polls the rows), hence
    `peak_of_workers()`.
    """

    def __init__(self) -> None:
        super().__init__(name="session-sampler", daemon=True)
        self.samples: list[int] = []
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    def __enter__(self) -> SessionSampler:
        # The test's session, open from the first sample to the last.
        connections["default"].ensure_connection()
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        self.join(10)
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                self.samples.append(server_session_count())
                self.stopped.wait(0.005)
        except BaseException as exc:
            self.error = exc

    def peak_of_workers(self) -> int:
        # The test process holds one session (its polling) throughout.
        return max(self.samples, default=1) - 1


def live_backends(ids: set[int]) -> set[int]:
    """Which of these server sessions still exist."""
    conn = connections["default"]
    if not ids:
        return set()
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", [list(ids)])
        else:
            marks = ", ".join(["%s"] * len(ids))
            cursor.execute(
                f"SELECT ID FROM information_schema.PROCESSLIST WHERE ID IN ({marks})", list(ids)
            )
        return {int(row[0]) for row in cursor.fetchall()}


def kill_sessions(ids: set[int]) -> int:
    """End these sessions from the server side (those still there); how many were."""
    alive = live_backends(ids)
    for backend in alive:
        kill_backend("default", backend)
    return len(alive)


def settled_sessions(expected: int | Callable[[int], bool] = 0, timeout: float = 10.0) -> int:
    """Sessions on the test database (the test's own closed first), once they match."""
    connections["default"].close()
    return wait_for_server_sessions("default", expected, timeout=timeout)


class Journal:
    """The file where `tests.integrations.workload.journaled` tasks append their outcome."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="dbbridge-journal-", suffix=".txt")
        os.close(fd)

    def close(self) -> None:
        os.unlink(self.path)

    def entries(self) -> list[tuple[str, int, str]]:
        with open(self.path) as file:
            return [
                (name, int(n), outcome)
                for name, n, outcome in (line.split() for line in file if line.endswith("\n"))
            ]

    def wait(
        self, count: int, worker: Worker, timeout: float = DRAIN_TIMEOUT
    ) -> list[tuple[str, int, str]]:
        """Bounded poll until ``count`` tasks reported their outcome."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.entries()
            if len(entries) >= count:
                return entries
            worker.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(entries)} of {count} tasks reported after {timeout}s:\n{worker.tail()}"
                )
            time.sleep(0.01)

    def outcome(self, name: str, n: int, worker: Worker, timeout: float = DRAIN_TIMEOUT) -> str:
        """The outcome of task ``name(n)``, once it reported it."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.entries():
                if entry[:2] == (name, n):
                    return entry[2]
            worker.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{name}({n}) did not report after {timeout}s:\n{worker.tail()}"
                )
            time.sleep(0.01)


Send = Callable[..., None]


@dataclass
class Burst:
    #: The workers' peak of server sessions, sampled during the burst.
    peak: int
    #: The server sessions the tasks ran on (from their rows).
    used: set[int]
    #: Tasks that reported "ok" (of TASKS, plus 50 after the kill when asked).
    ok: int
    #: Their rows (committed work).
    committed: int


def run_burst(
    worker: Worker,
    journal: Journal,
    send: Send,
    *,
    kill: bool = True,
    tasks: int = TASKS,
    task: str = "record",
) -> Burst:
    """``tasks`` short ORM tasks (``task``: ``record``, or ``record_slowly`` where every
    worker thread must take part); then (``kill``) every session they used ended from
    the server while the workers idle, and 50 more tasks.

    Runs inside the worker's ``with`` block; the caller stops the worker.
    """
    with SessionSampler() as sampler:
        for n in range(tasks):
            send(task, n)
        journal.wait(tasks, worker)
        used = {row.backend for row in wait_for_rows(tasks, worker)}
    total = tasks
    if kill:
        # Sessions were really open, and now they are gone; the next tasks run at
        # once (the pool checks every checkout, not only one that idled a second).
        assert kill_sessions(used) >= 1
        for n in range(tasks, tasks + 50):
            send("record", n)
        total += 50
    entries = journal.wait(total, worker)
    return Burst(
        peak=sampler.peak_of_workers(),
        used=used,
        ok=[outcome for _, _, outcome in entries].count("ok"),
        committed=len(rows("task")),
    )


def run_sequence(worker: Worker, journal: Journal, send: Send) -> dict[str, object]:
    """On a single worker thread: a database error and a transaction left open, each
    followed by an ordinary task; what the next task got.

    Runs inside the worker's ``with`` block and stops the worker.
    """
    send("record", 1)
    journal.outcome("record", 1, worker)
    send("fail_with_database_error", 2)
    error = journal.outcome("fail_with_database_error", 2, worker)
    send("record", 3)
    after_error = journal.outcome("record", 3, worker)
    send("leave_transaction_open", 4)
    journal.outcome("leave_transaction_open", 4, worker)
    send("record", 5)
    after_leftover = journal.outcome("record", 5, worker)
    worker.stop()
    by_value = {row.value: row for row in rows()}
    return {
        "error": error,
        "after_error": after_error,
        "error_session_reused": 3 in by_value and by_value[3].backend == by_value[2].backend,
        "after_leftover": after_leftover,
        "leftover_committed": any(row.kind == "left-open" for row in rows()),
        "row_after_leftover": 5 in by_value,
        "warned": "TransactionLeftOpenWarning" in worker.output(),
        "left": settled_sessions(0),
    }


#: What `run_sequence` sees with the integration, whatever the framework.
CLEAN_SEQUENCE: dict[str, object] = {
    "error": "ProgrammingError",
    "after_error": "ok",
    "error_session_reused": False,  # closed after the error: a fresh session
    "after_leftover": "ok",
    "leftover_committed": False,  # rolled back, with a warning
    "row_after_leftover": True,
    "warned": True,
    "left": 0,
}


def parent_row() -> Row:
    """The session the worker's parent process opened (`workload.parent_session`)."""
    (row,) = rows("parent")
    return row
