"""The connection budget knows the deployment: processes, task workers, and PgBouncer.

Against real servers: the primary PostgreSQL directly, and a PgBouncer the
test starts in front of it (transaction mode, pool 10, max_client_conn 2000,
as the issue measured). Every budget finding is a warning in the checks that
`migrate` runs (`check --database`) and an error only under `check --deploy`;
`migrate` itself runs behind PgBouncer with `POOL_SIZE = 500`, which the
server's own max_connections could never hold.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator

import pytest
from django.core.checks import CheckMessage
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connections
from pytest_django.fixtures import Settings as SettingsWrapper
from pytest_django.plugin import DjangoDbBlocker

from async_dbbridge._deployment import look, processes
from async_dbbridge.checks import (
    check_connection_budget,
    check_deploy_processes,
    check_poolers,
)
from async_dbbridge.conf import parse_settings
from tests.scale import PGPORT, PgBouncer, direct, manage, pgbouncer, scale_database, scale_env

pytestmark = [pytest.mark.vendor("postgresql"), pytest.mark.timeout(180)]

AddAlias = Callable[..., str]


def ids(messages: list[CheckMessage]) -> list[str]:
    return sorted(str(m.id) for m in messages)


def usable() -> int:
    with direct() as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def scale_db() -> Iterator[str]:
    with scale_database("scale_budget") as name:
        yield name


@pytest.fixture
def bouncer() -> Iterator[PgBouncer]:
    with pgbouncer() as running:
        yield running


@pytest.fixture
def add_alias(scale_db: str, django_db_blocker: DjangoDbBlocker) -> Iterator[AddAlias]:
    """Add an alias for the test's database on a port (the server's, or a PgBouncer's)."""
    added: list[str] = []

    def add(alias: str, port: int, **extra: object) -> str:
        raw = {
            **connections.settings["default"],
            "NAME": scale_db,
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "USER": "postgres",
            "OPTIONS": {"connect_timeout": 5},
            **extra,
        }
        # connections.settings is settings.DATABASES: the checks see the alias too.
        connections.settings[alias] = connections.configure_settings(
            {"default": connections.settings["default"], alias: raw}
        )[alias]
        added.append(alias)
        return alias

    with django_db_blocker.unblock():
        yield add
        for alias in added:
            connections[alias].close()
            del connections[alias]
            del connections.settings[alias]


def test_processes_come_from_the_setting_else_web_concurrency(
    settings: SettingsWrapper,
) -> None:
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 4, "WORKER_PROCESSES": 2}
    parsed = parse_settings(settings.ASYNC_DBBRIDGE)
    unknown = processes(parsed, {})
    assert (unknown.web, unknown.workers, unknown.known) == (1, 2, True)
    assert processes(parsed, {"WEB_CONCURRENCY": "3"}).describe(4, "POOL_SIZE") == (
        "(3 processes (WEB_CONCURRENCY) + 2 task-worker processes "
        "(ASYNC_DBBRIDGE['WORKER_PROCESSES'])) x POOL_SIZE = 20"
    )
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 4, "PROCESSES": 6}
    parsed = parse_settings(settings.ASYNC_DBBRIDGE)
    # The setting wins over the environment: it counts every host.
    assert processes(parsed, {"WEB_CONCURRENCY": "3"}).sessions(4) == 24
    with pytest.raises(ValueError, match=r"WEB_CONCURRENCY is 'many'; expected a positive"):
        processes(parse_settings({}), {"WEB_CONCURRENCY": "many"})


