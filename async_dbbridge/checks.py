"""System checks for the `ASYNC_DBBRIDGE` setting and the databases it serves.

The connections they reason about: under the ASGI wrapper (asgiref >= 3.13)
requests run on request threads, and those threads and the process-wide
bridge's workers take their connections from one bounded pool per alias per
process (`POOL_SIZE`), given back after each sync call when idle
(`HOLD = "transaction"`) and at the request's end in any case.

The connection budget multiplies that by the deployment's processes and
compares it with what accepts the connections, the server or the PgBouncer
in front of it (`_deployment`). The checks `migrate` and other commands run
before they start (`check --database`) only ever warn about it; `check
--deploy --database` reports the same as an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import Error as DjangoDatabaseError

from ._deployment import (
    ADMIN_DATABASE,
    PREPARED_STATEMENTS_VERSION,
    PROCESSES_VARIABLE,  # noqa: F401 (checks.PROCESSES_VARIABLE, as before)
    Endpoint,
    PoolerInfo,
    Processes,
    look,
    processes,
)
from .conf import SETTING_NAME, BridgeSettings, SettingsError, parse_settings

__all__ = (
    "check_connection_budget",
    "check_deploy_health_checks",
    "check_deploy_processes",
    "check_deploy_shutdown_timeout",
    "check_django_pool",
    "check_in_memory_sqlite",
    "check_pooled_conn_max_age",
    "check_poolers",
    "check_settings",
    "connection_budget",
)

# Said by every check that only matters to requests served through the wrapper.
_NOT_SERVING_HINT = (
    "Not serving through async_dbbridge.asgi? Add this ID to SILENCED_SYSTEM_CHECKS."
)


def _request_threads_supported() -> bool:
    """Whether requests can run on request threads: `ThreadSensitiveContext(executor=...)`.

    The ASGI wrapper's own test (asgiref >= 3.13), so the checks and the wrapper
    never disagree; tests replace this function to see the checks as on an
    older asgiref.
    """
    from . import _compat

    return _compat.REQUEST_THREADS_SUPPORTED


def _parsed_settings() -> BridgeSettings | None:
    """The validated setting, or None when it is invalid (E001 reports that, once)."""
    from django.conf import settings

    try:
        return parse_settings(getattr(settings, SETTING_NAME, None))
    except ImproperlyConfigured:
        return None


def _conn_max_age(settings_dict: Mapping[str, Any]) -> Any:
    # Django's own default when the key is absent (configure_settings() fills
    # it in for the configured aliases; a hand-built dict may lack it).
    return settings_dict.get("CONN_MAX_AGE", 0)


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001: `ASYNC_DBBRIDGE` is invalid (one per problem). W001: asgiref is too old.

    W001 also names every alias whose `CONN_MAX_AGE` asks for reuse that
    requests then cannot get: one message for one cause.
    """
    from django.conf import settings

    try:
        parse_settings(getattr(settings, SETTING_NAME, None))
    except SettingsError as exc:
        # One error per problem: every mistake shows in one run.
        return [checks.Error(problem, id="async_dbbridge.E001") for problem in exc.problems]
    if _request_threads_supported():
        return []
    import asgiref

    message = (
        f"asgiref {asgiref.__version__} has no ThreadSensitiveContext(executor=...) "
        "(asgiref >= 3.13): requests served by async_dbbridge.asgi cannot use request "
        "threads and the connection pool. Each request falls back to a thread of its own, "
        "whose connections are closed when the request ends: a connect per request that "
        f"touches the database, and {SETTING_NAME}['POOL_SIZE'] does not bound them."
    )
    persistent = _persistent_aliases(settings.DATABASES)
    if persistent:
        ages = ", ".join(
            f"DATABASES[{alias!r}]['CONN_MAX_AGE'] = {_conn_max_age(settings.DATABASES[alias])}"
            for alias in persistent
        )
        message += f" {ages}: requests cannot reuse connections (db_call still does)."
    return [
        checks.Warning(
            message,
            hint=f"Upgrade asgiref to 3.13 or later. {_NOT_SERVING_HINT}",
            id="async_dbbridge.W001",
        )
    ]


