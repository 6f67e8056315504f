"""What the benchmarks share: the database, wrk, a server process, counting and CPU.

``bench_asgi.py`` and ``bench_project.py`` both serve a Django project with
one uvicorn worker (``bench_project.py`` also one gunicorn worker) in a
subprocess, drive it with ``wrk``, and count the server's sessions from
outside while it runs; they create and drop their database and role the same
way, and their projects' settings build the database aliases and the log
setup from here. The scripts are run directly (``benchmarks/`` is then
``sys.path[0]``), so they put the repository root on
``sys.path`` themselves and import this module as ``benchmarks._common``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeVar

ROOT: Final = Path(__file__).resolve().parent.parent

_DatabaseT = TypeVar("_DatabaseT", bound="BenchDatabase")
_T = TypeVar("_T")


class HarnessError(RuntimeError):
    """The benchmark itself failed (as opposed to a configuration doing badly)."""


def rotated(items: tuple[_T, ...], round_no: int) -> tuple[_T, ...]:
    """``items`` rotated left by ``round_no``: so that none always runs first in its round."""
    shift = round_no % len(items)
    return items[shift:] + items[:shift]


def interleaved(
    rounds: int, outer: tuple[str, ...], inner: tuple[str, ...]
) -> Iterator[tuple[int, str, str]]:
    """(round, inner, outer): outer by outer, every inner for each, both rotated each round.

    The inner items a ratio compares run back to back, so the machine's drift
    hits both sides alike; rotating the order keeps any from always going first.
    """
    for round_no in range(rounds):
        inners = rotated(inner, round_no)
        for item in rotated(outer, round_no):
            for each in inners:
                yield round_no, each, item


def split_option(value: str, choices: Sequence[str], option: str) -> tuple[str, ...]:
    """A comma-separated option's items, each one of ``choices``; a clear error otherwise."""
    items = tuple(item.strip() for item in value.split(",") if item.strip())
    unknown = [item for item in items if item not in choices]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"{option}: choose from {', '.join(choices)} (comma-separated), not {value!r}"
        )
    return items


# -- the database ---------------------------------------------------------------------


@dataclass
class BenchDatabase:
    """The benchmark database and the role the servers connect as.

    Subclasses create their tables and rows in ``create()``: between
    ``_create_objects()`` and ``_created()``, through the servers' alias
    ``default`` (so the role owns what it made); ``admin`` creates and drops.
    """

    backend: str
    name: str
    user: str
    password: str
    session_cap: int
    version: str = ""

    @classmethod
    def for_run(cls: type[_DatabaseT], backend: str, db_name: str, session_cap: int) -> _DatabaseT:
        """This run's: on SQLite a file of this process's in the temporary directory."""
        if backend == "sqlite":
            name = os.path.join(tempfile.gettempdir(), f"{db_name}-{os.getpid()}.sqlite3")
        else:
            name = db_name
        return cls(
            backend=backend,
            name=name,
            user=db_name,
            # The role exists only during the run; a fresh password each time.
            password=secrets.token_hex(16),
            session_cap=session_cap,
        )

    def server_env(self) -> dict[str, str]:
        return {
            "BENCH_BACKEND": self.backend,
            "BENCH_DB_NAME": self.name,
            "BENCH_DB_USER": self.user,
            "BENCH_DB_PASSWORD": self.password,
        }

    def _create_objects(self) -> None:
        """Drop what a crashed run left, then create the role and the empty database."""
        from django.db import connections

        if self.backend == "sqlite":
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.name)
            return
        self._drop_objects()
        with connections["admin"]._nodb_cursor() as cursor:
            if self.backend == "postgresql":
                # The cap is the database's: PostgreSQL exempts superusers,
                # hence a role of our own.
                limit = self.session_cap or -1
                cursor.execute(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'")
                cursor.execute(
                    f"CREATE DATABASE {self.name} OWNER {self.user} CONNECTION LIMIT {limit}"
                )
            else:
                cursor.execute(
                    f"CREATE USER '{self.user}'@'%' IDENTIFIED BY '{self.password}' "
                    f"WITH MAX_USER_CONNECTIONS {self.session_cap}"
                )
                cursor.execute(f"CREATE DATABASE {self.name} CHARACTER SET utf8mb4")
                cursor.execute(f"GRANT ALL PRIVILEGES ON {self.name}.* TO '{self.user}'@'%'")

    def _created(self) -> None:
        """Read the server's version, then let go of every session the harness opened."""
        from django.db import connections

        self.version = server_version()
        # The harness holds no session on the database while servers run.
        connections.close_all()

    def drop(self) -> None:
        from django.db import connections

        from async_dbbridge.testing import close_monitor

        connections.close_all()
        close_monitor()
        if self.backend == "sqlite":
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.name)
            return
        self._drop_objects()

    def _drop_objects(self) -> None:
        from django.db import connections

        with connections["admin"]._nodb_cursor() as cursor:
            if self.backend == "postgresql":
                # FORCE ends the sessions of a server a crashed run left behind.
                cursor.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
                cursor.execute(f"DROP ROLE IF EXISTS {self.user}")
            else:
                cursor.execute(f"DROP DATABASE IF EXISTS {self.name}")
                cursor.execute(f"DROP USER IF EXISTS '{self.user}'@'%'")

    def count_sessions(self, pid: int) -> int:
        """The sessions on the benchmark database, counted from outside server ``pid``."""
        if self.backend == "sqlite":
            return open_files(pid, self.name)
        from async_dbbridge.testing import server_session_count

        # Every session on the database, whoever holds it: one server runs at a
        # time, and the harness holds none (its counting session is excluded).
        return server_session_count("admin")


