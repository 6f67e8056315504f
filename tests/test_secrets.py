"""No password and no DSN in anything the library logs or reports.

A dedicated database user with a password is created for the test (and
dropped afterwards); the ``default`` alias connects as that user while the
library goes through successful calls, failing connects, cleanup failures,
transactions left open, thread exits and a fork, with every logger captured at
DEBUG. The password must never appear, nor a DSN built from it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
from django.db import DatabaseError, OperationalError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from async_dbbridge import DBExecutor, db_call, get_bridge_executor, reset_bridge_executor
from async_dbbridge.testing import server_session_count
from async_dbbridge.threads import DBThread, db_connection_scope
from tests.conftest import SetSetting, backend_id
from tests.faultproxy import FaultProxy
from tests.test_fork import run_forked
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
    pytest.mark.requires_server,
]


@dataclass(frozen=True)
class SecretUser:
    name: str
    password: str

    def leaks_in(self, text: str) -> list[str]:
        """What of the secret (or a DSN made with it) shows up in ``text``."""
        needles = [
            self.password,
            f"{self.name}:{self.password}",
            "password=",
            "passwd=",
            "postgresql://",
            "postgres://",
            "mysql://",
        ]
        return [needle for needle in needles if needle in text]


def _admin_connection() -> BaseDatabaseWrapper:
    """A private superuser connection to the test database, kept apart from the alias."""
    target = connections["default"]
    return type(target)(copy.deepcopy(target.settings_dict), "default")


@pytest.fixture
def secret_user(db_settings: SetSetting) -> Iterator[SecretUser]:
    """A user with a password, and the ``default`` alias connecting as that user."""
    server_session_count("default")  # the session counter connects as the superuser first
    user = SecretUser(f"dbbridge_secret_{os.getpid()}", f"Pw-{uuid.uuid4().hex}-x")
    admin = _admin_connection()
    vendor = admin.vendor
    database = admin.settings_dict["NAME"]
    try:
        with admin.cursor() as cursor:
            if vendor == "postgresql":
                cursor.execute(f'DROP ROLE IF EXISTS "{user.name}"')
                cursor.execute(f'CREATE ROLE "{user.name}" LOGIN PASSWORD %s', [user.password])
                cursor.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{user.name}"')
                cursor.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{user.name}"')
            else:
                cursor.execute(f"DROP USER IF EXISTS '{user.name}'@'%'")
                # With parameters, MySQLdb formats the query: its own % is doubled.
                cursor.execute(f"CREATE USER '{user.name}'@'%%' IDENTIFIED BY %s", [user.password])
                cursor.execute(f"GRANT ALL ON `{database}`.* TO '{user.name}'@'%'")
        connections.close_all()
        db_settings(aliases=("default",), USER=user.name, PASSWORD=user.password)
        yield user
    finally:
        # Whatever failed above: no user (and no session of it) outlives the test.
        reset_bridge_executor(wait=True)  # its idle workers may hold the user's sessions
        connections.close_all()
        try:
            with admin.cursor() as cursor:
                _end_sessions_of(cursor, vendor, user.name)
                if vendor == "postgresql":
                    cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [user.name])
                    if cursor.fetchone():
                        cursor.execute(f'DROP OWNED BY "{user.name}"')
                        cursor.execute(f'DROP ROLE "{user.name}"')
                else:
                    cursor.execute(f"DROP USER IF EXISTS '{user.name}'@'%'")
        finally:
            admin.close()


def _end_sessions_of(cursor: Any, vendor: str, name: str) -> None:
    """Wait (bounded) for the user's sessions to be gone; a role with sessions can't go."""
    if vendor == "postgresql":
        sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
    else:
        sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s"
    deadline = time.monotonic() + 10
    while True:
        cursor.execute(sql, [name])
        if cursor.fetchone()[0] == 0:
            return
        assert time.monotonic() < deadline, f"sessions of {name} still open after 10s"
        time.sleep(0.02)


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every logger at DEBUG, the library's own included."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="async_dbbridge")
    return caplog


def test_calls_and_stats_never_show_the_password(
    secret_user: SecretUser, captured: pytest.LogCaptureFixture
) -> None:
    reports: list[str] = []
    with DBExecutor(max_workers=2) as executor:
        assert executor.submit(Item.objects.count).result() == 0  # connected as the user

        def whoami() -> str:
            with connections["default"].cursor() as cursor:
                cursor.execute("SELECT current_user" if _is_pg() else "SELECT CURRENT_USER()")
                return str(cursor.fetchone()[0])

        assert executor.submit(whoami).result().startswith(secret_user.name)
        stats = executor.stats()
        assert stats.connections_opened["default"] >= 1
        reports += [repr(stats), str(stats.as_dict()), repr(executor)]
    reports.append(repr(executor.stats()))
    # The check can fail: the password is right there in the settings.
    assert secret_user.leaks_in(str(connections["default"].settings_dict)) != []
    for text in [*reports, captured.text]:
        assert secret_user.leaks_in(text) == []


def _is_pg() -> bool:
    return connections["default"].vendor == "postgresql"


def test_failing_connects_never_log_the_password(
    secret_user: SecretUser,
    captured: pytest.LogCaptureFixture,
    db_settings: SetSetting,
) -> None:
    errors: list[BaseException] = []
    settings_dict = connections.settings["default"]
    with FaultProxy(str(settings_dict["HOST"]), int(settings_dict["PORT"])) as proxy:
        db_settings(aliases=("default",), HOST="127.0.0.1", PORT=str(proxy.port))
        proxy.refuse_new()
        with DBExecutor(max_workers=1) as executor:
            for _ in range(3):
                with pytest.raises(OperationalError) as refused:
                    executor.submit(Item.objects.count).result()
                errors.append(refused.value)

            if not _is_pg():
                # MariaDB checks passwords (the PostgreSQL server here trusts
                # 127.0.0.1, so a wrong password cannot fail there).
                proxy.accept_new()
                db_settings(aliases=("default",), PASSWORD=secret_user.password[::-1])
                with pytest.raises(OperationalError, match="Access denied") as denied:
                    executor.submit(Item.objects.count).result()
                errors.append(denied.value)

    # What the library logged, and the errors it hands back unchanged.
    for text in [captured.text, *(repr(e) for e in errors), *(str(e) for e in errors)]:
        assert secret_user.leaks_in(text) == []


def test_cleanup_failures_leftover_transactions_and_thread_exits_never_log_the_password(
    secret_user: SecretUser, captured: pytest.LogCaptureFixture, db_settings: SetSetting
) -> None:
    db_settings(aliases=("default",), CONN_MAX_AGE=0)
    wrapper_class = type(connections["default"])
    real_close = wrapper_class.close

    def failing_close(self: BaseDatabaseWrapper) -> None:
        real_close(self)
        raise DatabaseError("close failed")

    def leave_open() -> None:
        transaction.set_autocommit(False)
        Item.objects.create(name="left open")

    with DBExecutor(max_workers=1) as executor:
        with mock.patch.object(wrapper_class, "close", autospec=True, side_effect=failing_close):
            executor.submit(Item.objects.count).result()  # cleanup fails, logged
            with pytest.warns(RuntimeWarning, match="rolled back"):
                executor.submit(leave_open).result()  # rescued: logged and warned

            thread = DBThread(target=Item.objects.count)  # exit cleanup fails, logged
            thread.start()
            thread.join(30)
            with pytest.raises(KeyError), db_connection_scope():  # noqa: PT012 - the scope is the point
                Item.objects.count()
                raise KeyError("body")
        # A failing initializer is logged with its traceback too.
        broken = DBExecutor(max_workers=1, initializer=backend_id, initargs=("nope",))
        with pytest.raises(Exception):  # noqa: B017, PT011 - BrokenThreadPool or the lookup
            broken.submit(int).result()
        broken.shutdown(wait=True)
    assert "cleanup" in captured.text  # the failures really were logged
    assert secret_user.leaks_in(captured.text) == []


def test_fork_never_logs_the_password(
    secret_user: SecretUser, captured: pytest.LogCaptureFixture, db_settings: SetSetting
) -> None:
    db_settings(aliases=("default",), CONN_MAX_AGE=60)
    backend_id()  # the forking thread's own connection, as the user

    async def on_bridge() -> int:
        return await db_call(backend_id)

    asyncio.run(on_bridge())
    assert get_bridge_executor().stats().open_connections == 1

    def use_and_close() -> None:
        backend_id()
        connections.close_all()

    plain = threading.Thread(target=use_and_close)
    plain.start()
    plain.join(30)

    def child() -> dict[str, Any]:
        backend_id()
        connections.close_all()
        return {"logs": captured.text}

    report = run_forked("os.fork", child)
    assert "discarded" in report["logs"]  # the child's own debug record
    assert secret_user.leaks_in(report["logs"]) == []
    assert secret_user.leaks_in(captured.text) == []
    connections.close_all()
