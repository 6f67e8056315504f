"""The wrapper under load behind PgBouncer in transaction mode (issue #20).

`uvicorn --workers 2` serves tests.scale_project through a PgBouncer the test
starts (transaction mode, server pool 10, max_client_conn 2000) with
`POOL_SIZE` 8: 16 client connections at most, multiplexed by PgBouncer onto
at most 10 server sessions. Counted where they live: server sessions in
`pg_stat_activity`, client connections in PgBouncer's `SHOW CLIENTS`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.scale import (
    PgBouncer,
    Sampler,
    app_server,
    direct,
    load,
    manage,
    pgbouncer,
    scale_database,
    scale_env,
    until,
)

pytestmark = [pytest.mark.vendor("postgresql"), pytest.mark.timeout(240)]

POOL = 10
ROWS = 7  # values 0..6: /iterate/ sums 21 over four fetches of 2
REQUESTS = 480


@pytest.fixture
def bouncer() -> Iterator[PgBouncer]:
    with pgbouncer(pool_size=POOL) as running:
        yield running


@pytest.fixture
def migrated(bouncer: PgBouncer) -> Iterator[str]:
    """The test's database, migrated through PgBouncer, with ROWS items."""
    with scale_database("scale_bouncer") as name:
        done = manage(scale_env(name, bouncer.port), "migrate", "--no-input")
        assert done.returncode == 0, done.stdout + done.stderr
        with direct(name) as conn:
            conn.execute(
                "INSERT INTO testapp_item (name, value) SELECT 'item-' || i, i "
                "FROM generate_series(0, %s) AS i",
                (ROWS - 1,),
            )
        yield name


def test_wrapper_under_load_behind_pgbouncer_stays_within_its_pool(
    bouncer: PgBouncer, migrated: str, tmp_path: Path
) -> None:
    env = scale_env(
        migrated,
        bouncer.port,
        SCALE_POOL_SIZE="8",
        SCALE_POOLER="pgbouncer-transaction",
        SCALE_PROCESSES="2",
    )
    sampler = Sampler(migrated)
    with app_server(env, tmp_path, workers=2) as server:
        # The server sessions really are PgBouncer's: the backend a request
        # reports is one of the server's sessions on this database.
        sampler.start()
        # /slow/ holds a server session 50 ms: with 32 clients in flight the
        # 16 client connections want more server sessions than PgBouncer has.
        paths = ["/primary/", "/iterate/", "/async/", "/backend/", "/slow/"]
        result = load([server.url + path for path in paths], requests=REQUESTS, concurrency=32)
        clients_under_load = bouncer.clients(migrated)
        samples = sampler.stop()
        # The .iterator() view read every row, in chunks, through the pooler.
        iterated = httpx.get(server.url + "/iterate/", timeout=30, trust_env=False)
        log = server.stop()
    assert iterated.json() == {"total": sum(range(ROWS))}
    assert result.requests == REQUESTS
    assert result.non_2xx == 0, (result.statuses, result.errors, log[-3000:])
    # Connections were really opened, and never more than PgBouncer's pool.
    assert max(samples) > 0
    assert max(samples) <= POOL, samples
    # Clients: at most 2 processes x POOL_SIZE 8.
    assert 0 < clients_under_load <= 16
    # After SIGTERM: every client connection to PgBouncer closed by the
    # lifespan shutdown (PgBouncer keeps its own server pool, as it should).
    until(lambda: bouncer.clients(migrated) == 0, "no client of PgBouncer left")
    assert "InvalidCursorName" not in log
    print(
        f"\nbehind PgBouncer: {result.requests} requests, {result.requests / result.seconds:.0f} "
        f"req/s, max {max(samples)} server sessions (pool {POOL}), {clients_under_load} clients"
    )


def test_control_server_side_cursors_break_behind_a_transaction_pooler(
    bouncer: PgBouncer, migrated: str, tmp_path: Path
) -> None:
    # What W010 warns about: with DISABLE_SERVER_SIDE_CURSORS off, .iterator()
    # declares a named cursor (WITH HOLD, in autocommit) on one server
    # session, and PgBouncer may send the next FETCH to another.
    env = scale_env(migrated, bouncer.port, SCALE_POOL_SIZE="8", SCALE_SERVER_SIDE_CURSORS="on")
    with app_server(env, tmp_path, workers=2) as server:
        result = load([server.url + "/iterate/"], requests=120, concurrency=32)
        log = server.stop()
    assert result.non_2xx > 0, result.statuses
    assert "InvalidCursorName" in log or "does not exist" in log
    print(f"\nserver-side cursors behind PgBouncer: {result.non_2xx} of {result.requests} failed")
