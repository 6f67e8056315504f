"""Every ASGI server, serving a project-shaped app through the wrapper, and stopped.

Each server runs ``benchmarks.project`` (``startproject``'s middleware, admin,
sessions and auth, migrated) through ``async_dbbridge.asgi.get_asgi_application``
with ``POOL_SIZE = 3`` per worker, on its own database and role. The test
checks a few views, sends a bounded concurrent load while sampling the role's
server sessions (never more than workers x ``POOL_SIZE``), then signals the
server's master with SIGTERM or SIGINT and requires: the server exits, the
role's sessions reach 0 within `SESSIONS_TIMEOUT`, every worker that started
the library logged closing its pools (lifespan shutdown's line, or the exit
hook's where no lifespan shutdown ran), nothing was logged as an error, and on
MariaDB no aborted connection was logged for the role (each connection was
closed with COM_QUIT, not dropped).

The default run has the fast subset (``servers(fast=True)``, on PostgreSQL);
``DBBRIDGE_SERVERS=all`` runs every server on each server backend,
``DBBRIDGE_SERVERS=0`` none (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
from django.db import connections

from tests.servers import harness
from tests.servers.harness import (
    CLOSED_AT_EXIT,
    POOL_SIZE,
    SERVERS,
    SESSIONS_TIMEOUT,
    STARTED,
    STOPPED,
    MariaDBErrorLog,
    ProjectDatabase,
    ServerSpec,
    SessionCounter,
    count_lines,
)

pytestmark = [pytest.mark.requires_server, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def project_database() -> Iterator[ProjectDatabase]:
    vendor = connections["default"].vendor
    # The run's own database and role: other engineers' runs share the servers.
    database = ProjectDatabase(vendor, f"servers_{os.getpid()}")
    database.create()
    try:
        yield database
    finally:
        database.drop()


@pytest.fixture
def counter(project_database: ProjectDatabase) -> Iterator[SessionCounter]:
    counting = SessionCounter(project_database.backend, project_database.name)
    try:
        # A previous test's server is gone: nothing of the role is open.
        assert counting.wait_for(0, SESSIONS_TIMEOUT)[0] == 0
        yield counting
    finally:
        counting.close()


def _report(row: dict[str, object]) -> None:
    """One JSON line per run to DBBRIDGE_SERVERS_REPORT, when set (docs/deploy-servers.md)."""
    path = os.environ.get("DBBRIDGE_SERVERS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as report:
            report.write(json.dumps(row) + "\n")


def _params() -> list[object]:
    return [
        pytest.param(
            spec, signum, marks=pytest.mark.servers(fast=spec.fast), id=f"{spec.name}-{signum.name}"
        )
        for spec in SERVERS
        for signum in (signal.SIGTERM, signal.SIGINT)
    ]


@pytest.mark.parametrize(("spec", "signum"), _params())
def test_server_serves_within_the_bound_and_closes_every_session_on_signal(
    spec: ServerSpec,
    signum: signal.Signals,
    project_database: ProjectDatabase,
    counter: SessionCounter,
) -> None:
    backend = project_database.backend
    error_log = MariaDBErrorLog(counter) if backend == "mysql" else None
    bound = spec.workers * POOL_SIZE
    with harness.serving(spec, project_database) as server:
        key = project_database.session_keys[0]
        views = harness.check_views(server, key)
        assert views["anonymous /whoami/"][0] == 403, views
        assert views["anonymous /admin/login/"][0] == 200, views
        assert views["/whoami/"] == (200, "bench-0"), views
        assert views["/one-query/sync/"] == (200, "item 1"), views
        assert views["/one-query/async/"] == (200, "item 1"), views

        load = harness.run_load(server, counter, project_database.session_keys)
        assert load.non_2xx == 0, (load.statuses, server.output())
        # The load really opened sessions, and never more than the bound.
        assert 1 <= load.peak_sessions <= bound, (load.peak_sessions, bound)
        # Pooled connections stay open between requests (CONN_MAX_AGE=60):
        # there is something for the shutdown to close.
        open_before = counter.count()
        assert open_before >= 1

        if error_log is not None:
            error_log.mark()
        signalled = time.monotonic()
        code = server.stop(signum)
        exited = time.monotonic() - signalled
        remaining, waited = counter.wait_for(0, SESSIONS_TIMEOUT)
        output = server.output()
        errors = server.error_lines()

    started = count_lines(output, STARTED)
    stopped = count_lines(output, STOPPED)
    at_exit = count_lines(output, CLOSED_AT_EXIT)
    lifespan = spec.lifespan[0 if signum == signal.SIGTERM else 1]
    aborted = error_log.aborted() if error_log is not None else []
    _report(
        {
            "server": spec.name,
            "backend": backend,
            "signal": signum.name,
            "workers": spec.workers,
            "bound": bound,
            "requests": sum(load.statuses.values()),
            "non_2xx": load.non_2xx,
            "peak_sessions": load.peak_sessions,
            "open_before_signal": open_before,
            "sessions_after": remaining,
            "seconds_to_exit": round(exited, 2),
            "seconds_to_zero_after_exit": round(waited, 2),
            "exit_code": code,
            "workers_started": started,
            "closed_by_lifespan": stopped,
            "closed_by_exit_hook": at_exit,
            "errors_logged": len(errors),
            "aborted_connections": len(aborted),
        }
    )
    assert remaining == 0, f"{remaining} session(s) left {SESSIONS_TIMEOUT}s after exit:\n{output}"
    assert not errors, "\n".join(errors)
    assert aborted == [], aborted
    assert 1 <= started <= spec.workers, output
    # Each worker that started the library closed its pools, on the path this
    # server takes for this signal.
    if lifespan:
        assert (stopped, at_exit) == (started, 0), output
    else:
        assert (stopped, at_exit) == (0, started), output
