"""The deployment an alias's connections belong to: how many processes, and what they talk to.

The connection budget (checks.py, and the ASGI wrapper's look at the server at
startup, _startup.py) compares what every process of a deployment may open
with the limit of whatever accepts those connections:

- the processes: `PROCESSES` (every host together), else the `WEB_CONCURRENCY`
  environment variable that uvicorn and gunicorn read, plus `WORKER_PROCESSES`
  (task workers); each has a pool of `POOL_SIZE` connections per alias;
- what accepts them: the server itself (`max_connections` minus the slots
  reserved for superusers), or a pooler in front of it. Behind PgBouncer the
  processes are PgBouncer's *clients*: its `max_client_conn` is their limit,
  and the server only ever sees PgBouncer's own server pool, so the server's
  `max_connections` says nothing about whether the processes fit.

A pooler is known from `POOLERS`, or seen without side effects: the backend
PID a PostgreSQL server hands a client at login (BackendKeyData) is the PID of
the backend that serves it, which `pg_backend_pid()` returns; a pooler makes
up its own key for the client, so the two differ. PgBouncer's mode and limits
are read from its admin console (the `pgbouncer` database, `SHOW` commands
only) when the user may read it (`stats_users` or `admin_users`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .conf import SETTING_NAME, BridgeSettings, Pooler

__all__ = ("Endpoint", "PoolerInfo", "Processes", "look", "processes")

#: The environment variable uvicorn, gunicorn and hypercorn-based deployments
#: (Heroku, Dokku, Render...) read for the number of worker processes.
PROCESSES_VARIABLE: Final = "WEB_CONCURRENCY"

#: PgBouncer's admin console: a virtual database of that name on the pooler's port.
ADMIN_DATABASE: Final = "pgbouncer"

#: The first PgBouncer release whose transaction mode keeps protocol-level
#: prepared statements working (`max_prepared_statements` > 0), which
#: psycopg's server-side binding uses once a query has run a few times.
PREPARED_STATEMENTS_VERSION: Final = (1, 22)


@dataclass(frozen=True)
class Processes:
    """The processes that share one alias's server (or pooler), each with its own pool."""

    #: Processes serving requests (1 when nothing says: this one).
    web: int
    #: Where `web` came from: the setting, the environment variable, or "" (unknown).
    web_source: str
    #: Task-worker processes (`WORKER_PROCESSES`).
    workers: int

    @property
    def known(self) -> bool:
        return bool(self.web_source) or self.workers > 0

    @property
    def total(self) -> int:
        return self.web + self.workers

    def sessions(self, pool_size: int) -> int:
        """The most connections they open to one alias: each process's pool is full."""
        return self.total * pool_size

    def describe(self, pool_size: int, pool_source: str) -> str:
        """E.g. "3 processes (WEB_CONCURRENCY) + 2 task-worker processes x POOL_SIZE 8 = 40"."""
        if self.web_source:
            web = f"{self.web} process{'es' if self.web != 1 else ''} ({self.web_source})"
        else:
            web = "1 process (PROCESSES and WEB_CONCURRENCY unset)"
        parts = web
        if self.workers:
            parts = (
                f"({web} + {self.workers} task-worker process"
                f"{'es' if self.workers != 1 else ''} ({SETTING_NAME}['WORKER_PROCESSES']))"
            )
        return f"{parts} x {pool_source} = {self.sessions(pool_size)}"


def processes(parsed: BridgeSettings, environ: Mapping[str, str] | None = None) -> Processes:
    """The deployment's processes, from the setting or the environment.

    Raises:
        ValueError: `WEB_CONCURRENCY` is set (and `PROCESSES` is not) but is
            not a positive integer; the message names it.
    """
    env = os.environ if environ is None else environ
    if parsed.processes is not None:
        return Processes(parsed.processes, f"{SETTING_NAME}['PROCESSES']", parsed.worker_processes)
    raw = env.get(PROCESSES_VARIABLE)
    if raw is None:
        return Processes(1, "", parsed.worker_processes)
    try:
        web = int(raw)
    except ValueError:
        web = 0
    if web < 1:
        raise ValueError(
            f"{PROCESSES_VARIABLE} is {raw!r}; expected a positive integer (worker processes)"
        )
    return Processes(web, PROCESSES_VARIABLE, parsed.worker_processes)


