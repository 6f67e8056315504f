"""Real ASGI servers serving the project-shaped app, and what the test measures around them.

One `ServerSpec` per server configuration: its command line (after the
interpreter), how many worker processes serve, and which shutdown path it
takes (lifespan, or the library's exit hook). `RunningServer` starts one in a
session of its own (so a signal reaches the process a user or a process
manager would signal: the master), waits for it, signals it and kills what is
left if a test fails. `SessionCounter` counts the server sessions of the run's
role from a connection of its own; `run_load` sends a bounded concurrent load
while a sampler records the peak.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import httpx

ROOT: Final = Path(__file__).resolve().parents[2]
APP: Final = "benchmarks.project.asgi:application"

#: The wrapper's pool per worker process: small, so that the load fills it.
POOL_SIZE: Final = 3
#: Seconds a server gets to exit after the signal, and the sessions to reach 0 after that.
EXIT_TIMEOUT: Final = 30.0
SESSIONS_TIMEOUT: Final = 10.0

#: What the library logs once per worker when it starts, and when it closed its pools:
#: lifespan shutdown's line, or the exit hook's (no lifespan shutdown ran).
STARTED: Final = "async_dbbridge started (pid"
STOPPED: Final = "async_dbbridge stopped"
CLOSED_AT_EXIT: Final = "pooled connection(s) at process exit"
DRAINED: Final = "without lifespan shutdown: closed"

#: Lines that must never appear in a server's output.
ERROR_MARKERS: Final = (
    "Traceback",
    "Unexpected ASGI message",
    "ThreadSensitiveContext",
    "ERROR",
    "Exception in ASGI application",
)


@dataclass(frozen=True)
class ServerSpec:
    """One server configuration of the matrix."""

    name: str
    #: The command after the interpreter; ``{port}`` is filled in.
    command: tuple[str, ...]
    workers: int
    #: Whether lifespan shutdown closes the pools on SIGTERM / SIGINT (else the exit hook does).
    lifespan: tuple[bool, bool] = (True, True)
    #: The signals whose runs are in the default run (on PostgreSQL); the others
    #: need DBBRIDGE_SERVERS=all.
    fast: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    #: Whether the pools are closed by the drain chained to the server's signal handler
    #: (no lifespan, and the worker killed by its re-raised signal: no exit hook runs).
    drains: bool = False
    #: Signals on which the server leaves the library no way to close its pools: the
    #: reason (the test is an expected failure there, strict: it says when that changes).
    gaps: tuple[tuple[str, str], ...] = ()

    def argv(self, port: int) -> list[str]:
        return [sys.executable, *(part.format(port=port) for part in self.command)]


def _uvicorn(*extra: str, graceful: int = 10, workers: int = 2) -> tuple[str, ...]:
    return (
        "-m",
        "uvicorn",
        APP,
        "--workers",
        str(workers),
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--no-access-log",
        "--timeout-graceful-shutdown",
        str(graceful),
        *extra,
    )


def _gunicorn(worker_class: str) -> tuple[str, ...]:
    return (
        "-m",
        "gunicorn",
        APP,
        "--workers",
        "2",
        "--worker-class",
        worker_class,
        "--bind",
        "127.0.0.1:{port}",
        "--graceful-timeout",
        "10",
    )


_UVICORN_WORKER_SIGQUIT: Final = (
    "gunicorn + UvicornWorker on SIGINT: the master sends its workers SIGQUIT, whose "
    "handler (uvicorn-worker 0.4) does not stop uvicorn's server, so the master SIGKILLs "
    "them after --graceful-timeout; stop it with SIGTERM"
)

SERVERS: Final = (
    ServerSpec(
        "uvicorn-h11",
        _uvicorn("--loop", "asyncio", "--http", "h11", "--lifespan", "on"),
        workers=2,
        fast=("SIGTERM",),
    ),
    ServerSpec(
        "uvicorn-uvloop",
        _uvicorn("--loop", "uvloop", "--http", "httptools", "--lifespan", "on"),
        workers=2,
    ),
    # No lifespan, and no exit hook either: the master stops its workers with
    # SIGTERM, and uvicorn re-raises the signal it stopped on with the default
    # action after its shutdown, so the worker dies without running any. The
    # library's handler chained to uvicorn's drains the pools (see _signals).
    ServerSpec(
        "uvicorn-lifespan-off",
        _uvicorn("--loop", "asyncio", "--http", "h11", "--lifespan", "off"),
        workers=2,
        lifespan=(False, False),
        drains=True,
        fast=("SIGTERM",),
    ),
    ServerSpec(
        "gunicorn-uvicorn-worker",
        _gunicorn("uvicorn_worker.UvicornWorker"),
        workers=2,
        gaps=(("SIGINT", _UVICORN_WORKER_SIGQUIT),),
    ),
    # gunicorn's own ASGI worker: lifespan shutdown on SIGTERM; on SIGINT the
    # master sends SIGQUIT and the worker leaves with sys.exit(), no lifespan.
    ServerSpec(
        "gunicorn-asgi", _gunicorn("asgi"), workers=2, lifespan=(True, False), fast=("SIGINT",)
    ),
    ServerSpec(
        "granian",
        (
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--no-access-log",
            APP,
        ),
        workers=2,
    ),
    ServerSpec(
        "hypercorn",
        (
            "-m",
            "hypercorn",
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:{port}",
            "--graceful-timeout",
            "10",
            APP,
        ),
        workers=2,
    ),
    # One process (Daphne has no workers option) and no lifespan: the exit hook.
    ServerSpec(
        "daphne",
        ("-m", "daphne", "-b", "127.0.0.1", "-p", "{port}", APP),
        workers=1,
        lifespan=(False, False),
    ),
)


#: uvicorn cancelling requests still running 1 s after SIGTERM (its graceful timeout),
#: whose views wait SLOW_QUERY_SECONDS on the server.
SLOW_QUERY_SECONDS: Final = 4
GRACEFUL_TIMEOUT: Final = ServerSpec(
    "uvicorn-graceful-timeout",
    _uvicorn("--loop", "asyncio", "--http", "h11", "--lifespan", "on", graceful=1, workers=1),
    workers=1,
    env=(("BENCH_SLOW_QUERY_SECONDS", str(SLOW_QUERY_SECONDS)),),
)
#: What the library's leftovers of a cancelled request logged before it ran them to the end.
LEFTOVER_MARKERS: Final = (
    "Unexpected ASGI message",
    "ThreadSensitiveContext",
    "Task exception was never retrieved",
    "RequestAborted",
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the database ---------------------------------------------------------------------


@dataclass
class ProjectDatabase:
    """The served project's database and role (both named `name`), made by ``project_db``."""

    backend: str
    name: str
    password: str = ""
    session_keys: list[str] = field(default_factory=list)

    def _run(self, *args: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        done = subprocess.run(
            [sys.executable, "-m", "tests.servers.project_db", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"project_db {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def create(self) -> None:
        created = json.loads(self._run("create", self.backend, self.name))
        self.password = created["password"]
        self.session_keys = created["session_keys"]

    def drop(self) -> None:
        self._run("drop", self.backend, self.name, self.password)

    def server_env(self) -> dict[str, str]:
        return {
            "DJANGO_SETTINGS_MODULE": "benchmarks.project.settings",
            "BENCH_VARIANT": "wrapper",
            "BENCH_BACKEND": self.backend,
            "BENCH_DB_NAME": self.name,
            "BENCH_DB_USER": self.name,
            "BENCH_DB_PASSWORD": self.password,
        }


class SessionCounter:
    """The server sessions of one role, counted from an admin connection of its own.

    The role is the run's alone, so other engineers' sessions on the same
    server are never counted; the counting session is an admin's, not the
    role's.
    """

    def __init__(self, backend: str, role: str) -> None:
        self.backend = backend
        self.role = role
        self._lock = threading.Lock()
        if backend == "postgresql":
            import psycopg

            self._conn: Any = psycopg.connect(
                host=os.environ.get("PGHOST", "127.0.0.1"),
                port=int(os.environ.get("PGPORT", "5432")),
                user=os.environ.get("PGUSER", "postgres"),
                password=os.environ.get("PGPASSWORD", ""),
                dbname="postgres",
                autocommit=True,
            )
            self._sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
        else:
            import MySQLdb  # type: ignore[import-untyped,unused-ignore]  # no stubs installed

            self._conn = MySQLdb.connect(
                host=os.environ.get("MYSQL_HOST", "127.0.0.1"),
                port=int(os.environ.get("MYSQL_PORT", "3306")),
                user=os.environ.get("MYSQL_USER", "root"),
                passwd=os.environ.get("MYSQL_PASSWORD", ""),
            )
            self._conn.autocommit(True)
            self._sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s"

    def count(self) -> int:
        with self._lock:
            cursor = self._conn.cursor()
            try:
                cursor.execute(self._sql, [self.role])
                return int(cursor.fetchone()[0])
            finally:
                cursor.close()

    def wait_for(self, expected: int, timeout: float) -> tuple[int, float]:
        """Poll (bounded) until the count is `expected`; the last count and the seconds taken."""
        started = time.monotonic()
        while True:
            current = self.count()
            elapsed = time.monotonic() - started
            if current == expected or elapsed >= timeout:
                return current, elapsed
            time.sleep(0.05)

    def close(self) -> None:
        self._conn.close()


class MariaDBErrorLog:
    """The lines MariaDB logged about the role's aborted connections since `mark()`.

    MariaDB (``log_warnings`` >= 2, the default) logs "Aborted connection ... user:
    'role'" for every session a client dropped without COM_QUIT; the global
    ``Aborted_clients`` counter would count other engineers' too.
    """

    def __init__(self, counter: SessionCounter) -> None:
        cursor = counter._conn.cursor()
        cursor.execute("SELECT @@log_error, @@log_warnings")
        path, warnings_level = cursor.fetchone()
        cursor.close()
        self.role = counter.role
        self.path = Path(path)
        if not self.path.is_absolute():
            cursor = counter._conn.cursor()
            cursor.execute("SELECT @@datadir")
            self.path = Path(cursor.fetchone()[0]) / path
            cursor.close()
        if int(warnings_level) < 2:
            raise RuntimeError(
                f"MariaDB's log_warnings is {warnings_level}: aborted connections are not logged"
            )
        self._offset = 0

    def mark(self) -> None:
        self._offset = self.path.stat().st_size

    def aborted(self) -> list[str]:
        with self.path.open("rb") as log:
            log.seek(self._offset)
            text = log.read().decode(errors="replace")
        return [
            line
            for line in text.splitlines()
            if "Aborted connection" in line and f"user: '{self.role}'" in line
        ]


# -- a server -------------------------------------------------------------------------


class RunningServer:
    """One server (master and workers) in a session of its own; output to a temporary file."""

    def __init__(
        self, spec: ServerSpec, database: ProjectDatabase, bridge: dict[str, Any] | None = None
    ) -> None:
        self.spec = spec
        self.port = free_port()
        # Closed by kill_tree(), which serving() always calls.
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        env = {
            **os.environ,
            **database.server_env(),
            **dict(spec.env),
            "BENCH_ASYNC_DBBRIDGE": json.dumps(bridge or {"POOL_SIZE": POOL_SIZE}),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            spec.argv(self.port),
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own session: the test signals the master as a process manager
            # would, and can end the whole tree (only its own) if it fails.
            start_new_session=True,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.spec.name} exited ({self.process.returncode}) before serving:\n"
                    f"{self.output()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url("/ping/"), timeout=1.0).status_code == 200:
                    return
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.spec.name}: no answer in {timeout}s:\n{self.output()}")
            time.sleep(0.1)

    def stop(self, signum: signal.Signals, timeout: float = EXIT_TIMEOUT) -> int:
        """Send `signum` to the master; its exit status (the test fails past `timeout`)."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.spec.name} still running {timeout}s after {signum.name}:\n{self.output()}"
            ) from None

    def kill_tree(self) -> None:
        """Teardown: end whatever this server's session still runs (its workers too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self._log.close()

    def output(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def error_lines(self) -> list[str]:
        return [
            line for line in self.output().splitlines() if any(m in line for m in ERROR_MARKERS)
        ]


@contextlib.contextmanager
def serving(
    spec: ServerSpec, database: ProjectDatabase, bridge: dict[str, Any] | None = None
) -> Iterator[RunningServer]:
    server = RunningServer(spec, database, bridge)
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill_tree()


# -- load -----------------------------------------------------------------------------

#: The views the load requests in turn: a sync view with one query, the async
#: ORM around awaited I/O, a sync view whose query sleeps on the server (all
#: behind startproject's middleware, each loading the session and the user).
LOAD_PATHS: Final = ("/one-query/sync/", "/query-io-query/", "/slow-query/")


@dataclass
class LoadResult:
    statuses: Counter[int]
    peak_sessions: int
    samples: int

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)


def run_load(
    server: RunningServer,
    counter: SessionCounter,
    session_keys: Sequence[str],
    *,
    requests: int = 120,
    concurrency: int = 12,
) -> LoadResult:
    """`requests` GETs over `concurrency` clients, while a sampler records the peak sessions."""
    stop = threading.Event()
    peak = 0
    samples = 0

    def sample() -> None:
        nonlocal peak, samples
        while not stop.is_set():
            peak = max(peak, counter.count())
            samples += 1
            stop.wait(0.01)

    def client(index: int) -> Counter[int]:
        got: Counter[int] = Counter()
        cookies = {"sessionid": session_keys[index % len(session_keys)]}
        with httpx.Client(base_url=server.url(""), cookies=cookies, timeout=30.0) as http:
            for n in range(index, requests, concurrency):
                got[http.get(LOAD_PATHS[n % len(LOAD_PATHS)]).status_code] += 1
        return got

    sampler = threading.Thread(target=sample, name="session-sampler")
    sampler.start()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(client, range(concurrency)))
    finally:
        stop.set()
        sampler.join(10)
    statuses: Counter[int] = Counter()
    for result in results:
        statuses.update(result)
    return LoadResult(statuses, peak, samples)


def check_views(server: RunningServer, session_key: str) -> dict[str, tuple[int, str]]:
    """A few views, as a browser would see them: status and the start of the body."""
    seen: dict[str, tuple[int, str]] = {}
    with httpx.Client(base_url=server.url(""), timeout=30.0) as anonymous:
        for path in ("/whoami/", "/admin/login/"):
            response = anonymous.get(path)
            seen[f"anonymous {path}"] = (response.status_code, response.text[:80])
    with httpx.Client(
        base_url=server.url(""), cookies={"sessionid": session_key}, timeout=30.0
    ) as user:
        for path in ("/whoami/", "/one-query/sync/", "/one-query/async/"):
            response = user.get(path)
            seen[path] = (response.status_code, response.text[:80])
    return seen


def count_lines(text: str, marker: str) -> int:
    return sum(marker in line for line in text.splitlines())
