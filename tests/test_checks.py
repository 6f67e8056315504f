"""System checks that report conditions instead of crashing, or staying silent, on them."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection, connections
from pytest_django.fixtures import Settings as SettingsWrapper
from pytest_django.plugin import DjangoDbBlocker

from async_dbbridge import checks
from async_dbbridge._lending import make_pooled
from async_dbbridge.checks import (
    check_connection_budget,
    check_deploy_health_checks,
    check_deploy_processes,
    check_deploy_shutdown_timeout,
    check_django_pool,
    check_pooled_conn_max_age,
    check_settings,
    connection_budget,
)
from tests.conftest import SetSetting

DOWN = "unreachable"


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port of 127.0.0.1 where nothing listens, for the whole test.

    Bound but never listening: the kernel refuses connections to it at once,
    and no other process can start listening there while the test runs (a
    port bound and closed again could be taken in between).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(params=["postgresql", "mysql"])
def unreachable_alias(request: pytest.FixtureRequest, refused_port: int) -> Iterator[str]:
    """An extra alias, of a server vendor whatever this run's backend, that cannot connect."""
    engine = request.param
    raw = {
        "ENGINE": f"django.db.backends.{engine}",
        "NAME": "dbbridge_unreachable",
        "USER": "postgres" if engine == "postgresql" else "root",
        "HOST": "127.0.0.1",
        "PORT": str(refused_port),
        # A hang would become a failure, not a stuck run.
        "OPTIONS": {"connect_timeout": 5},
    }
    # configure_settings() fills in Django's defaults (it insists on a default alias).
    configured = connections.configure_settings(
        {"default": dict(connections.settings["default"]), DOWN: raw}
    )
    connections.settings[DOWN] = configured[DOWN]
    try:
        yield engine
    finally:
        connections[DOWN].close()  # never connected; forget this thread's wrapper
        del connections[DOWN]
        del connections.settings[DOWN]


def test_unreachable_server_is_a_warning_naming_the_alias_and_the_error(
    unreachable_alias: str, refused_port: int, django_db_blocker: DjangoDbBlocker
) -> None:
    with django_db_blocker.unblock():
        messages = check_connection_budget(databases=[DOWN])
    [message] = messages
    assert message.id == "async_dbbridge.W004"
    assert f"database {DOWN!r}" in message.msg
    # The driver's own error, on one line.
    assert "OperationalError: " in message.msg
    assert "\n" not in message.msg
    if unreachable_alias == "postgresql":
        # psycopg names the address it tried: this check really did try.
        assert f"port {refused_port} failed: Connection refused" in message.msg
    else:
        assert "Can't connect to server on '127.0.0.1'" in message.msg
    assert message.hint is not None
    assert f"DATABASES[{DOWN!r}]" in message.hint


# PostgreSQL only: Django's own checks connect to a MySQL server (mysql.W002's
# sql_mode, fields' db_type from the server version) and raise before ours
# runs; the direct call above covers this check on MySQL.
@pytest.mark.parametrize("unreachable_alias", ["postgresql"], indirect=True)
def test_check_command_reports_an_unreachable_server_without_a_traceback(
    unreachable_alias: str, django_db_blocker: DjangoDbBlocker
) -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    with django_db_blocker.unblock():
        # Warnings do not fail `check`: it returns, and prints them.
        call_command("check", databases=[DOWN], stdout=stdout, stderr=stderr)
    output = stdout.getvalue() + stderr.getvalue()
    assert "async_dbbridge.W004" in output
    assert f"database {DOWN!r}" in output
    assert "Traceback" not in output