def test_processes_and_task_workers_count_against_a_direct_server(
    settings: SettingsWrapper, add_alias: AddAlias, monkeypatch: pytest.MonkeyPatch
) -> None:
    alias = add_alias("direct", PGPORT)
    limit = usable()
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    pool = limit // 4 + 1
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": pool, "PROCESSES": 3}
    endpoint = look(connections[alias], None)
    assert endpoint is not None
    # Straight to the server: the PID handed at login is the backend's.
    assert endpoint.seen_behind_pooler is False
    assert endpoint.client_pid == endpoint.server_pid
    assert check_connection_budget(databases=[alias]) == []
    assert check_deploy_processes(databases=[alias]) == []

    # One task-worker process more, and the deployment no longer fits.
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": pool, "PROCESSES": 3, "WORKER_PROCESSES": 1}
    [warning] = check_connection_budget(databases=[alias])
    assert warning.id == "async_dbbridge.W003"
    assert (
        f"may open (3 processes (ASYNC_DBBRIDGE['PROCESSES']) + 1 task-worker process "
        f"(ASYNC_DBBRIDGE['WORKER_PROCESSES'])) x ASYNC_DBBRIDGE['POOL_SIZE'] = {4 * pool} "
        f"connections" in warning.msg
    )
    assert f"to database {alias!r} (max_connections = " in warning.msg
    assert warning.hint is not None
    assert f"at most {limit // 4}" in warning.hint
    assert "a warning here so that migrate" in warning.hint
    [error] = check_deploy_processes(databases=[alias])
    assert error.id == "async_dbbridge.E004"
    # A warning does not stop `check --database` (nor migrate, which runs it);
    # --deploy makes it an error.
    call_command("check", databases=[alias], stdout=io.StringIO(), stderr=io.StringIO())
    with pytest.raises(SystemCheckError, match=r"async_dbbridge\.E004"):
        call_command("check", deploy=True, databases=[alias], stdout=io.StringIO())

    # Without PROCESSES, WEB_CONCURRENCY says how many serve.
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": pool}
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    [warning] = check_connection_budget(databases=[alias])
    assert "(WEB_CONCURRENCY) x" in warning.msg
    monkeypatch.delenv("WEB_CONCURRENCY")

    # Nothing says: one process, and a warning if a second would not fit.
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": limit // 2 + 1}
    [warning] = check_connection_budget(databases=[alias])
    assert warning.id == "async_dbbridge.W003"
    assert "a second process (uvicorn --workers 2) would not fit" in warning.msg
    # One process alone over the server's limit: a warning too, never an
    # error in the checks migrate runs (it was E002).
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": limit + 1}
    [warning] = check_connection_budget(databases=[alias])
    assert warning.id == "async_dbbridge.W003"
    assert "1 process (PROCESSES and WEB_CONCURRENCY unset)" in warning.msg
    call_command("check", databases=[alias], stdout=io.StringIO(), stderr=io.StringIO())


