"""System checks for the `ASYNC_DBBRIDGE` setting and the databases it serves.

The connections they reason about: under the ASGI wrapper (asgiref >= 3.13)
requests run on request threads, and those threads and the process-wide
bridge's workers take their connections from one bounded pool per alias per
process (`POOL_SIZE`), given back after each sync call when idle
(`HOLD = "transaction"`) and at the request's end in any case.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import Error as DjangoDatabaseError

from .conf import SETTING_NAME, BridgeSettings, SettingsError, parse_settings

__all__ = (
    "check_connection_budget",
    "check_deploy_health_checks",
    "check_deploy_processes",
    "check_deploy_shutdown_timeout",
    "check_django_pool",
    "check_in_memory_sqlite",
    "check_pooled_conn_max_age",
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


def _server_limits(alias: str) -> tuple[int, int] | None:
    """(max_connections, reserved for superusers) of the server behind `alias`."""
    from django.db import connections

    return server_limits(connections[alias])


def server_limits(conn: Any) -> tuple[int, int] | None:
    """(max_connections, reserved for superusers) of the server `conn` (a wrapper) talks to.

    None for a backend without a connection limit (SQLite). The ASGI wrapper
    asks the same at startup (`_startup`), on a connection of its own.
    """
    if conn.vendor not in ("postgresql", "mysql"):
        return None
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute(
                "SELECT current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int"
            )
        else:
            cursor.execute("SELECT @@max_connections, 1")
        row = cursor.fetchone()
    return int(row[0]), int(row[1])


def _budget_source() -> str:
    """How the budget was set, for messages: the key, or the default it came from."""
    from django.conf import settings

    raw = getattr(settings, SETTING_NAME, None) or {}
    if "POOL_SIZE" in raw:
        return f"{SETTING_NAME}['POOL_SIZE']"
    return f"{SETTING_NAME}['POOL_SIZE'] (by default MAX_WORKERS)"


@checks.register(checks.Tags.database)
def check_connection_budget(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E002 / W003: the pool's bound (`POOL_SIZE`) against the server's max_connections.

    A database check: it runs with `manage.py check --database <alias>` (and
    before `migrate`), since it has to ask the server. W004: the server could
    not be asked (down, unreachable, refused us).
    """
    try:
        budget = connection_budget()
    except ImproperlyConfigured:
        return []  # E001 reports it
    source = _budget_source()
    # Said in both messages: the check must not look like a guarantee it is not.
    not_counted = (
        "Not counted: connections of threads you run yourself (a DBExecutor without "
        "pooled=True, DBThread, db_connection_scope)."
    )
    messages: list[checks.CheckMessage] = []
    for alias in databases or ():
        try:
            limits = _server_limits(alias)
        except DjangoDatabaseError as exc:
            # A check reports, it does not crash: an unreachable server is one
            # finding among others, and `check` must still print the rest.
            # Django wraps every driver error raised while connecting or
            # querying, so this is the whole family and nothing else.
            messages.append(_unreachable(alias, exc))
            continue
        if limits is None:
            continue
        max_connections, reserved = limits
        usable = max_connections - reserved
        where = f"database {alias!r} (max_connections = {max_connections}, {reserved} reserved)"
        pool = (
            f"One process's connection pool may open {budget} connections ({source}, shared "
            f"by request threads and the bridge's workers) to {where}"
        )
        if budget > usable:
            messages.append(
                checks.Error(
                    f"{pool}: more than the server accepts. {not_counted}",
                    hint=f"Lower {SETTING_NAME}['POOL_SIZE'], or raise max_connections.",
                    id="async_dbbridge.E002",
                )
            )
        elif 2 * budget > usable:
            messages.append(
                checks.Warning(
                    f"{pool}: a second process (uvicorn --workers 2) would not fit. {not_counted}",
                    hint="processes x POOL_SIZE, plus the connections of your own threads, "
                    "must stay below max_connections minus the reserved ones; see the "
                    "deployment and sizing docs.",
                    id="async_dbbridge.W003",
                )
            )
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


#: The environment variable uvicorn, gunicorn and hypercorn-based deployments
#: (Heroku, Dokku, Render...) read for the number of worker processes.
PROCESSES_VARIABLE = "WEB_CONCURRENCY"


@checks.register(checks.Tags.database, deploy=True)
def check_deploy_processes(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E004 (deploy, database): `WEB_CONCURRENCY` processes x `POOL_SIZE` exceed the server.

    Runs with `manage.py check --deploy --database <alias>` where the
    environment says how many worker processes will run (`WEB_CONCURRENCY`,
    which uvicorn and gunicorn read): each process has its own pool, so the
    server sees up to processes x `POOL_SIZE` sessions per alias.
    """
    import os

    raw = os.environ.get(PROCESSES_VARIABLE)
    if raw is None:
        return []
    try:
        processes = int(raw)
    except ValueError:
        processes = 0
    if processes < 1:
        return [
            checks.Error(
                f"{PROCESSES_VARIABLE} is {raw!r}; expected a positive integer (worker "
                "processes), so the connection budget cannot be checked.",
                id="async_dbbridge.E004",
            )
        ]
    try:
        budget = connection_budget()
    except ImproperlyConfigured:
        return []  # E001 reports it
    messages: list[checks.CheckMessage] = []
    for alias in databases or ():
        try:
            limits = _server_limits(alias)
        except DjangoDatabaseError as exc:
            messages.append(_unreachable(alias, exc))
            continue
        if limits is None:
            continue
        max_connections, reserved = limits
        if processes * budget > max_connections - reserved:
            messages.append(
                checks.Error(
                    f"{PROCESSES_VARIABLE} = {processes} processes x {_budget_source()} = "
                    f"{budget}: up to {processes * budget} sessions on database {alias!r}, "
                    f"whose server accepts {max_connections - reserved} (max_connections = "
                    f"{max_connections}, {reserved} reserved). Once it is full, new "
                    "connections are refused and requests get 503s.",
                    hint=f"Lower {SETTING_NAME}['POOL_SIZE'] to at most "
                    f"{max(1, (max_connections - reserved) // processes)}, run fewer "
                    "processes, or raise max_connections.",
                    id="async_dbbridge.E004",
                )
            )
    return messages