def _persistent_aliases(databases: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Aliases whose `CONN_MAX_AGE` asks for reuse: above 0, or `None` (for ever)."""
    return [
        alias
        for alias, settings_dict in databases.items()
        if (max_age := _conn_max_age(settings_dict)) is None
        or (isinstance(max_age, int | float) and max_age > 0)
    ]


def _django_pool_aliases(databases: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Aliases with Django's own connection pool: `OPTIONS["pool"]` set (and truthy).

    Truthy, as Django (5.1+, PostgreSQL) and `make_pooled()` both test it:
    `{}` or `False` turns Django's pool off.
    """
    return [
        alias
        for alias, settings_dict in databases.items()
        if (settings_dict.get("OPTIONS") or {}).get("pool")
    ]


@checks.register()
def check_django_pool(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E003: an alias uses Django's own connection pool, under the bridge's pool.

    Every alias is pooled by the bridge (its request threads and bridge
    workers), and `make_pooled()` refuses a wrapper whose alias has
    `OPTIONS["pool"]`: two pools stacked would hold connections twice, and
    neither bound would mean anything. Reported here, at `check` time,
    rather than as failing calls once the server runs.
    """
    from django.conf import settings

    return [
        checks.Error(
            f"DATABASES[{alias!r}]['OPTIONS']['pool'] is set: Django's connection pool under "
            "async_dbbridge's own, two pools stacked. async_dbbridge refuses to pool this "
            "alias (ImproperlyConfigured at run time), so the threads that pool it, request "
            "threads and the bridge's workers, fail their calls.",
            hint=f"Remove OPTIONS['pool']: async_dbbridge's pool ({SETTING_NAME}['POOL_SIZE'] "
            "connections per alias per process) replaces it. Then set CONN_MAX_AGE, which "
            "Django's pool required to be 0, to a pooled connection's lifetime, e.g. 60.",
            id="async_dbbridge.E003",
        )
        for alias in _django_pool_aliases(settings.DATABASES)
    ]


@checks.register()
def check_pooled_conn_max_age(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """W006: `CONN_MAX_AGE = 0` on a pooled alias: every give-back closes the connection.

    `CONN_MAX_AGE` is a pooled connection's lifetime, so with 0 nothing is
    ever reused. With `HOLD = "transaction"` a request gives its connection
    back after each sync call, so it connects once per sync call that touches
    the database: more often than stock Django, which connects once per
    request. A Warning, not an Info: Django's default is 0, so this is what a
    project gets by adding the wrapper and changing nothing; it costs a connect
    per call (a reused connection served 6-21x the one-query calls per second
    on PostgreSQL, see the benchmarks page) with nothing at run time to tell
    why; and it needs a decision, to fix it or to keep it (where connecting is
    cheap, e.g. a local pooler: silence it).
    """
    from django.conf import settings

    parsed = _parsed_settings()
    if parsed is None or parsed.hold != "transaction":
        # E001 reports an invalid setting; HOLD = "request" gives back at the
        # request's end, so CONN_MAX_AGE = 0 connects once per request, as
        # stock Django does: nothing worse than what the project had.
        return []
    if not _request_threads_supported():
        return []  # requests do not use the pool; W001 says so
    databases = settings.DATABASES
    # In-memory SQLite is never pooled (W002 is about it); an alias with
    # Django's pool is refused outright (E003, whose hint covers CONN_MAX_AGE).
    skipped = set(in_memory_sqlite_aliases(databases)) | set(_django_pool_aliases(databases))
    return [
        checks.Warning(
            f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is 0: a pooled connection's lifetime, so "
            "async_dbbridge's pool closes every connection given back to it. With "
            f"{SETTING_NAME}['HOLD'] = 'transaction' a request gives its connection back "
            "after each sync call, so it connects once per sync call that touches the "
            "database, where stock Django connects once per request.",
            hint="Set CONN_MAX_AGE = 60 (seconds; None: no limit), with CONN_HEALTH_CHECKS = "
            f"True; the pool still bounds the sessions ({SETTING_NAME}['POOL_SIZE'] per alias "
            f"per process). {_NOT_SERVING_HINT}",
            id="async_dbbridge.W006",
        )
        for alias, settings_dict in databases.items()
        if alias not in skipped and _conn_max_age(settings_dict) == 0
    ]


def _is_in_memory_sqlite(settings_dict: Mapping[str, Any]) -> bool:
    name = str(settings_dict.get("NAME") or "")
    return name == ":memory:" or "mode=memory" in name or not name


@checks.register()
def check_in_memory_sqlite(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """W002: an in-memory SQLite database, where connection cleanup cannot be observed."""
    from django.conf import settings

    return [
        checks.Warning(
            f"DATABASES[{alias!r}] is an in-memory SQLite database: Django ignores close() on "
            "it, so connection cleanup can neither happen nor be tested, and every thread "
            "sees its own empty database.",
            hint="Use a file (NAME = BASE_DIR / 'db.sqlite3', and TEST = {'NAME': ...} for tests).",
            id="async_dbbridge.W002",
        )
        for alias in in_memory_sqlite_aliases(settings.DATABASES)
    ]


def in_memory_sqlite_aliases(databases: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Aliases of a `DATABASES` setting that are in-memory SQLite databases."""
    return [
        alias
        for alias, settings_dict in databases.items()
        if str(settings_dict.get("ENGINE", "")).endswith("sqlite3")
        and _is_in_memory_sqlite(settings_dict)
    ]


def connection_budget() -> int:
    """Connections per alias one process may open through the bridge: `POOL_SIZE`.

    The pool is the bound for everything the library runs on its own threads —
    request threads and the process-wide bridge's workers share it. Not
    counted: threads you run yourself (a `DBExecutor` made without
    `pooled=True`, `DBThread`, `db_connection_scope`), each of which opens
    connections of its own, and requests on an asgiref older than 3.13, which
    cannot use the pool (W001).

    Raises:
        ImproperlyConfigured: `ASYNC_DBBRIDGE` is invalid.
    """
    from django.conf import settings

    return parse_settings(getattr(settings, SETTING_NAME, None)).effective_pool_size


def server_limits(conn: Any) -> tuple[int, int] | None:
    """(max_connections, reserved for superusers) of the server `conn` (a wrapper) talks to.

    None for a backend without a connection limit (SQLite). Behind a pooler
    this is the server's limit, not the pooler's: see `_deployment.look()`.
    """
    endpoint = look(conn, None)
    return None if endpoint is None else (endpoint.max_connections, endpoint.reserved)


def _budget_source() -> str:
    """How the budget was set, for messages: the key, or the default it came from."""
    from django.conf import settings

    raw = getattr(settings, SETTING_NAME, None) or {}
    if "POOL_SIZE" in raw:
        return f"{SETTING_NAME}['POOL_SIZE']"
    return f"{SETTING_NAME}['POOL_SIZE'] (by default MAX_WORKERS)"


# Said in every budget message: the check must not look like a guarantee it is not.
_NOT_COUNTED = (
    "Not counted: connections of threads you run yourself (a DBExecutor without "
    "pooled=True, DBThread, db_connection_scope)."
)


def _look(alias: str, parsed: BridgeSettings) -> Endpoint | None:
    """What `alias`'s connections go to (raises django.db.Error when it cannot be asked)."""
    from django.db import connections

    return look(connections[alias], parsed.poolers.get(alias))


def _budget(databases: Any, *, deploy: bool) -> list[checks.CheckMessage]:
    """The budget findings for the aliases asked about: warnings, or errors under --deploy.

    Shared by the database check (`check --database`, and the check `migrate`
    and other commands run before they start) and the deploy check (`check
    --deploy --database`). Only the latter reports errors: a command that
    serves no traffic must not be stopped by how many connections the
    servers of the deployment would open.
    """
    parsed = _parsed_settings()
    if parsed is None:
        return []  # E001 reports it
    try:
        procs = processes(parsed)
    except ValueError as exc:
        # Only the deploy check reports it, as an error (E004 has always said
        # so); the database run goes on as if nothing said how many run.
        if deploy:
            return [
                checks.Error(
                    f"{exc}, so the connection budget cannot be checked.",
                    id="async_dbbridge.E004",
                )
            ]
        procs = Processes(1, "", parsed.worker_processes)
    budget = parsed.effective_pool_size
    source = _budget_source()
    messages: list[checks.CheckMessage] = []
    for alias in databases or ():
        try:
            endpoint = _look(alias, parsed)
        except DjangoDatabaseError as exc:
            # A check reports, it does not crash: an unreachable server is one
            # finding among others, and `check` must still print the rest.
            # Django wraps every driver error raised while connecting or
            # querying, so this is the whole family and nothing else.
            messages.append(_unreachable(alias, exc))
            continue
        if endpoint is None:
            continue
        if not deploy:
            messages.extend(_pooler_findings(endpoint, parsed))
        limit, where = endpoint.limit()
        if limit is None:
            continue  # W013 (database run) says why the pooler's limit is unknown
        sessions = procs.sessions(budget)
        deployment = procs.describe(budget, source)
        if sessions > limit:
            message = (
                f"The deployment's connection pools may open {deployment} connections "
                f"(request threads and the bridge's workers of each process) to {where}: "
                f"more than it accepts ({limit}). Once it is full, new connections are "
                f"refused and requests get 503s. {_NOT_COUNTED}"
            )
            hint = (
                f"Lower {SETTING_NAME}['POOL_SIZE'] to at most {max(1, limit // procs.total)}, "
                "run fewer processes, or raise the limit"
                + (" (max_client_conn)" if endpoint.behind_pooler else " (max_connections)")
                + ". See the deploying at scale docs."
            )
            if deploy:
                messages.append(checks.Error(message, hint=hint, id="async_dbbridge.E004"))
            else:
                messages.append(
                    checks.Warning(
                        message,
                        hint=hint + " An error under check --deploy (E004); a warning here so "
                        "that migrate and other commands that serve no traffic still run.",
                        id="async_dbbridge.W003",
                    )
                )
        elif not deploy and not procs.known and 2 * budget > limit:
            messages.append(
                checks.Warning(
                    f"One process's connection pool may open {budget} connections ({source}, "
                    f"shared by request threads and the bridge's workers) to {where}: a second "
                    f"process (uvicorn --workers 2) would not fit. {_NOT_COUNTED}",
                    hint="processes x POOL_SIZE, plus the connections of your own threads, "
                    "must stay below the limit; say how many processes run in "
                    f"{SETTING_NAME}['PROCESSES'] (or WEB_CONCURRENCY) and "
                    f"{SETTING_NAME}['WORKER_PROCESSES']. See the deploying at scale docs.",
                    id="async_dbbridge.W003",
                )
            )
    return messages


@checks.register(checks.Tags.database)
def check_connection_budget(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W003: the deployment's pools against the limit of what they connect to.

    A database check: it runs with `manage.py check --database <alias>` (and
    before `migrate`), since it has to ask the server. Warnings only, so that
    `migrate` and other commands that serve no traffic are never stopped by
    it; `check --deploy --database` reports the same as an error (E004).
    The deployment: `PROCESSES` (else `WEB_CONCURRENCY`) plus
    `WORKER_PROCESSES`, each process with `POOL_SIZE` connections per alias.
    The limit: the server's max_connections minus its reserved slots, or a
    PgBouncer's max_client_conn when the alias is behind one (`POOLERS`, or
    seen: W009). W004: the server could not be asked. W012 / W013 and
    W010 / W011 (a pooler seen but not declared): see `_pooler_findings`.
    """
    return _budget(databases, deploy=False)


def _pooler_findings(endpoint: Endpoint, parsed: BridgeSettings) -> list[checks.CheckMessage]:
    """W009 / W012 / W013, and W010 / W011 for a transaction pooler `POOLERS` does not name."""
    alias = endpoint.alias
    messages: list[checks.CheckMessage] = []
    seen = endpoint.seen_behind_pooler
    pids = (
        f"the backend PID it was handed at login ({endpoint.client_pid}) is not "
        f"pg_backend_pid() ({endpoint.server_pid})"
    )
    if seen and endpoint.declared is None:
        mode = f" in {endpoint.mode} mode" if endpoint.mode else ""
        messages.append(
            checks.Warning(
                f"DATABASES[{alias!r}] connects through a connection pooler or proxy{mode}: "
                f"{pids}. {SETTING_NAME}['POOLERS'] does not name it, so the checks that "
                "run without a database (and the ASGI wrapper) cannot know.",
                hint=f"Set {SETTING_NAME}['POOLERS'] = {{{alias!r}: "
                f"'pgbouncer-{endpoint.mode or 'transaction'}'}} (or 'pgbouncer-session').",
                id="async_dbbridge.W009",
            )
        )
        if endpoint.mode in _TRANSACTION_MODES:
            messages.extend(_transaction_pooler_findings(alias, endpoint.pooler))
    elif seen is False and endpoint.declared is not None:
        messages.append(
            checks.Warning(
                f"{SETTING_NAME}['POOLERS'] says DATABASES[{alias!r}] is behind "
                f"{endpoint.declared!r}, but the server answers it directly (the backend PID "
                f"handed at login is pg_backend_pid(), {endpoint.server_pid}), so the budget "
                "is compared with the server's max_connections, not a pooler's limits.",
                hint=f"Point DATABASES[{alias!r}] at the pooler's host and port, or remove "
                f"{alias!r} from POOLERS. (A pooler that hands clients the server's own "
                "backend PIDs cannot be told apart: then silence this check.)",
                id="async_dbbridge.W012",
            )
        )
    if endpoint.behind_pooler and endpoint.limit()[0] is None:
        error = endpoint.pooler.error if endpoint.pooler is not None else "not PostgreSQL"
        messages.append(
            checks.Warning(
                f"Could not read the limits of the pooler in front of DATABASES[{alias!r}] "
                f"from its admin console (SHOW CONFIG on its {ADMIN_DATABASE!r} database): "
                f"{error}. The connection budget was not compared: behind a pooler the "
                "server's max_connections is not the processes' limit, max_client_conn is.",
                hint=f"Add DATABASES[{alias!r}]['USER'] to PgBouncer's stats_users (read-only "
                "SHOW commands), or compare processes x POOL_SIZE with max_client_conn "
                "yourself and silence this check.",
                id="async_dbbridge.W013",
            )
        )
    return messages


_TRANSACTION_MODES: Final = ("transaction", "statement")


def _transaction_pooler_findings(
    alias: str, pooler: PoolerInfo | None
) -> list[checks.CheckMessage]:
    """W010 / W011: what breaks behind a transaction pooler, from the alias's settings."""
    from django.conf import settings

    settings_dict = settings.DATABASES[alias]
    messages: list[checks.CheckMessage] = []
    if settings_dict.get("ENGINE", "").endswith("postgresql") and not settings_dict.get(
        "DISABLE_SERVER_SIDE_CURSORS", False
    ):
        messages.append(
            checks.Warning(
                f"DATABASES[{alias!r}] is behind a transaction pooler with server-side "
                "cursors on: QuerySet.iterator() opens a named cursor, and its next fetch "
                "may go to another server session, which has no such cursor "
                "(InvalidCursorName) unless the whole loop runs in one atomic() block.",
                hint=f"Set DATABASES[{alias!r}]['DISABLE_SERVER_SIDE_CURSORS'] = True, as "
                "Django's docs advise for transaction pooling.",
                id="async_dbbridge.W010",
            )
        )
    if (settings_dict.get("OPTIONS") or {}).get("server_side_binding") is True and not (
        pooler is not None and pooler.keeps_prepared_statements
    ):
        version = ""
        if pooler is not None and pooler.version is not None:
            prepared = pooler.max_prepared_statements
            version = (
                f" (PgBouncer {'.'.join(map(str, pooler.version))}, max_prepared_statements "
                + ("unsupported" if prepared is None else f"= {prepared}")
                + ")"
            )
        messages.append(
            checks.Warning(
                f"DATABASES[{alias!r}]['OPTIONS']['server_side_binding'] is True behind a "
                f"transaction pooler{version}: psycopg prepares a query once it has run a few "
                "times, and the prepared statement lives in one server session; the next "
                "execution may land on another (prepared statement does not exist).",
                hint="Remove server_side_binding, or use PgBouncer "
                f"{'.'.join(map(str, PREPARED_STATEMENTS_VERSION))} or later with "
                "max_prepared_statements > 0 (then silence this check).",
                id="async_dbbridge.W011",
            )
        )
    return messages


@checks.register()
def check_poolers(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """W010 / W011: settings that break behind the transaction pooler `POOLERS` names.

    Needs no database: it reads the settings only, so it runs with every
    `check` (warnings: nothing is stopped by it).
    """
    parsed = _parsed_settings()
    if parsed is None:
        return []
    messages: list[checks.CheckMessage] = []
    for alias, pooler in parsed.poolers.items():
        if pooler == "pgbouncer-transaction":
            messages.extend(_transaction_pooler_findings(alias, None))
    return messages


def _unreachable(alias: str, exc: DjangoDatabaseError) -> checks.CheckMessage:
    # Drivers write multi-line messages (psycopg adds "\n\tIs the server
    # running...?"); a check message is one line.
    error = " ".join(str(exc).split())
    return checks.Warning(
        f"Could not read max_connections from database {alias!r} to compare with the "
        f"connection budget: {type(exc).__name__}: {error}",
        hint=f"Is the server of DATABASES[{alias!r}] running and reachable? Run the check "
        "again once it is.",
        id="async_dbbridge.W004",
    )


# -- manage.py check --deploy ---------------------------------------------------


def _pooled_aliases(databases: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Aliases the pool serves: all but in-memory SQLite and Django-pooled ones."""
    skipped = set(in_memory_sqlite_aliases(databases)) | set(_django_pool_aliases(databases))
    return [alias for alias in databases if alias not in skipped]


@checks.register(deploy=True)
def check_deploy_health_checks(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """W007 (deploy): a reused pooled connection is never checked before it is handed out.

    With `CONN_MAX_AGE` above 0 (or None) and `CONN_HEALTH_CHECKS` off, a
    connection that died while idle in the pool — a database restart or
    failover, a server or proxy idle timeout — is handed to the next request,
    whose first query fails with a 500.
    """
    from django.conf import settings

    if _parsed_settings() is None:
        return []  # E001 reports it
    databases = settings.DATABASES
    return [
        checks.Warning(
            f"DATABASES[{alias!r}] reuses pooled connections (CONN_MAX_AGE = "
            f"{_conn_max_age(databases[alias])}) without CONN_HEALTH_CHECKS: a connection that "
            "died while idle in the pool (a database restart or failover, an idle timeout on "
            "the server or a proxy) is handed to the next request, whose first query fails.",
            hint=f"Set DATABASES[{alias!r}]['CONN_HEALTH_CHECKS'] = True: the pool then checks "
            "every connection it hands out (a socket probe; a round trip only after an idle "
            "second). See the deployment docs.",
            id="async_dbbridge.W007",
        )
        for alias in _pooled_aliases(databases)
        if alias in _persistent_aliases({alias: databases[alias]})
        and not databases[alias].get("CONN_HEALTH_CHECKS", False)
    ]


@checks.register(deploy=True)
def check_deploy_shutdown_timeout(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W008 (deploy): `SHUTDOWN_TIMEOUT = None`: shutdown waits for ever for in-flight work."""
    parsed = _parsed_settings()
    if parsed is None or parsed.shutdown_timeout is not None:
        return []
    return [
        checks.Warning(
            f"{SETTING_NAME}['SHUTDOWN_TIMEOUT'] is None: lifespan shutdown waits as long as "
            "in-flight requests and bridge calls take, so one stuck query keeps a worker from "
            "stopping (and a deploy or restart from finishing) until the process manager "
            "kills it, without the shutdown line that says what was still running.",
            hint=f"Set {SETTING_NAME}['SHUTDOWN_TIMEOUT'] to a number of seconds below your "
            "process manager's grace period (the default is 10).",
            id="async_dbbridge.W008",
        )
    ]


@checks.register(checks.Tags.database, deploy=True)
def check_deploy_processes(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E004 (deploy, database): the deployment's processes x `POOL_SIZE` exceed the limit.

    Runs with `manage.py check --deploy --database <alias>`, which no
    command that serves no traffic runs: the same arithmetic as W003 (and
    the same limit: the server's, or its pooler's), as an error. Also when
    `WEB_CONCURRENCY` is not a positive integer.
    """
    return _budget(databases, deploy=True)
