"""Several app hosts through one PgBouncer (issue #20): network namespaces as hosts.

Each host is a network namespace the test creates (`ip netns add`), joined to
this one by a veth pair with addresses the test assigns, running `uvicorn
--workers 2` on tests.scale_project with `POOL_SIZE` 4. Every host connects
to one PgBouncer (transaction mode, server pool 10, listening on the
host-side address of each pair), which connects to PostgreSQL. For 1, 2 and
3 hosts: 0 non-2xx, server sessions within PgBouncer's pool, PgBouncer's
clients within hosts x workers x `POOL_SIZE`, none left after the hosts
shut down; req/s and sessions are printed per host count (measured, never
asserted: benchmarks/bench_scale_out.py runs the same in interleaved rounds).

If namespaces cannot be made here (no CAP_SYS_ADMIN, no `ip`), the test
fails saying so. Behind DBBRIDGE_SCALE=1 (marker `scale`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scale import (
    Round,
    hosts,
    manage,
    namespaces_unavailable,
    pgbouncer,
    scale_database,
    scale_env,
    serve_round,
    until,
)

pytestmark = [pytest.mark.vendor("postgresql"), pytest.mark.scale, pytest.mark.timeout(600)]

HOSTS = (1, 2, 3)
WORKERS = 2
POOL_SIZE = 4
BOUNCER_POOL = 10
REQUESTS = 600
CONCURRENCY = 48


def test_hosts_in_namespaces_share_one_pgbouncer_within_its_pool(tmp_path: Path) -> None:
    why = namespaces_unavailable()
    if why is not None:
        pytest.fail(f"network namespaces are unavailable, so no host can be simulated: {why}")
    rounds: list[Round] = []
    with hosts(max(HOSTS)) as all_hosts, scale_database("scale_hosts") as dbname:
        listen = ",".join(["127.0.0.1", *(host.outside for host in all_hosts)])
        with pgbouncer(pool_size=BOUNCER_POOL, listen_addr=listen) as bouncer:
            done = manage(scale_env(dbname, bouncer.port), "migrate", "--no-input")
            assert done.returncode == 0, done.stdout + done.stderr
            for count in HOSTS:
                served = serve_round(
                    count,
                    dbname,
                    bouncer,
                    all_hosts,
                    tmp_path,
                    workers=WORKERS,
                    pool_size=POOL_SIZE,
                    requests=REQUESTS,
                    concurrency=CONCURRENCY,
                )
                rounds.append(served)
                assert served.result.requests == REQUESTS
                assert served.result.non_2xx == 0, (served.result.statuses, served.result.errors)
                # Really used, and within PgBouncer's pool whatever the host count.
                assert 0 < served.server_sessions <= BOUNCER_POOL
                assert 0 < served.clients <= count * WORKERS * POOL_SIZE
                # Every host's lifespan shutdown closed its clients.
                until(lambda: bouncer.clients(dbname) == 0, f"no client left after {count} hosts")
    print("\n| hosts | processes | req/s | most server sessions | PgBouncer clients |")
    print("|---|---|---|---|---|")
    for r in rounds:
        print(
            f"| {r.hosts} | {r.hosts * WORKERS} | {r.rate:.0f} | {r.server_sessions} "
            f"(pool {BOUNCER_POOL}) | {r.clients} (bound {r.hosts * WORKERS * POOL_SIZE}) |"
        )