@dataclass(frozen=True)
class PoolerInfo:
    """What PgBouncer's admin console says, or why it could not be read."""

    #: "transaction", "session" or "statement" for this database; None: unread.
    mode: str | None = None
    version: tuple[int, ...] | None = None
    max_client_conn: int | None = None
    max_prepared_statements: int | None = None
    #: PgBouncer's server-side pool for this database (default_pool_size if not its own).
    pool_size: int | None = None
    #: Why the admin console could not be read (None when it was).
    error: str | None = None

    @property
    def keeps_prepared_statements(self) -> bool | None:
        """Whether transaction mode keeps prepared statements working; None: unknown."""
        if self.version is None or self.max_prepared_statements is None:
            return None
        return self.version >= PREPARED_STATEMENTS_VERSION and self.max_prepared_statements > 0


@dataclass(frozen=True)
class Endpoint:
    """What one alias's connections go to."""

    alias: str
    vendor: str
    #: The server's max_connections and superuser-reserved slots.
    max_connections: int
    reserved: int
    #: The backend PID the client was handed at login, and pg_backend_pid(); None
    #: off PostgreSQL or on a driver that does not expose the first.
    client_pid: int | None = None
    server_pid: int | None = None
    #: The pooler `POOLERS` names for this alias.
    declared: Pooler | None = None
    #: PgBouncer's admin console, read when a pooler is declared or seen.
    pooler: PoolerInfo | None = None

    @property
    def seen_behind_pooler(self) -> bool | None:
        """Whether the PIDs differ (a pooler or proxy); None when they could not be compared."""
        if self.client_pid is None or self.server_pid is None:
            return None
        return self.client_pid != self.server_pid

    @property
    def behind_pooler(self) -> bool:
        """Whether a pooler stands in between: what the PIDs show, else what `POOLERS` says.

        The PIDs win over the setting: a server that hands out its own backend's
        PID is answering directly (checks.py says so, W012), whatever was declared.
        """
        if self.seen_behind_pooler is not None:
            return self.seen_behind_pooler
        return self.declared is not None

    @property
    def mode(self) -> str | None:
        """The pooling mode: what PgBouncer says, else what `POOLERS` says, else None."""
        if self.pooler is not None and self.pooler.mode is not None:
            return self.pooler.mode
        if self.declared is not None:
            return self.declared.removeprefix("pgbouncer-")
        return None

    @property
    def usable(self) -> int:
        return self.max_connections - self.reserved

    def limit(self) -> tuple[int | None, str]:
        """(the most connections the processes may open, what that limit is), for messages.

        None when the alias is behind a pooler whose `max_client_conn` could not be read:
        the server's max_connections is not the processes' limit then.
        """
        server = (
            f"database {self.alias!r} (max_connections = {self.max_connections}, "
            f"{self.reserved} reserved)"
        )
        if not self.behind_pooler:
            return self.usable, server
        if self.pooler is not None and self.pooler.max_client_conn is not None:
            return (
                self.pooler.max_client_conn,
                f"the PgBouncer in front of database {self.alias!r} (max_client_conn = "
                f"{self.pooler.max_client_conn}; the server's own limit is PgBouncer's business)",
            )
        return None, f"the pooler in front of database {self.alias!r}"


def look(conn: Any, declared: Pooler | None) -> Endpoint | None:
    """Ask the server (and its pooler, if there is one) behind `conn`, a Django wrapper.

    None for a backend without a connection limit (SQLite). Read-only: one
    query on `conn`, and on a pooler only `SHOW` commands on its admin console,
    over a connection of its own, closed here.

    Raises:
        django.db.Error: the server could not be asked.
    """
    if conn.vendor not in ("postgresql", "mysql"):
        return None
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute(
                "SELECT current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int, pg_backend_pid()"
            )
            max_connections, reserved, server_pid = cursor.fetchone()
        else:
            cursor.execute("SELECT @@max_connections")
            (max_connections,), reserved, server_pid = cursor.fetchone(), 1, None
    endpoint = Endpoint(
        alias=conn.alias,
        vendor=conn.vendor,
        max_connections=int(max_connections),
        reserved=int(reserved),
        client_pid=_client_pid(conn.connection) if server_pid is not None else None,
        server_pid=None if server_pid is None else int(server_pid),
        declared=declared,
    )
    if endpoint.behind_pooler and conn.vendor == "postgresql":
        endpoint = Endpoint(**{**endpoint.__dict__, "pooler": read_pgbouncer(conn.settings_dict)})
    return endpoint