@contextlib.contextmanager
def machine_lock(name: str, prog: str) -> Iterator[None]:
    """Hold ``<tmp>/<name>.lock`` (flock) for a run: one run per database name per machine.

    Two runs on one database name would drop each other's database and role
    (each drops what it finds first), and their loads would disturb each
    other's figures: the second waits, saying for whom.
    """
    import fcntl

    path = os.path.join(tempfile.gettempdir(), f"{name}.lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            print(f"{prog}: waiting for another run on {name} (pid {holder})", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def run_harness(prog: str, database: BenchDatabase, body: Callable[[], _T]) -> _T | None:
    """``body()`` (which creates ``database``), then drop it whatever happened.

    None, with the reason on stderr, when ``body`` failed or the database could
    not be dropped: the harness failed, whatever the figures say.
    """
    result: _T | None = None
    try:
        result = body()
    except Exception as exc:
        # A database error outside a server (creating the database, counting
        # sessions) is the harness's too: the servers' own errors are in their logs.
        print(f"{prog}: the harness failed: {exc}", file=sys.stderr)
    finally:
        try:
            database.drop()
        except Exception as exc:
            print(f"{prog}: could not drop {database.name}: {exc}", file=sys.stderr)
            result = None
    return result


def server_version(alias: str = "default") -> str:
    """The database server as a report names it: "postgresql 17.2", "sqlite 3.45.1"."""
    from django.db import connections

    conn = connections[alias]
    sql = "SELECT sqlite_version()" if conn.vendor == "sqlite" else "SELECT VERSION()"
    with conn.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    version = str(row[0]) if row else "?"
    # PostgreSQL's is a sentence ("PostgreSQL 15.2 (Debian ...) on x86_64 ..."): keep the start.
    return f"{conn.vendor} {version.split(' (')[0].removeprefix('PostgreSQL ')}"


def max_connections() -> int | None:
    """The database server's own limit on sessions (every database, every role), or None."""
    from django.db import connections

    conn = connections["admin"]
    sql = "SHOW max_connections" if conn.vendor == "postgresql" else "SELECT @@max_connections"
    with conn.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    connections["admin"].close()
    return int(row[0]) if row else None


# -- the served projects' settings ----------------------------------------------------


def databases_setting(
    backend: str, name: str, conn_max_age: int, *, pool_size: int | None, pool_needs: str
) -> dict[str, dict[str, Any]]:
    """DATABASES for a served project: ``default`` as the servers' role, ``admin`` the harness's.

    ``pool_size``: psycopg's pool of that size on ``default`` (PostgreSQL only;
    on another server the error names ``pool_needs``, the setting that asked).
    """

    def database(*, admin: bool) -> dict[str, Any]:
        if backend == "sqlite":
            return {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": name,
                "CONN_MAX_AGE": conn_max_age,
                "OPTIONS": {"timeout": 20},
            }
        if backend == "postgresql":
            default_user = os.environ.get("PGUSER", "postgres")
            settings: dict[str, Any] = {
                "ENGINE": "django.db.backends.postgresql",
                "HOST": os.environ.get("PGHOST", "127.0.0.1"),
                "PORT": os.environ.get("PGPORT", "5432"),
            }
            admin_password = os.environ.get("PGPASSWORD", "")
        elif backend == "mysql":
            default_user = os.environ.get("MYSQL_USER", "root")
            settings = {
                "ENGINE": "django.db.backends.mysql",
                "HOST": os.environ.get("MYSQL_HOST", "127.0.0.1"),
                "PORT": os.environ.get("MYSQL_PORT", "3306"),
                "OPTIONS": {"charset": "utf8mb4"},
            }
            admin_password = os.environ.get("MYSQL_PASSWORD", "")
        else:
            raise RuntimeError(
                f"BENCH_BACKEND must be sqlite, postgresql or mysql, not {backend!r}"
            )
        settings["NAME"] = name
        if admin:
            settings["USER"] = os.environ.get("BENCH_ADMIN_USER", default_user)
            settings["PASSWORD"] = os.environ.get("BENCH_ADMIN_PASSWORD", admin_password)
            return settings
        settings["USER"] = os.environ.get("BENCH_DB_USER", default_user)
        settings["PASSWORD"] = os.environ.get("BENCH_DB_PASSWORD", admin_password)
        settings["CONN_MAX_AGE"] = conn_max_age
        if pool_size is not None:
            if backend != "postgresql":
                raise RuntimeError(f"{pool_needs} needs BENCH_BACKEND=postgresql")
            settings["OPTIONS"] = {"pool": {"min_size": pool_size, "max_size": pool_size}}
        return settings

    databases = {"default": database(admin=False)}
    if backend != "sqlite":
        databases["admin"] = database(admin=True)
    return databases


def server_logging() -> dict[str, Any]:
    """LOGGING for a served project: errors to stderr, one line each.

    Without the traceback: the harness counts them (a stock server out of
    connections logs one per failed request), and a traceback per failed
    request would make the server spend its time formatting them.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"one_line": {"()": "benchmarks.asgi_project.log.OneLineErrors"}},
        "formatters": {"short": {"format": "%(levelname)s %(name)s: %(message)s"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "short",
                "filters": ["one_line"],
            }
        },
        "loggers": {
            "django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
            "async_dbbridge": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        },
    }


# -- the report's environment ---------------------------------------------------------


def software_versions(server: str) -> dict[str, Any]:
    """The report's first facts: the database ``server`` and what served it."""
    import asgiref
    import django
    import uvicorn

    import async_dbbridge

    return {
        "server": server,
        "python": platform.python_version(),
        "django": django.get_version(),
        "asgiref": asgiref.__version__,
        "uvicorn": uvicorn.__version__,
        "async_dbbridge": async_dbbridge.__version__,
        # What uvicorn's "auto" picks, and the other servers: None when not installed.
        **{name: package_version(name) for name in OPTIONAL_PACKAGES},
    }


#: Packages the report names with their versions when installed (the bench extra).
OPTIONAL_PACKAGES: Final = (
    "uvloop",
    "httptools",
    "gunicorn",
    "a2wsgi",
    "django-cors-headers",
    "whitenoise",
    "sentry-sdk",
)


def package_version(name: str) -> str | None:
    """The installed distribution's version, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def loadavg() -> str:
    """The machine's load averages (1, 5, 15 min), for the report: "1.2, 0.8, 0.5"."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


# -- counting sessions ----------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc`` (a gunicorn master and its worker).

    Empty once ``pid`` has exited; a child that exits while it is read is left out.
    """
    tree: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        tree.append(current)
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
            except (FileNotFoundError, ProcessLookupError):
                continue
    return tree


def open_files(pid: int, path: str) -> int:
    """Descriptors of process ``pid`` and its descendants on ``path``: SQLite's open
    connections (0 once it exited)."""
    target = os.path.realpath(path)
    count = 0
    for proc in process_tree(pid):
        try:
            fds = os.listdir(f"/proc/{proc}/fd")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{proc}/fd/{fd}") == target:
                    count += 1
            except OSError:
                continue
    return count


def settle(count: Callable[[], int], timeout: float, stable: float) -> int:
    """The count once it is 0, or has not changed for ``stable`` s (bounded by ``timeout``).

    A server drops a closed session a moment after the client closed it; a
    held one never goes, so waiting for 0 would only burn the timeout.
    """
    deadline = time.monotonic() + timeout
    last = count()
    since = time.monotonic()
    while last:
        now = time.monotonic()
        if now >= deadline or now - since >= stable:
            break
        time.sleep(0.02)
        current = count()
        if current != last:
            last, since = current, time.monotonic()
    return last


class Sampler:
    """Calls ``count`` from a thread of its own every ``interval`` s while the load runs."""

    def __init__(self, count: Callable[[], int], interval: float) -> None:
        self._count = count
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self.samples: list[int] = []
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while True:
                self.samples.append(self._count())
                if self._stop.wait(self._interval):
                    return
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise HarnessError(f"counting sessions failed: {self.error!r}") from self.error


# -- in-process ASGI requests ------------------------------------------------------------


def http_scope(
    path: str,
    headers: Sequence[tuple[bytes, bytes]] = ((b"host", b"bench"),),
    client: tuple[str, int] = ("127.0.0.1", 1),
) -> dict[str, Any]:
    """The ASGI scope of a plain ``GET path`` over HTTP/1.1, for driving an app in process."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "client": client,
        "server": ("127.0.0.1", 8000),
    }


