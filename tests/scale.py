"""Harness of the scale tests: PgBouncer, a database of their own, app servers, load.

Real processes all the way: Debian's ``pgbouncer`` (installed by
scripts/bootstrap.sh) started on a free port with a config the test writes,
``tests.scale_project`` served by ``uvicorn --workers N`` in a subprocess (in
a network namespace for the multi-host test), HTTP load from httpx, and the
server's own counts (``pg_stat_activity``; PgBouncer's ``SHOW CLIENTS``).
Every wait is bounded polling; nothing is timed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
#: Bound on every wait for a server to start, answer or stop.
DEADLINE = 30.0
PGHOST = os.environ.get("PGHOST", "127.0.0.1")
PGPORT = int(os.environ.get("PGPORT", "5432"))
PGUSER = os.environ.get("PGUSER", "postgres")


def until(predicate: Any, what: str, timeout: float = DEADLINE, interval: float = 0.05) -> Any:
    """Bounded polling: the predicate's first truthy value, or an AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def direct(dbname: str = "postgres", port: int = PGPORT, host: str = PGHOST) -> psycopg.Connection:
    return psycopg.connect(
        host=host, port=port, user=PGUSER, dbname=dbname, autocommit=True, connect_timeout=5
    )


_SESSIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


def server_sessions(dbname: str, port: int = PGPORT) -> int:
    """Client sessions the PostgreSQL server on `port` has open on `dbname` (not this one)."""
    with direct(port=port) as conn:
        row = conn.execute(_SESSIONS, (dbname,)).fetchone()
    assert row is not None
    return int(row[0])


# -- a database of the test's own ------------------------------------------------------


@contextmanager
def scale_database(prefix: str) -> Iterator[str]:
    """A fresh, empty database on the primary, dropped after (its sessions with it)."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with direct() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with direct() as conn:
            # Only this test's database: its sessions are the test's servers'.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- PgBouncer ---------------------------------------------------------------------------


@dataclass
class PgBouncer:
    """One PgBouncer process the test started, and its admin console."""

    host: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    admin_user: str = PGUSER

    def show(self, what: str) -> list[dict[str, str | None]]:
        """`SHOW <what>` on the admin console (the simple query protocol it speaks)."""
        with psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.admin_user,
            dbname="pgbouncer",
            autocommit=True,
            connect_timeout=5,
        ) as admin:
            result = admin.pgconn.exec_(f"SHOW {what}".encode())
            assert result.status == 2, (result.error_message or b"").decode()
            names = [(result.fname(i) or b"").decode() for i in range(result.nfields)]
            return [
                {
                    name: None if (v := result.get_value(r, c)) is None else v.decode()
                    for c, name in enumerate(names)
                }
                for r in range(result.ntuples)
            ]

    def clients(self, dbname: str) -> int:
        """PgBouncer's client connections to `dbname` (its admin console's are on 'pgbouncer')."""
        return sum(1 for row in self.show("CLIENTS") if row["database"] == dbname)

    def log(self) -> str:
        return (self.directory / "pgbouncer.log").read_text(errors="replace")


def pgbouncer_missing() -> str | None:
    if not os.path.exists(PGBOUNCER):
        return (
            f"PgBouncer is not installed ({PGBOUNCER}): scripts/bootstrap.sh installs Debian's "
            "pgbouncer package"
        )
    return None


@contextmanager
def pgbouncer(
    *,
    pool_mode: str = "transaction",
    pool_size: int = 10,
    max_client_conn: int = 2000,
    listen_addr: str = "127.0.0.1",
    stats_users: str = PGUSER,
    server_host: str = PGHOST,
) -> Iterator[PgBouncer]:
    """PgBouncer in front of the primary, on a free port, with a config written here."""
    missing = pgbouncer_missing()
    assert missing is None, missing
    # Not pytest's tmp_path: PgBouncer runs as postgres, which may not enter it.
    directory = Path(tempfile.mkdtemp(prefix="dbbridge-pgbouncer-"))
    directory.chmod(0o755)
    port = free_port()
    (directory / "users.txt").write_text(f'"{PGUSER}" ""\n"dbbridge_nobody" ""\n')
    (directory / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server_host} port={PGPORT}\n"
        "[pgbouncer]\n"
        f"listen_addr = {listen_addr}\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {directory / 'users.txt'}\n"
        f"pool_mode = {pool_mode}\n"
        f"default_pool_size = {pool_size}\n"
        "reserve_pool_size = 0\n"
        f"max_client_conn = {max_client_conn}\n"
        f"stats_users = {stats_users}\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        # Django sets these at connect; PgBouncer would refuse the login otherwise.
        "ignore_startup_parameters = extra_float_digits,options\n"
    )
    command = [PGBOUNCER, str(directory / "pgbouncer.ini")]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root: it drops to the postgres user.
        command[1:1] = ["-u", "postgres"]
        shutil.chown(directory, "postgres")
        for path in directory.iterdir():
            shutil.chown(path, "postgres")
    with (directory / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    # The test reaches it on the first address it listens on (127.0.0.1 for `*`).
    first = listen_addr.split(",")[0].strip()
    host = "127.0.0.1" if first in ("*", "0.0.0.0") else first
    bouncer = PgBouncer(host, port, directory, process)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(
                f"pgbouncer exited: {(directory / 'stderr.log').read_text(errors='replace')}"
            )
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            return False
        return True

    try:
        until(ready, "PgBouncer accepts connections")
        yield bouncer
    finally:
        # SIGTERM: immediate shutdown (SIGINT would wait for every client).
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(DEADLINE)
        shutil.rmtree(directory, ignore_errors=True)


# -- app servers ---------------------------------------------------------------------------


@dataclass
class AppServer:
    """`uvicorn --workers N` serving tests.scale_project in a subprocess (maybe in a netns)."""

    url: str
    process: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> str:
        """SIGTERM, as a process manager sends it; wait for the exit; the server's log."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(DEADLINE)
                raise AssertionError(f"uvicorn did not exit on SIGTERM:\n{self.log()}") from None
        return self.log()


