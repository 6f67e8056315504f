"""Read replicas: a primary and a streaming replica, two aliases and a router (issue #20).

scripts/replica.sh makes the replica (a second PostgreSQL cluster on port
5433, `pg_basebackup -R`, streaming from the primary). tests.scale_project
gets both aliases and `PrimaryReplicaRouter` (reads to the replica, writes to
the primary); `uvicorn --workers 2` serves it under continuous load while the
test stops the replica and starts it again. Sessions are counted on each
server (`pg_stat_activity`). Behind DBBRIDGE_SCALE=1 (marker `scale`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scale import (
    PGPORT,
    ROOT,
    ContinuousLoad,
    Sampler,
    app_server,
    direct,
    manage,
    scale_database,
    scale_env,
    server_sessions,
    until,
)

pytestmark = [pytest.mark.vendor("postgresql"), pytest.mark.scale, pytest.mark.timeout(300)]

POOL_SIZE = 4
WORKERS = 2
ROWS = 5


def replica(action: str) -> str:
    done = subprocess.run(
        [str(ROOT / "scripts" / "replica.sh"), action],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"scripts/replica.sh {action}: {done.stderr}"
    return done.stdout.strip()


@pytest.fixture
def replica_port() -> Iterator[int]:
    port = int(replica("ensure"))
    yield port
    replica("start")  # a failed test may have left it stopped


@pytest.fixture
def migrated(replica_port: int) -> Iterator[str]:
    with scale_database("scale_replica") as name:
        done = manage(scale_env(name, PGPORT), "migrate", "--no-input")
        assert done.returncode == 0, done.stdout + done.stderr
        with direct(name) as conn:
            conn.execute(
                "INSERT INTO testapp_item (name, value) "
                "SELECT 'item-' || i, i FROM generate_series(1, %s) AS i",
                (ROWS,),
            )

        def replicated() -> bool:
            try:
                with direct(name, port=replica_port) as conn:
                    row = conn.execute("SELECT count(*) FROM testapp_item").fetchone()
            except Exception:
                return False  # the database or table has not arrived yet
            return row is not None and row[0] == ROWS

        until(replicated, "the replica has the rows")
        yield name


def test_pool_bounds_both_aliases_and_a_stopped_replica_fails_only_its_views(
    migrated: str, replica_port: int, tmp_path: Path
) -> None:
    env = scale_env(migrated, PGPORT, SCALE_REPLICA_PORT=str(replica_port), SCALE_POOL_SIZE="4")
    bound = WORKERS * POOL_SIZE
    primary = Sampler(migrated)
    replica_sampler = Sampler(migrated, replica_port)
    with app_server(env, tmp_path, workers=WORKERS) as server:
        # The primary's views read pinned to it; /replica/ reads through the router.
        load = ContinuousLoad(server.url, ["/primary/", "/replica/", "/async/"], concurrency=24)
        load.phase = "before"
        load.start()
        primary.start()
        replica_sampler.start()
        try:
            until(lambda: load.count("before", "/replica/", 200) >= 150, "replica reads served")

            # Mid-load, the replica goes away (fast shutdown: its sessions are cut).
            load.phase = "stopping"
            replica("stop")
            load.phase = "stopped"
            until(lambda: load.count("stopped", "/replica/") >= 60, "replica reads while down")
            until(lambda: load.count("stopped", "/primary/") >= 60, "primary reads while down")
            # It comes back: reads through the router recover by themselves.
            load.phase = "starting"
            replica("start")
            load.phase = "back"
            until(lambda: load.count("back", "/replica/", 200) >= 60, "replica reads recovered")
        finally:
            load.stop()
            primary_samples = primary.stop()
            replica_samples = replica_sampler.stop()
        log = server.stop()

    # Nothing escaped the views' handling: no traceback in the servers' log.
    assert "Traceback" not in log, log[-3000:]
    # Before: everything served.
    for path in ("/primary/", "/replica/", "/async/"):
        assert set(load.statuses("before", path)) == {200}, (path, load.statuses("before", path))
    # While the replica was down: its views answered 503 (the project's
    # OperationalError middleware, docs/scale.md), never a 500 or a hang; the
    # primary's views were unaffected.
    assert set(load.statuses("stopped", "/replica/")) <= {200, 503}
    assert load.count("stopped", "/replica/", 503) > 0
    for path in ("/primary/", "/async/"):
        assert set(load.statuses("stopped", path)) == {200}, (path, load.statuses("stopped", path))
    # Back: the pool replaced the dead connections (health checks) and serves
    # again; no request failed other than with a 503, in any phase.
    assert load.count("back", "/replica/", 200) >= 60
    for phase in ("before", "stopping", "stopped", "starting", "back", "between"):
        for path in ("/primary/", "/async/"):
            assert set(load.statuses(phase, path)) <= {200}, (phase, path)
        assert set(load.statuses(phase, "/replica/")) <= {200, 503}, (phase, load.failures)
    # Both aliases bounded by processes x POOL_SIZE, and really used.
    assert 0 < max(primary_samples) <= bound, primary_samples
    assert 0 < max(replica_samples) <= bound, replica_samples
    # And cleaned: lifespan shutdown closed every session on both servers.
    until(lambda: server_sessions(migrated) == 0, "no session left on the primary")
    until(
        lambda: server_sessions(migrated, port=replica_port) == 0, "no session left on the replica"
    )
    print(
        "\nreplica stopped mid-load: /replica/ "
        f"{load.statuses('stopped', '/replica/')}, "
        f"/primary/ {load.statuses('stopped', '/primary/')}"
        f"; most sessions: primary {max(primary_samples)}, replica {max(replica_samples)} "
        f"(bound {bound}, {len(primary_samples)} and {len(replica_samples)} samples)"
    )
