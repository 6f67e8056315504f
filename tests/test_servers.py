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

The default run has the fast subset (``servers(fast=True)``, one run per way the pools get
closed: uvicorn on SIGTERM, lifespan; uvicorn ``--lifespan off`` on SIGTERM, the drain on the
signal; gunicorn ``-k asgi`` on SIGINT, the exit hook; and the graceful timeout; on PostgreSQL);
``DBBRIDGE_SERVERS=all`` runs every server on each server backend,
``DBBRIDGE_SERVERS=0`` none (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.db import connections

from tests.servers import harness
from tests.servers.harness import (
    CLOSED_AT_EXIT,
    DRAINED,
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


def _params() -> list[Any]:
    params: list[Any] = []
    for spec in SERVERS:
        gaps = dict(spec.gaps)
        for signum in (signal.SIGTERM, signal.SIGINT):
            marks = [pytest.mark.servers(fast=signum.name in spec.fast)]
            if signum.name in gaps:
                marks.append(pytest.mark.xfail(reason=gaps[signum.name], strict=True))
            params.append(pytest.param(spec, signum, marks=marks, id=f"{spec.name}-{signum.name}"))
    return params


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
    drained = count_lines(output, DRAINED)
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
            "closed_by_signal_drain": drained,
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
        assert (stopped, at_exit, drained) == (started, 0, 0), output
    elif spec.drains:
        assert (stopped, drained) == (0, started), output
    else:
        assert (stopped, at_exit) == (0, started), output


@pytest.mark.servers(fast=True)
def test_requests_cancelled_by_the_graceful_timeout_end_quietly_and_leave_no_session(
    project_database: ProjectDatabase, counter: SessionCounter
) -> None:
    """uvicorn cancels the requests still running 1 s after SIGTERM; their views' queries
    take 4 s. The server answers them itself; the library lets each request's thread
    finish its call, drops what the app sends after that, gives the connections back
    and closes them: nothing logged but uvicorn's own line per cancelled request."""
    spec = harness.GRACEFUL_TIMEOUT
    in_flight = 6
    error_log = MariaDBErrorLog(counter) if project_database.backend == "mysql" else None
    with harness.serving(spec, project_database, {"POOL_SIZE": in_flight}) as server:
        statuses: list[object] = []

        def slow_request(index: int) -> None:
            cookies = {"sessionid": project_database.session_keys[index]}
            try:
                response = httpx.get(server.url("/slow-query/"), cookies=cookies, timeout=60)
                statuses.append(response.status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

        clients = [threading.Thread(target=slow_request, args=(n,)) for n in range(in_flight)]
        for client in clients:
            client.start()
        # Every request holds a session for its slow query: all are in flight.
        assert counter.wait_for(in_flight, 30)[0] == in_flight
        if error_log is not None:
            error_log.mark()
        server.stop(signal.SIGTERM)
        for client in clients:
            client.join(30)
        remaining, _ = counter.wait_for(0, SESSIONS_TIMEOUT)
        output = server.output()

    # The server answered each cancelled request (500) or dropped it.
    assert len(statuses) == in_flight
    assert 200 not in statuses, statuses
    assert remaining == 0, output
    cancelled = count_lines(output, "Task cancelled, timeout graceful shutdown exceeded")
    assert cancelled >= 1, output  # the graceful timeout really cancelled requests
    leftovers = [
        line
        for line in output.splitlines()
        if any(marker in line for marker in harness.LEFTOVER_MARKERS)
    ]
    assert leftovers == [], output
    assert count_lines(output, STOPPED) == 1, output
    if error_log is not None:
        assert error_log.aborted() == []