def scale_env(dbname: str, port: int, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.scale_project.settings",
        "PYTHONPATH": str(ROOT),
        "SCALE_DB_NAME": dbname,
        "SCALE_DB_PORT": str(port),
    }
    env.pop("WEB_CONCURRENCY", None)
    env.update(extra)
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`django-admin <args>` for the scale project, as a deploy runs it."""
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextmanager
def app_server(
    env: dict[str, str],
    log_dir: Path,
    *,
    workers: int = 2,
    host: str = "127.0.0.1",
    netns: str | None = None,
    name: str = "app",
) -> Iterator[AppServer]:
    port = free_port() if netns is None else 8000
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.scale_project.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--lifespan",
        "on",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True
        )
    server = AppServer(f"http://{host}:{port}", process, log_path)

    def answering() -> bool:
        assert process.poll() is None, f"uvicorn exited:\n{server.log()}"
        try:
            response = httpx.get(f"{server.url}/primary/", timeout=5, trust_env=False)
        except httpx.HTTPError:
            return False
        assert response.status_code == 200, response.text
        return True

    try:
        until(answering, f"uvicorn ({name}) answers", timeout=60)
        yield server
    finally:
        server.stop()


# -- load ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def non_2xx(self) -> int:
        return self.requests - sum(n for s, n in self.statuses.items() if 200 <= s < 300)


async def _load(urls: Sequence[str], requests: int, concurrency: int) -> LoadResult:
    result = LoadResult()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    todo = iter(range(requests))
    async with httpx.AsyncClient(limits=limits, timeout=DEADLINE, trust_env=False) as client:

        async def worker() -> None:
            for i in todo:
                url = urls[i % len(urls)]
                try:
                    response = await client.get(url)
                except httpx.HTTPError as exc:
                    result.errors[type(exc).__name__] += 1
                else:
                    result.statuses[response.status_code] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
    return result


def load(urls: Sequence[str], requests: int, concurrency: int) -> LoadResult:
    """`requests` GETs spread over `urls`, `concurrency` at a time."""
    return asyncio.run(_load(urls, requests, concurrency))


class ContinuousLoad(threading.Thread):
    """GETs on `paths`, `concurrency` at a time, until stopped; statuses per phase and path.

    The test moves `phase` on ("before", "stopped", "back", ...) while the load
    runs, and waits on the counts with `until`. A request counts in a phase
    when it started and ended in it; one in flight across a change counts in
    "between".
    """

    def __init__(self, base: str, paths: Sequence[str], concurrency: int) -> None:
        super().__init__(name="continuous-load", daemon=True)
        self.base, self.paths, self.concurrency = base, list(paths), concurrency
        self.phase = "start"
        self.counts: Counter[tuple[str, str, int | str]] = Counter()
        #: Requests that got no HTTP response, with how long they took and why.
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    def count(self, phase: str, path: str, status: int | str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (ph, pa, st), n in self.counts.items()
                if ph == phase and pa == path and (status is None or st == status)
            )

    def statuses(self, phase: str, path: str) -> dict[int | str, int]:
        with self._lock:
            return {st: n for (ph, pa, st), n in self.counts.items() if ph == phase and pa == path}

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.error = exc

    async def _run(self) -> None:
        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        async with httpx.AsyncClient(limits=limits, timeout=DEADLINE, trust_env=False) as client:

            async def worker(offset: int) -> None:
                i = offset
                while not self._stopping.is_set():
                    path = self.paths[i % len(self.paths)]
                    i += 1
                    phase = self.phase
                    started = time.monotonic()
                    try:
                        status: int | str = (await client.get(self.base + path)).status_code
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                        with self._lock:
                            self.failures.append(
                                f"{phase} {path} after {time.monotonic() - started:.2f}s: "
                                f"{exc!r} {exc.__cause__!r}"
                            )
                    if self.phase != phase:
                        # In flight while the test moved on: counted in neither phase.
                        phase = "between"
                    with self._lock:
                        self.counts[(phase, path, status)] += 1

            await asyncio.gather(*(worker(n) for n in range(self.concurrency)))

    def stop(self) -> None:
        self._stopping.set()
        self.join(DEADLINE + 10)
        assert not self.is_alive(), "the load did not stop"
        if self.error is not None:
            raise self.error


class Sampler(threading.Thread):
    """A server's sessions on the test's database, sampled until stopped."""

    def __init__(self, dbname: str, port: int = PGPORT) -> None:
        super().__init__(name="session-sampler", daemon=True)
        self.dbname, self.port = dbname, port
        self.samples: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection | None = None
        while not self.stopped.is_set():
            try:
                # One connection of its own, kept (a connect per sample would
                # load the server more than the test does); not counted.
                conn = conn or direct(port=self.port)
                row = conn.execute(_SESSIONS, (self.dbname,)).fetchone()
                assert row is not None
                self.samples.append(int(row[0]))
            except psycopg.OperationalError:
                conn = None  # that server is down (the replica test stops it)
            self.stopped.wait(0.02)
        if conn is not None:
            conn.close()

    def stop(self) -> list[int]:
        self.stopped.set()
        self.join(DEADLINE)
        return self.samples


# -- hosts: network namespaces -------------------------------------------------------------


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


@dataclass(frozen=True)
class Host:
    """A network namespace joined to this one by a veth pair."""

    namespace: str
    outside: str  # this namespace's end of the pair: where PgBouncer listens
    inside: str  # the host's address: where its uvicorn listens


def namespaces_unavailable() -> str | None:
    probe = f"dbbscale-{os.getpid()}-probe"
    try:
        done = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()} (needs root / CAP_SYS_ADMIN)"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


@contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """`count` namespaces with veth pairs and addresses, all removed after."""
    tag = os.getpid() % 10000
    # A /30 per host in 10.231.<tag % 250>.<4i>: test addresses, on no real network.
    net = f"10.231.{tag % 250}"
    made: list[Host] = []
    try:
        for i in range(count):
            host = Host(f"dbbscale-{os.getpid()}-h{i}", f"{net}.{4 * i + 1}", f"{net}.{4 * i + 2}")
            outside, inside = f"dbbs{tag}h{i}o", f"dbbs{tag}h{i}i"
            ip("netns", "add", host.namespace)
            made.append(host)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", host.namespace)
            ip("addr", "add", f"{host.outside}/30", "dev", outside)
            ip("link", "set", outside, "up")
            ip("-n", host.namespace, "addr", "add", f"{host.inside}/30", "dev", inside)
            ip("-n", host.namespace, "link", "set", inside, "up")
            ip("-n", host.namespace, "link", "set", "lo", "up")
        yield made
    finally:
        # Deleting a namespace deletes the pair's end inside it, and so the pair.
        for host in made:
            subprocess.run(["ip", "netns", "del", host.namespace], check=False)


@dataclass
class Round:
    """One host count's run: the load's result and what PgBouncer and the server held."""

    hosts: int
    result: LoadResult
    server_sessions: int
    clients: int

    @property
    def rate(self) -> float:
        return self.result.requests / self.result.seconds


def serve_round(
    count: int,
    dbname: str,
    bouncer: PgBouncer,
    all_hosts: list[Host],
    logs: Path,
    *,
    workers: int,
    pool_size: int,
    requests: int,
    concurrency: int,
) -> Round:
    """`count` hosts serve `requests` (to /primary/ and /slow/ on every host); then they stop."""
    sampler = Sampler(dbname)
    with ExitStack() as stack:
        servers: list[AppServer] = []
        for n, host in enumerate(all_hosts[:count]):
            env = scale_env(
                dbname,
                bouncer.port,
                SCALE_DB_HOST=host.outside,
                SCALE_POOL_SIZE=str(pool_size),
                SCALE_POOLER="pgbouncer-transaction",
                SCALE_PROCESSES=str(count * workers),
            )
            servers.append(
                stack.enter_context(
                    app_server(
                        env,
                        logs,
                        workers=workers,
                        host=host.inside,
                        netns=host.namespace,
                        name=f"{count}-hosts-{n}",
                    )
                )
            )
        urls = [f"{server.url}{path}" for server in servers for path in ("/primary/", "/slow/")]
        sampler.start()
        result = load(urls, requests, concurrency)
        clients = bouncer.clients(dbname)
        samples = sampler.stop()
        for server in servers:
            log = server.stop()
            assert "Traceback" not in log, log[-3000:]
    return Round(count, result, max(samples), clients)
