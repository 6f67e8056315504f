"""What a ``benchmarks/_workers_<framework>.py`` module needs besides its framework.

A worker subprocess with its log (`WorkerProcess`), the environment of a
worker of this project (`worker_env`), and counting on the server: sessions
opened (`sessions_opened`, PostgreSQL's ``pg_stat_database.sessions``) and
sessions left once a worker exited (`sessions_left`). They run in the
harness's process, where ``bench_workers.py`` configured Django with
``benchmarks.workers_project.settings``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO

from benchmarks._common import ROOT, BenchDatabase, HarnessError, settle

SETTINGS_MODULE = "benchmarks.workers_project.settings"


def worker_env(database: BenchDatabase, variant: str, **extra: str) -> dict[str, str]:
    """The environment of a worker of this project: the harness's, plus the database's."""
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        **database.server_env(),
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        "BENCH_VARIANT": variant,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        **extra,
    }
    return env


class WorkerProcess:
    """A worker's command in a subprocess, its output in a temporary file."""

    def __init__(self, label: str, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.label = label
        # Closed by close(), which the caller runs in a finally block.
        self.log: IO[bytes] = tempfile.TemporaryFile(prefix=f"bench-{label}-")  # noqa: SIM115
        self.process = subprocess.Popen(
            list(command), cwd=ROOT, env=dict(env), stdout=self.log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise HarnessError(
                f"{self.label}: the worker exited ({self.process.returncode}):\n{self.tail()}"
            )

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the frameworks' warm shutdown), wait; a harness error past ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise HarnessError(
                f"{self.label}: the worker did not exit within {timeout} s of SIGTERM:\n"
                f"{self.tail()}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def tail(self, chars: int = 4000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def close(self) -> None:
        self.kill()
        self.log.close()


def sessions_opened(database: BenchDatabase) -> int | None:
    """Sessions ever opened on the benchmark database (PostgreSQL; None elsewhere).

    ``pg_stat_database.sessions`` counts a session when it ends. Read from the
    ``postgres`` database (``_nodb_cursor()``, as the harness creates databases),
    so that reading opens no session on the counted one.
    """
    if database.backend != "postgresql":
        return None
    from django.db import connections

    with connections["admin"]._nodb_cursor() as cursor:
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", [database.name])
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def sessions_opened_since(database: BenchDatabase, before: int) -> int:
    """Sessions opened since ``before`` was read, once every one of them has been counted.

    Call it once the worker exited and its sessions are gone: the server
    counts a session at its end, a moment after the client left.
    """

    def read() -> int:
        value = sessions_opened(database)
        assert value is not None
        return value

    deadline = time.monotonic() + 5.0
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        current = read()
        if current == last:
            break
        last = current
    return last - before


def sessions_left(database: BenchDatabase, pid: int) -> int:
    """Sessions on the benchmark database once a worker exited (0, or what never goes)."""
    return settle(lambda: database.count_sessions(pid), timeout=10.0, stable=1.0)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its live descendants.

    Read from ``/proc`` (Linux): taken just before and just after the measured
    tasks, the difference is what the worker's processes spent on them,
    whatever else the machine was doing meanwhile. A child that exits in
    between takes its time with it (0.0 where ``/proc`` is missing).
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/stat") as f:
                # After the command name (which may hold spaces): utime, stime are the 12th, 13th.
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    pending.extend(int(child) for child in f.read().split())
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or no /proc
    return total