def test_behind_pgbouncer_the_limit_is_max_client_conn(
    settings: SettingsWrapper,
    add_alias: AddAlias,
    bouncer: PgBouncer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    alias = add_alias("bouncer", bouncer.port)
    # The premise: the server alone could never hold this pool.
    assert usable() < 500
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 500}
    endpoint = look(connections[alias], None)
    assert endpoint is not None
    assert endpoint.seen_behind_pooler is True
    assert endpoint.client_pid != endpoint.server_pid
    assert endpoint.pooler is not None
    assert endpoint.pooler.error is None
    assert endpoint.mode == "transaction"
    assert endpoint.pooler.max_client_conn == 2000
    assert endpoint.pooler.pool_size == 10
    assert endpoint.limit()[0] == 2000

    # Seen, not declared: said (W009), and what breaks in transaction mode
    # (W010: server-side cursors are on). No budget finding: 500 <= 2000.
    messages = check_connection_budget(databases=[alias])
    assert ids(messages) == ["async_dbbridge.W009", "async_dbbridge.W010"]
    w009 = next(m for m in messages if m.id == "async_dbbridge.W009")
    assert "connection pooler or proxy in transaction mode" in w009.msg
    # The same client connection (this thread's): the PID PgBouncer made up for it.
    assert f"handed at login ({endpoint.client_pid}) is not pg_backend_pid()" in w009.msg
    assert w009.hint is not None
    assert "{'bouncer': 'pgbouncer-transaction'}" in w009.hint

    # Declared: the settings-only check says W010, with every `check`.
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 500, "POOLERS": {alias: "pgbouncer-transaction"}}
    assert check_connection_budget(databases=[alias]) == []
    assert ids(check_poolers()) == ["async_dbbridge.W010"]
    connections.settings[alias]["DISABLE_SERVER_SIDE_CURSORS"] = True
    assert check_poolers() == []
    connections.settings[alias]["OPTIONS"] = {"connect_timeout": 5, "server_side_binding": True}
    [w011] = check_poolers()
    assert w011.id == "async_dbbridge.W011"
    assert w011.hint is not None
    assert "PgBouncer 1.22 or later with max_prepared_statements > 0" in w011.hint
    # Seen only: the database check reads PgBouncer's version (Debian's 1.18
    # has no max_prepared_statements at all).
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 500}
    messages = check_connection_budget(databases=[alias])
    assert ids(messages) == ["async_dbbridge.W009", "async_dbbridge.W011"]
    w011 = next(m for m in messages if m.id == "async_dbbridge.W011")
    assert "(PgBouncer 1.18.0, max_prepared_statements unsupported)" in w011.msg

    # Five processes of 500 are more clients than PgBouncer takes.
    settings.ASYNC_DBBRIDGE = {
        "POOL_SIZE": 500,
        "PROCESSES": 5,
        "POOLERS": {alias: "pgbouncer-transaction"},
    }
    connections.settings[alias]["OPTIONS"] = {"connect_timeout": 5}
    [warning] = check_connection_budget(databases=[alias])
    assert warning.id == "async_dbbridge.W003"
    assert "= 2500 connections" in warning.msg
    assert "the PgBouncer in front of database 'bouncer' (max_client_conn = 2000" in warning.msg
    assert warning.hint is not None
    assert "at most 400" in warning.hint
    assert "(max_client_conn)" in warning.hint
    [error] = check_deploy_processes(databases=[alias])
    assert error.id == "async_dbbridge.E004"


def test_a_pooler_whose_limits_cannot_be_read_is_said_and_not_compared_with_the_server(
    settings: SettingsWrapper, add_alias: AddAlias
) -> None:
    # The test's user may not read this PgBouncer's admin console.
    with pgbouncer(stats_users="dbbridge_nobody") as closed:
        alias = add_alias("closed", closed.port, DISABLE_SERVER_SIDE_CURSORS=True)
        settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 500}
        messages = check_connection_budget(databases=[alias])
        assert ids(messages) == ["async_dbbridge.W009", "async_dbbridge.W013"]
        w013 = next(m for m in messages if m.id == "async_dbbridge.W013")
        assert "SHOW CONFIG on its 'pgbouncer' database" in w013.msg
        assert "not allowed" in w013.msg  # PgBouncer's own refusal
        # 500 is far above the server's limit, and still no W003: the
        # server's max_connections is not the limit behind a pooler.
        assert check_deploy_processes(databases=[alias]) == []


def test_a_declared_pooler_on_a_direct_server_is_warned_about(
    settings: SettingsWrapper, add_alias: AddAlias
) -> None:
    alias = add_alias("direct", PGPORT, DISABLE_SERVER_SIDE_CURSORS=True)
    settings.ASYNC_DBBRIDGE = {"POOLERS": {alias: "pgbouncer-session"}}
    [w012] = check_connection_budget(databases=[alias])
    assert w012.id == "async_dbbridge.W012"
    assert "but the server answers it directly" in w012.msg
    # The PIDs win: the budget is the server's again.
    settings.ASYNC_DBBRIDGE = {"POOLERS": {alias: "pgbouncer-session"}, "POOL_SIZE": usable() + 1}
    assert ids(check_connection_budget(databases=[alias])) == [
        "async_dbbridge.W003",
        "async_dbbridge.W012",
    ]
    # Session mode keeps server-side cursors: nothing about them.
    assert check_poolers() == []