def _server_limits() -> tuple[int, int]:
    """(max_connections, reserved) as the server says, asked here rather than by the check."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int"
            )
        else:
            cursor.execute("SELECT @@max_connections, 1")
        max_connections, reserved = map(int, cursor.fetchone())
    return max_connections, reserved


@pytest.mark.requires_server
@pytest.mark.django_db
def test_connection_budget_is_the_pool_size_against_the_servers_max_connections(
    settings: SettingsWrapper,
) -> None:
    max_connections, reserved = _server_limits()
    usable = max_connections - reserved

    # The pool bounds what one process opens, whatever MAX_WORKERS says: the
    # bridge's workers take their connections from it too.
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": usable + 5, "POOL_SIZE": 4}
    assert connection_budget() == 4
    assert check_connection_budget(databases=["default"]) == []

    # Half the server and one: a second process would not fit.
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": usable // 2 + 1}
    [warning] = check_connection_budget(databases=["default"])
    assert warning.id == "async_dbbridge.W003"
    assert f"may open {usable // 2 + 1} connections (ASYNC_DBBRIDGE['POOL_SIZE']," in warning.msg
    assert "Not counted: connections of threads you run yourself" in warning.msg
    assert warning.hint is not None
    assert "processes x POOL_SIZE" in warning.hint

    # One process alone over the limit: a warning, never an error in the
    # checks `check --database` and `migrate` run (it used to be E002, which
    # stopped migrate); `check --deploy` makes it an error (E004).
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": usable + 1}
    [warning] = check_connection_budget(databases=["default"])
    assert warning.id == "async_dbbridge.W003"
    assert f"max_connections = {max_connections}, {reserved} reserved" in warning.msg
    assert "request threads and the bridge's workers of each process" in warning.msg
    assert "DBExecutor without pooled=True, DBThread, db_connection_scope" in warning.msg
    assert warning.hint is not None
    assert f"Lower ASYNC_DBBRIDGE['POOL_SIZE'] to at most {usable}" in warning.hint
    call_command("check", databases=["default"], stdout=io.StringIO(), stderr=io.StringIO())
    with pytest.raises(SystemCheckError, match=r"async_dbbridge\.E004"):
        call_command("check", deploy=True, databases=["default"], stdout=io.StringIO())

    # POOL_SIZE defaults to MAX_WORKERS, and the message says where the number came from.
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": usable + 1}
    [warning] = check_connection_budget(databases=["default"])
    assert warning.id == "async_dbbridge.W003"
    assert "x ASYNC_DBBRIDGE['POOL_SIZE'] (by default MAX_WORKERS) =" in warning.msg

    # Without --database the server is not asked.
    assert check_connection_budget() == []
    # An invalid setting is E001's to report, not a crash here.
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 0}
    assert check_connection_budget(databases=["default"]) == []


def test_request_thread_support_is_detected_from_the_installed_asgiref() -> None:
    import asgiref

    # The W001 and W006 tests below replace the detection; make sure the real
    # one matches the asgiref that is installed.
    major, minor = (int(part) for part in asgiref.__version__.split(".")[:2])
    assert checks._request_threads_supported() == ((major, minor) >= (3, 13))


def test_an_asgiref_without_request_threads_is_warned_about_once(
    settings: SettingsWrapper, db_settings: SetSetting, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asgiref

    monkeypatch.setattr(checks, "_request_threads_supported", lambda: True)
    assert check_settings() == []

    # Failure injection: asgiref < 3.13, as the wrapper's feature detection sees it.
    monkeypatch.setattr(checks, "_request_threads_supported", lambda: False)
    [message] = check_settings()
    assert message.id == "async_dbbridge.W001"
    assert f"asgiref {asgiref.__version__} has no ThreadSensitiveContext(executor=...)" in (
        message.msg
    )
    assert "closed when the request ends" in message.msg
    assert "ASYNC_DBBRIDGE['POOL_SIZE'] does not bound them" in message.msg
    # CONN_MAX_AGE = 0 everywhere (the suite's default): no reuse to miss.
    assert "CONN_MAX_AGE" not in message.msg
    assert message.hint is not None
    assert "Upgrade asgiref to 3.13 or later" in message.hint

    # Reuse asked for: the same message names it (W001 is the one cause).
    db_settings(aliases=("default",), CONN_MAX_AGE=60)
    db_settings(aliases=("other",), CONN_MAX_AGE=None)
    [message] = check_settings()
    assert message.id == "async_dbbridge.W001"
    assert (
        "DATABASES['default']['CONN_MAX_AGE'] = 60, DATABASES['other']['CONN_MAX_AGE'] = None: "
        "requests cannot reuse connections"
    ) in message.msg
    # The pool is not used by requests: W006 has nothing to say on top.
    assert check_pooled_conn_max_age() == []

    # An invalid setting is one error, whatever asgiref is.
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 0}
    assert [m.id for m in check_settings()] == ["async_dbbridge.E001"]


def test_django_pool_on_an_alias_is_an_error_as_make_pooled_refuses_it(
    db_settings: SetSetting, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checks, "_request_threads_supported", lambda: True)
    assert check_django_pool() == []
    db_settings(aliases=("other",), OPTIONS={"pool": {"max_size": 4}})
    [error] = check_django_pool()
    assert error.id == "async_dbbridge.E003"
    assert "DATABASES['other']['OPTIONS']['pool'] is set" in error.msg
    assert "two pools stacked" in error.msg
    assert error.hint is not None
    assert "Remove OPTIONS['pool']" in error.hint
    assert "CONN_MAX_AGE" in error.hint
    # What the check reports is what happens at run time: a fresh wrapper of
    # the alias (as a request thread makes) is refused before it connects.
    wrapper = connections.create_connection("other")
    with pytest.raises(ImproperlyConfigured, match=r"database 'other' uses Django's connection"):
        make_pooled(wrapper)
    assert wrapper.connection is None
    # E003's hint covers CONN_MAX_AGE there (Django's pool needs 0): no W006
    # for that alias, only for the other one.
    assert [(m.id, "'default'" in m.msg) for m in check_pooled_conn_max_age()] == [
        ("async_dbbridge.W006", True)
    ]
    # Falsy turns Django's pool off, for Django and make_pooled() alike.
    db_settings(aliases=("other",), OPTIONS={"pool": {}})
    assert check_django_pool() == []


def test_conn_max_age_zero_on_a_pooled_alias_is_warned_about(
    settings: SettingsWrapper, db_settings: SetSetting, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closing on give-back itself is tested in test_pool.py
    # (test_conn_max_age_zero_closes_on_give_back), on the server's sessions.
    monkeypatch.setattr(checks, "_request_threads_supported", lambda: True)
    settings.ASYNC_DBBRIDGE = {}
    db_settings(aliases=("default",), CONN_MAX_AGE=0)
    db_settings(aliases=("other",), CONN_MAX_AGE=60)
    [warning] = check_pooled_conn_max_age()
    assert warning.id == "async_dbbridge.W006"
    assert warning.msg.startswith("DATABASES['default']['CONN_MAX_AGE'] is 0")
    assert "connects once per sync call" in warning.msg
    assert warning.hint is not None
    assert "Set CONN_MAX_AGE = 60" in warning.hint
    assert "SILENCED_SYSTEM_CHECKS" in warning.hint

    # Reuse on every alias, for ever or for a while: nothing to say.
    db_settings(aliases=("default",), CONN_MAX_AGE=None)
    assert check_pooled_conn_max_age() == []

    # HOLD = "request" gives back at the request's end: one connect per
    # request, as stock Django with CONN_MAX_AGE = 0. Nothing worse to report.
    db_settings(aliases=("default",), CONN_MAX_AGE=0)
    settings.ASYNC_DBBRIDGE = {"HOLD": "request"}
    assert check_pooled_conn_max_age() == []
    settings.ASYNC_DBBRIDGE = {"HOLD": "transaction"}
    assert [m.id for m in check_pooled_conn_max_age()] == ["async_dbbridge.W006"]
    # An invalid setting is E001's alone.
    settings.ASYNC_DBBRIDGE = {"HOLD": "statement"}
    assert check_pooled_conn_max_age() == []


# Django 6.1 runs its model checks against every alias, and on MySQL they ask
# the server for its version: `check` needs the (test) database there.
@pytest.mark.django_db(databases=["default", "other"])
def test_pool_checks_run_with_manage_py_check(
    settings: SettingsWrapper, db_settings: SetSetting, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checks, "_request_threads_supported", lambda: True)
    settings.ASYNC_DBBRIDGE = {}
    db_settings(CONN_MAX_AGE=0)
    stdout, stderr = io.StringIO(), io.StringIO()
    call_command("check", stdout=stdout, stderr=stderr)
    output = stdout.getvalue() + stderr.getvalue()
    assert output.count("async_dbbridge.W006") == 2  # 'default' and 'other'
    db_settings(aliases=("other",), OPTIONS={"pool": True})
    with pytest.raises(SystemCheckError, match=r"async_dbbridge\.E003"):
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())


# -- manage.py check --deploy -------------------------------------------------------------


def test_deploy_warns_about_reused_connections_without_health_checks(
    settings: SettingsWrapper, db_settings: SetSetting
) -> None:
    settings.ASYNC_DBBRIDGE = {}
    db_settings(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=True)
    assert check_deploy_health_checks() == []
    db_settings(aliases=("other",), CONN_HEALTH_CHECKS=False)
    [warning] = check_deploy_health_checks()
    assert warning.id == "async_dbbridge.W007"
    assert warning.msg.startswith(
        "DATABASES['other'] reuses pooled connections (CONN_MAX_AGE = 60)"
    )
    assert warning.hint is not None
    assert "CONN_HEALTH_CHECKS'] = True" in warning.hint
    # Nothing reused (CONN_MAX_AGE = 0, W006's business): nothing to check.
    db_settings(aliases=("other",), CONN_MAX_AGE=0)
    assert check_deploy_health_checks() == []
    # For ever is reuse too.
    db_settings(aliases=("other",), CONN_MAX_AGE=None)
    assert [m.id for m in check_deploy_health_checks()] == ["async_dbbridge.W007"]
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": 0}  # E001's alone
    assert check_deploy_health_checks() == []


def test_deploy_warns_about_a_shutdown_without_a_limit(settings: SettingsWrapper) -> None:
    settings.ASYNC_DBBRIDGE = {}
    assert check_deploy_shutdown_timeout() == []
    settings.ASYNC_DBBRIDGE = {"SHUTDOWN_TIMEOUT": None}
    [warning] = check_deploy_shutdown_timeout()
    assert warning.id == "async_dbbridge.W008"
    assert "SHUTDOWN_TIMEOUT'] is None" in warning.msg


@pytest.mark.requires_server
@pytest.mark.django_db
def test_deploy_checks_processes_times_pool_size_against_the_server(
    settings: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    max_connections, reserved = _server_limits()
    usable = max_connections - reserved
    settings.ASYNC_DBBRIDGE = {"POOL_SIZE": usable // 4 + 1}
    # Without WEB_CONCURRENCY nothing says how many processes will run.
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    assert check_deploy_processes(databases=["default"]) == []
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    assert check_deploy_processes(databases=["default"]) == []
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    [error] = check_deploy_processes(databases=["default"])
    assert error.id == "async_dbbridge.E004"
    assert (
        f"may open 4 processes (WEB_CONCURRENCY) x ASYNC_DBBRIDGE['POOL_SIZE'] = "
        f"{4 * (usable // 4 + 1)} connections" in error.msg
    )
    assert "to database 'default' (max_connections = " in error.msg
    assert error.hint is not None
    assert f"at most {usable // 4}" in error.hint
    # Only with --deploy and --database.
    call_command("check", databases=["default"], stdout=io.StringIO())
    with pytest.raises(SystemCheckError, match=r"async_dbbridge\.E004"):
        call_command("check", deploy=True, databases=["default"], stdout=io.StringIO())
    monkeypatch.setenv("WEB_CONCURRENCY", "many")
    [error] = check_deploy_processes(databases=["default"])
    assert error.id == "async_dbbridge.E004"
    assert "WEB_CONCURRENCY is 'many'; expected a positive integer" in error.msg
