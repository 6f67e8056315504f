"""System checks for the ``ASYNC_DBBRIDGE`` setting and the databases it serves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import Error as DjangoDatabaseError

from .conf import SETTING_NAME, parse_settings

__all__ = (
    "check_connection_budget",
    "check_in_memory_sqlite",
    "check_request_connection_reuse",
    "check_settings",
    "connection_budget",
)


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001: ``ASYNC_DBBRIDGE`` is invalid. W001: lanes asked for, but asgiref is too old."""
    from django.conf import settings

    from ._lanes import LANES_SUPPORTED

    try:
        parsed = parse_settings(getattr(settings, SETTING_NAME, None))
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="async_dbbridge.E001")]
    if parsed.lanes and not LANES_SUPPORTED:
        return [
            checks.Warning(
                f"{SETTING_NAME}['LANES'] is {parsed.lanes}, but request lanes need "
                "asgiref >= 3.13 (ThreadSensitiveContext(executor=...)).",
                hint="Upgrade asgiref. Until then each request runs on its own thread, "
                "whose connections are closed when the request ends: requests reuse "
                f"none, whatever CONN_MAX_AGE says. Set {SETTING_NAME}['LANES'] = 0 if "
                "that is intended.",
                id="async_dbbridge.W001",
            )
        ]
    return []


def _persistent_aliases(databases: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Aliases whose ``CONN_MAX_AGE`` asks for reuse: above 0, or ``None`` (for ever)."""
    return [
        alias
        for alias, settings_dict in databases.items()
        if (max_age := settings_dict.get("CONN_MAX_AGE", 0)) is None
        or (isinstance(max_age, int | float) and max_age > 0)
    ]


@checks.register()
def check_request_connection_reuse(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W005: ``CONN_MAX_AGE`` asks for reuse that requests under the wrapper cannot get.

    Without lanes each request runs on a thread of its own, whose connections
    the wrapper closes when the request ends: a sync view connects on every
    request whatever ``CONN_MAX_AGE`` says, and runs at a fraction of the
    speed the setting promises, with nothing else to tell why.
    """
    from django.conf import settings

    from ._lanes import LANES_SUPPORTED

    try:
        parsed = parse_settings(getattr(settings, SETTING_NAME, None))
    except ImproperlyConfigured:
        return []  # E001 reports it
    if parsed.lanes:
        # Lanes reuse connections; or, without asgiref 3.13, W001 already says
        # that requests get no lanes, hence no reuse: one message per cause.
        return []
    aliases = _persistent_aliases(settings.DATABASES)
    if not aliases:
        return []
    import asgiref

    if LANES_SUPPORTED:
        why = f"{SETTING_NAME}['LANES'] is 0"
        fix = f"Set {SETTING_NAME}['LANES'] (default: MAX_WORKERS) so requests reuse connections"
    else:
        why = f"request lanes need asgiref >= 3.13 (installed: {asgiref.__version__})"
        fix = f"Upgrade asgiref and leave {SETTING_NAME}['LANES'] at its default"
    ages = ", ".join(
        f"DATABASES[{alias!r}]['CONN_MAX_AGE'] = {settings.DATABASES[alias].get('CONN_MAX_AGE')}"
        for alias in aliases
    )
    return [
        checks.Warning(
            f"{ages}, but requests served by async_dbbridge.asgi cannot reuse connections: "
            f"{why}, so each request runs on a thread of its own whose connections are "
            "closed when it ends.",
            hint=f"{fix}; or, if only db_call should keep connections, set CONN_MAX_AGE = 0 "
            f"and {SETTING_NAME}['POLICY'] = 'max_age'. Not serving through "
            "async_dbbridge.asgi? Add this ID to SILENCED_SYSTEM_CHECKS.",
            id="async_dbbridge.W005",
        )
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
    """Aliases of a ``DATABASES`` setting that are in-memory SQLite databases."""
    return [
        alias
        for alias, settings_dict in databases.items()
        if str(settings_dict.get("ENGINE", "")).endswith("sqlite3")
        and _is_in_memory_sqlite(settings_dict)
    ]


def connection_budget() -> int:
    """Connections per alias one process may open: bridge workers plus lanes.

    Lanes count only when they can exist (asgiref >= 3.13). With
    ``LANE_FULL = "temporary"`` a burst beyond the lanes opens more, briefly.
    """
    from django.conf import settings

    from ._lanes import LANES_SUPPORTED

    parsed = parse_settings(getattr(settings, SETTING_NAME, None))
    return parsed.max_workers + (parsed.lanes if LANES_SUPPORTED else 0)


def _server_limits(alias: str) -> tuple[int, int] | None:
    """(max_connections, reserved for superusers) of the server behind ``alias``."""
    from django.db import connections

    conn = connections[alias]
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute(
                "SELECT current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int"
            )
        elif conn.vendor == "mysql":
            cursor.execute("SELECT @@max_connections, 1")
        else:
            return None
        row = cursor.fetchone()
    return int(row[0]), int(row[1])


@checks.register(checks.Tags.database)
def check_connection_budget(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E002 / W003: the per-process connection budget against the server's max_connections.

    A database check: it runs with ``manage.py check --database <alias>`` (and
    before ``migrate``), since it has to ask the server. W004: the server could
    not be asked (down, unreachable, refused us).
    """
    try:
        budget = connection_budget()
    except ImproperlyConfigured:
        return []  # E001 reports it
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
        if budget > usable:
            messages.append(
                checks.Error(
                    f"One process may open {budget} connections ({SETTING_NAME} MAX_WORKERS + "
                    f"LANES) to {where}: more than the server accepts.",
                    hint="Lower MAX_WORKERS / LANES, or raise max_connections.",
                    id="async_dbbridge.E002",
                )
            )
        elif 2 * budget > usable:
            messages.append(
                checks.Warning(
                    f"One process may open {budget} connections ({SETTING_NAME} MAX_WORKERS + "
                    f"LANES) to {where}: a second process (uvicorn --workers 2) would not fit.",
                    hint="processes x (MAX_WORKERS + LANES) must stay below max_connections; "
                    "see the deployment and sizing docs.",
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