# -- wrk ------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    requests_per_s: float
    non_2xx: int
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    #: Responses by HTTP status, when the run's Lua script counted them (see STATUS_MARKER).
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def ok_per_s(self) -> float:
        """Responses below 400 per second: what the server really served."""
        return (self.requests - self.non_2xx) / self.seconds if self.seconds else 0.0


_UNITS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

#: The line a wrk Lua script prints in ``done()`` with a JSON object of status -> count.
STATUS_MARKER: Final = "BENCH_STATUSES "


def parse_wrk(output: str) -> WrkResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", output)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if total is None or rate is None:
        raise HarnessError(f"cannot read wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if sockets is not None:
        errors = dict(zip(errors, (int(g) for g in sockets.groups()), strict=True))
    latency = {
        f"p{m[1]}": float(m[2]) * _UNITS[m[3]] * 1e3
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    }
    statuses: dict[str, int] = {}
    for line in output.splitlines():
        if line.startswith(STATUS_MARKER):
            statuses = {str(k): int(v) for k, v in json.loads(line[len(STATUS_MARKER) :]).items()}
    return WrkResult(
        requests=int(total[1]),
        seconds=float(total[2]) * _UNITS[total[3]],
        requests_per_s=float(rate[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=errors,
        latency_ms=latency,
        statuses=statuses,
    )


def run_wrk(
    url: str,
    seconds: float,
    *,
    connections: int,
    threads: int,
    timeout: float | None = None,
    script: Path | None = None,
    script_args: Sequence[str] = (),
) -> WrkResult:
    """One wrk run against ``url``: wrk stops after ``seconds``, and is killed 60 s past that.

    ``timeout`` is wrk's per-request socket timeout (its default, 2 s, when None).
    """
    command = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
    ]
    if timeout is not None:
        command.append(f"--timeout={max(1, round(timeout))}s")
    if script is not None:
        command += ["-s", str(script)]
    command.append(url)
    if script_args:
        command += ["--", *script_args]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"wrk did not finish: {' '.join(command[:8])} ...") from exc
    if done.returncode != 0:
        raise HarnessError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# -- the server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(
    port: int, path: str, timeout: float = 5.0, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    status, _, body = http_request(port, path, timeout, headers)
    return status, body


def http_request(
    port: int, path: str, timeout: float = 5.0, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A GET: status, headers (names lower-cased; a repeated one keeps its last value), body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        response = conn.getresponse()
        got = {name.lower(): value for name, value in response.getheaders()}
        return response.status, got, response.read()
    finally:
        conn.close()


def library_first() -> None:
    """In a served application module, before it imports the library: honour ``library_src``.

    Puts the checkout named by ``BENCH_LIBRARY_SRC`` first on ``sys.path``, so
    that ``async_dbbridge`` comes from there. Raises if the library was already
    imported (from elsewhere): the server would measure the wrong build.
    """
    src = os.environ.get("BENCH_LIBRARY_SRC")
    if not src:
        return
    if "async_dbbridge" in sys.modules:
        raise RuntimeError(f"BENCH_LIBRARY_SRC={src}: async_dbbridge was imported before it")
    sys.path.insert(0, src)


class ServerProcess:
    """One HTTP server process on 127.0.0.1, started from the repository root; output to ``log``.

    Its environment is the harness's, plus ``env``, minus ``unset``. ``library_src``
    is a checkout whose ``async_dbbridge`` the application imports instead of this
    one's: PYTHONPATH cannot say so, because uvicorn puts its ``--app-dir`` (the
    working directory, this repository) first on ``sys.path``; the served
    application module reads ``BENCH_LIBRARY_SRC`` (see `library_first`). ``cpu``
    runs the whole process under ``taskset -c cpu``. ``command(port)`` is the
    server's command line after the interpreter.
    """

    #: What the error messages call the server.
    program = "server"

    def __init__(
        self,
        label: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        log: IO[bytes],
        port: int,
        library_src: str | None = None,
        cpu: int | None = None,
        unset: Sequence[str] = (),
    ) -> None:
        self.label = label
        self.port = port
        self.log = log
        paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
        full_env = {
            **os.environ,
            **env,
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        }
        full_env.pop("BENCH_LIBRARY_SRC", None)
        if library_src is not None:
            full_env["BENCH_LIBRARY_SRC"] = library_src
        # Settings the harness did not ask for must not leak in from its own environment.
        for key in unset:
            full_env.pop(key, None)
        argv = [
            # Pinned like the wrapper's CPU_AFFINITY pins its loop and threads.
            *(["taskset", "-c", str(cpu)] if cpu is not None else []),
            sys.executable,
            *command,
        ]
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        """The process the harness started (gunicorn's master: count its tree, see
        `process_tree`)."""
        return self.process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float, path: str = "/ping/") -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise HarnessError(
                    f"{self.label}: {self.program} exited ({self.process.returncode}) before "
                    f"serving:\n{self.log_text()}"
                )
            try:
                status, _ = http_get(self.port, path, timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise HarnessError(
                    f"{self.label}: no answer within {timeout} s:\n{self.log_text()}"
                )
            time.sleep(0.05)

    def get_json(self, path: str, timeout: float = 10.0) -> dict[str, Any]:
        status, body = http_get(self.port, path, timeout=timeout)
        if status != 200:
            raise HarnessError(f"{self.label}: {path} answered {status}: {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def stop(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM (uvicorn's and gunicorn's graceful shutdown), wait; SIGKILL past ``timeout``.

        Returns the exit status (None: it had to be killed) and the seconds it took.
        """
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            code = None
        return code, time.monotonic() - started

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


class UvicornServer(ServerProcess):
    """One uvicorn process, 1 worker, no access log.

    ``loop`` and ``http``: uvicorn's ``--loop`` / ``--http`` (``auto``: uvloop and
    httptools when installed, as with ``uvicorn[standard]``; else asyncio and h11).
    """

    program = "uvicorn"

    def __init__(
        self,
        label: str,
        application: str,
        *,
        env: Mapping[str, str],
        lifespan: str,
        log: IO[bytes],
        library_src: str | None = None,
        cpu: int | None = None,
        unset: Sequence[str] = (),
        loop: str = "auto",
        http: str = "auto",
    ) -> None:
        port = free_port()
        command = [
            "-m",
            "uvicorn",
            application,
            "--workers",
            "1",
            "--no-access-log",
            "--lifespan",
            lifespan,
            "--loop",
            loop,
            "--http",
            http,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        super().__init__(
            label,
            command,
            env=env,
            log=log,
            port=port,
            library_src=library_src,
            cpu=cpu,
            unset=unset,
        )


class GunicornServer(ServerProcess):
    """One gunicorn master and 1 ``gthread`` worker of ``threads`` threads, no access log.

    ``pid`` is the master's: the worker is its child (CPU and descriptors are
    counted over the tree). SIGTERM is gunicorn's graceful stop too, bounded by
    ``--graceful-timeout``.
    """

    program = "gunicorn"

    def __init__(
        self,
        label: str,
        application: str,
        *,
        threads: int,
        env: Mapping[str, str],
        log: IO[bytes],
        library_src: str | None = None,
        cpu: int | None = None,
        unset: Sequence[str] = (),
    ) -> None:
        port = free_port()
        command = [
            "-m",
            "gunicorn",
            application,
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            str(threads),
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "10",
            "--log-level",
            "warning",
        ]
        super().__init__(
            label,
            command,
            env=env,
            log=log,
            port=port,
            library_src=library_src,
            cpu=cpu,
            unset=unset,
        )


def clean_exit(code: int | None) -> bool:
    # uvicorn re-raises the signal it shut down on, so a clean stop is -SIGTERM
    # (gunicorn's master exits 0).
    return code in (0, -signal.SIGTERM)


def error_summary(log: str) -> dict[str, int]:
    """The server's error lines, most frequent first, counted (numbers and ids folded)."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if not line.startswith(("ERROR", "WARNING", "CRITICAL")) and "Error" not in line:
            continue
        key = re.sub(r"\d+", "N", " ".join(line.split()))
        if len(key) > 170:
            # The cause ("too many clients") is at the end of a driver's message.
            key = f"{key[:70]} … {key[-90:]}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


# -- CPU accounting -------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds used so far: by the server process, by waited-for children (wrk), by all."""

    server: float
    children: float
    machine: float
    at: float

    @classmethod
    def take(cls, pid: int) -> CpuSnapshot | None:
        """``server``: ``pid`` and its descendants (a gunicorn master and its worker)."""
        try:
            tick = os.sysconf("SC_CLK_TCK")
            ticks = 0
            procs = process_tree(pid)
            if not procs:
                return None
            for proc in procs:
                with open(f"/proc/{proc}/stat") as f:
                    # Fields after the command name, which may hold spaces: state is
                    # the first, utime and stime the 12th and 13th.
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
            with open("/proc/stat") as f:
                cpu = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError, IndexError):
            return None  # not Linux, or the server is gone: no CPU figures
        # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
        busy = sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            server=ticks / tick,
            children=children.ru_utime + children.ru_stime,
            machine=busy / tick,
            at=time.monotonic(),
        )


def cpu_per_request(
    start: CpuSnapshot | None, end: CpuSnapshot | None, requests: int
) -> dict[str, float]:
    """Milliseconds of CPU per request: the server, wrk, the rest (DB server, harness, others)."""
    if start is None or end is None or not requests:
        return {}
    server = end.server - start.server
    wrk = end.children - start.children
    machine = end.machine - start.machine
    return {
        "server_ms": server / requests * 1e3,
        "wrk_ms": wrk / requests * 1e3,
        "rest_ms": max(0.0, machine - server - wrk) / requests * 1e3,
        "machine_busy": machine / ((end.at - start.at) * (os.cpu_count() or 1)),
    }
