"""System checks that report conditions instead of crashing, or staying silent, on them."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator

import pytest
from django.core.management import call_command
from django.db import connections
from pytest_django.fixtures import Settings as SettingsWrapper
from pytest_django.plugin import DjangoDbBlocker

import async_dbbridge._lanes
from async_dbbridge.checks import (
    check_connection_budget,
    check_request_connection_reuse,
    check_settings,
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


def test_conn_max_age_without_lanes_is_warned_about(
    settings: SettingsWrapper, db_settings: SetSetting, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same feature detection the wrapper uses, as on asgiref >= 3.13.
    monkeypatch.setattr(async_dbbridge._lanes, "LANES_SUPPORTED", True)
    settings.ASYNC_DBBRIDGE = {"LANES": 0}
    assert check_request_connection_reuse() == []  # CONN_MAX_AGE = 0: nothing to reuse
    db_settings(aliases=("default",), CONN_MAX_AGE=60)
    db_settings(aliases=("other",), CONN_MAX_AGE=None)
    [message] = check_request_connection_reuse()
    assert message.id == "async_dbbridge.W005"
    assert "DATABASES['default']['CONN_MAX_AGE'] = 60" in message.msg
    assert "DATABASES['other']['CONN_MAX_AGE'] = None" in message.msg
    assert "ASYNC_DBBRIDGE['LANES'] is 0" in message.msg
    assert message.hint is not None
    assert "Set ASYNC_DBBRIDGE['LANES']" in message.hint
    # With lanes, requests reuse connections: nothing to say.
    settings.ASYNC_DBBRIDGE = {"LANES": 4}
    assert check_request_connection_reuse() == []
    assert check_settings() == []


def test_conn_max_age_with_an_asgiref_without_lanes_is_warned_about(
    settings: SettingsWrapper, db_settings: SetSetting, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asgiref

    # Failure injection: asgiref < 3.13, as the wrapper's feature detection sees it.
    monkeypatch.setattr(async_dbbridge._lanes, "LANES_SUPPORTED", False)
    db_settings(aliases=("default",), CONN_MAX_AGE=60)
    settings.ASYNC_DBBRIDGE = {"LANES": 0}
    [message] = check_request_connection_reuse()
    assert message.id == "async_dbbridge.W005"
    assert f"asgiref >= 3.13 (installed: {asgiref.__version__})" in message.msg
    assert message.hint is not None
    assert "Upgrade asgiref" in message.hint
    # LANES asked for: W001 says it already (no lanes, so no reuse), once.
    settings.ASYNC_DBBRIDGE = {"LANES": 4}
    assert check_request_connection_reuse() == []
    [lanes_message] = check_settings()
    assert lanes_message.id == "async_dbbridge.W001"
    assert lanes_message.hint is not None
    assert "CONN_MAX_AGE" in lanes_message.hint


# Django 6.1 runs its model checks against every alias, and on MySQL they ask
# the server for its version: `check` needs the (test) database there.
@pytest.mark.django_db(databases=["default", "other"])
def test_conn_max_age_check_runs_with_manage_py_check(
    settings: SettingsWrapper, db_settings: SetSetting, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(async_dbbridge._lanes, "LANES_SUPPORTED", True)
    db_settings(aliases=("default",), CONN_MAX_AGE=60)
    settings.ASYNC_DBBRIDGE = {"LANES": 0}
    stdout, stderr = io.StringIO(), io.StringIO()
    call_command("check", stdout=stdout, stderr=stderr)
    assert "async_dbbridge.W005" in stdout.getvalue() + stderr.getvalue()