def test_poolers_setting_is_validated(settings: SettingsWrapper) -> None:
    with pytest.raises(Exception, match=r"'nowhere' is not one") as info:
        parse_settings({"POOLERS": {"nowhere": "pgbouncer-transaction"}})
    with pytest.raises(Exception, match=r"'default' maps to 'pgpool'"):
        parse_settings({"POOLERS": {"default": "pgpool"}})
    assert "accepted keys" not in str(info.value)
    with pytest.raises(Exception, match=r"WORKER_PROCESSES'\] is -1"):
        parse_settings({"WORKER_PROCESSES": -1})
    with pytest.raises(Exception, match=r"PROCESSES'\] is 0"):
        parse_settings({"PROCESSES": 0})
    parsed = parse_settings({"POOLERS": {"default": None, "other": "pgbouncer-session"}})
    assert parsed.poolers == {"other": "pgbouncer-session"}


def test_migrate_runs_behind_pgbouncer_with_a_large_pool(scale_db: str, bouncer: PgBouncer) -> None:
    env = scale_env(scale_db, bouncer.port, SCALE_POOL_SIZE="500")
    migrated = manage(env, "migrate", "--no-input")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "Applying testapp.0001_initial... OK" in migrated.stdout
    # It ran through PgBouncer, and the server has the tables.
    with direct(scale_db) as conn:
        row = conn.execute("SELECT count(*) FROM django_migrations").fetchone()
    assert row is not None
    assert row[0] > 0
    # What it printed: the pooler seen (W009), no budget error.
    assert "async_dbbridge.W009" in migrated.stderr
    assert "E00" not in migrated.stderr

    # `check --database` passes too; `check --deploy --database` with five
    # processes of 500 fails on PgBouncer's max_client_conn.
    env["SCALE_POOLER"] = "pgbouncer-transaction"
    checked = manage(env, "check", "--database", "default")
    assert checked.returncode == 0, checked.stderr
    env["SCALE_PROCESSES"] = "5"
    deploy = manage(env, "check", "--deploy", "--database", "default")
    assert deploy.returncode != 0
    assert "async_dbbridge.E004" in deploy.stderr
    assert "max_client_conn = 2000" in deploy.stderr


def test_migrate_runs_against_a_server_too_small_for_the_pool(scale_db: str) -> None:
    # The same pool straight to the server: a warning, and migrate still runs.
    env = scale_env(scale_db, PGPORT, SCALE_POOL_SIZE="500")
    migrated = manage(env, "migrate", "--no-input")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "async_dbbridge.W003" in migrated.stderr
    assert "Applying testapp.0001_initial... OK" in migrated.stdout


def test_the_wrappers_startup_look_compares_with_the_pooler_behind_pgbouncer(
    settings: SettingsWrapper,
    add_alias: AddAlias,
    bouncer: PgBouncer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from async_dbbridge import _startup

    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    alias = add_alias("bouncer", bouncer.port, DISABLE_SERVER_SIDE_CURSORS=True)
    direct_alias = add_alias("direct", PGPORT)
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 500}
    with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
        # What the ASGI wrapper runs at startup, on a thread of its own.
        _startup._check_alias(alias, 500)
        assert caplog.records == []  # 500 clients fit in max_client_conn 2000
        _startup._check_alias(direct_alias, 500)
        [line] = [r.getMessage() for r in caplog.records]
        assert f"POOL_SIZE=500 for database {direct_alias!r} is more than database" in line
        caplog.clear()
        settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 500, "PROCESSES": 5}
        _startup._check_alias(alias, 500)
        [line] = [r.getMessage() for r in caplog.records]
    assert "5 processes x POOL_SIZE=500 for database 'bouncer' is more than the PgBouncer" in line
    assert "(max_client_conn = 2000" in line
    assert "(2500 connections at most, 2000 for every client together)" in line