def _client_pid(raw: Any) -> int | None:
    """The backend PID the server (or a pooler) handed this driver connection at login."""
    info = getattr(raw, "info", None)  # psycopg 3
    if info is not None and isinstance(getattr(info, "backend_pid", None), int):
        return int(info.backend_pid)
    get_pid = getattr(raw, "get_backend_pid", None)  # psycopg2
    if callable(get_pid):
        pid = get_pid()
        return pid if isinstance(pid, int) else None
    return None


#: libpq connection options of an alias's OPTIONS that the admin console's
#: connection keeps (TLS and timeouts), and nothing that is Django's or psycopg's.
_LIBPQ_OPTIONS: Final = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "connect_timeout",
    "passfile",
)


def read_pgbouncer(settings_dict: Mapping[str, Any]) -> PoolerInfo:
    """PgBouncer's mode and limits for this alias's database, from its admin console.

    `SHOW VERSION`, `SHOW CONFIG` and `SHOW DATABASES` only: read-only, and
    allowed to `stats_users` as well as `admin_users`. Never raises: a pooler
    that is not PgBouncer, or refuses this user, gives a `PoolerInfo` whose
    `error` says why.
    """
    try:
        import psycopg
    except ImportError:
        return PoolerInfo(error="reading PgBouncer's admin console needs psycopg 3")
    options = settings_dict.get("OPTIONS") or {}
    params: dict[str, Any] = {
        key: value for key, value in options.items() if key in _LIBPQ_OPTIONS and value is not None
    }
    params.setdefault("connect_timeout", 5)
    for key, setting in (("host", "HOST"), ("port", "PORT"), ("user", "USER")):
        if settings_dict.get(setting):
            params[key] = str(settings_dict[setting])
    if settings_dict.get("PASSWORD"):
        params["password"] = settings_dict["PASSWORD"]
    database = str(settings_dict.get("NAME") or "")
    try:
        with psycopg.connect(dbname=ADMIN_DATABASE, autocommit=True, **params) as admin:
            version = _show(admin, "VERSION")
            config = {row[0]: row[1] for row in _show(admin, "CONFIG")}
            databases = _show(admin, "DATABASES", columns=True)
    except psycopg.Error as exc:
        return PoolerInfo(error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    info = PoolerInfo(
        version=_version(version),
        max_client_conn=_int(config.get("max_client_conn")),
        max_prepared_statements=_int(config.get("max_prepared_statements")),
        mode=config.get("pool_mode") or None,
        pool_size=_int(config.get("default_pool_size")),
    )
    # A database's own entry overrides the defaults; "*" is the fallback entry.
    rows = {row["name"]: row for row in databases}
    entry = rows.get(database) or rows.get("*")
    if entry is not None:
        info = PoolerInfo(
            version=info.version,
            max_client_conn=info.max_client_conn,
            max_prepared_statements=info.max_prepared_statements,
            mode=entry.get("pool_mode") or info.mode,
            pool_size=_int(entry.get("pool_size")) or info.pool_size,
        )
    return info


def _show(admin: Any, what: str, *, columns: bool = False) -> list[Any]:
    # The admin console speaks only the simple query protocol: libpq's
    # PQexec, not the extended protocol psycopg's cursors use.
    result = admin.pgconn.exec_(f"SHOW {what}".encode())
    if result.status != 2:  # PGRES_TUPLES_OK
        message = (result.error_message or b"").decode(errors="replace").strip()
        raise _admin_error(admin, f"SHOW {what}: {message or 'no rows'}")
    names = [result.fname(i).decode() for i in range(result.nfields)]
    rows = []
    for r in range(result.ntuples):
        values = [
            None if (v := result.get_value(r, c)) is None else v.decode()
            for c in range(result.nfields)
        ]
        rows.append(dict(zip(names, values, strict=True)) if columns else values)
    return rows


def _admin_error(admin: Any, message: str) -> Exception:
    import psycopg

    return psycopg.OperationalError(message)


def _version(rows: list[Any]) -> tuple[int, ...] | None:
    # "PgBouncer 1.18.0" (1.12+; older releases answered with a NOTICE).
    for row in rows:
        text = str(row[0])
        if text.startswith("PgBouncer "):
            digits = text.split()[1].split(".")
            try:
                return tuple(int(part) for part in digits[:3])
            except ValueError:
                return None
    return None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
