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

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.scale import (
    AppServer,
    LoadResult,
    PgBouncer,
    Sampler,
    app_server,
    load,
    manage,
    pgbouncer,
    scale_database,
    scale_env,
    until,
)

pytestmark = [pytest.mark.vendor("postgresql"), pytest.mark.scale, pytest.mark.timeout(600)]

HOSTS = (1, 2, 3)
WORKERS = 2
POOL_SIZE = 4
BOUNCER_POOL = 10
REQUESTS = 600
CONCURRENCY = 48


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


@dataclass(frozen=True)
class Host:
    """A network namespace joined to this one by a veth pair."""

    namespace: str
    outside: str  # this namespace's end of the pair: where PgBouncer listens
    inside: str  # the host's address: where its uvicorn listens


def namespaces_unavailable() -> str | None:
    probe = f"dbbscale-{os.getpid()}-probe"
    try:
        done = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()} (needs root / CAP_SYS_ADMIN)"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


@contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """`count` namespaces with veth pairs and addresses, all removed after."""
    tag = os.getpid() % 10000
    # A /30 per host in 10.231.<tag % 250>.<4i>: test addresses, on no real network.
    net = f"10.231.{tag % 250}"
    made: list[Host] = []
    try:
        for i in range(count):
            host = Host(f"dbbscale-{os.getpid()}-h{i}", f"{net}.{4 * i + 1}", f"{net}.{4 * i + 2}")
            outside, inside = f"dbbs{tag}h{i}o", f"dbbs{tag}h{i}i"
            ip("netns", "add", host.namespace)
            made.append(host)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", host.namespace)
            ip("addr", "add", f"{host.outside}/30", "dev", outside)
            ip("link", "set", outside, "up")
            ip("-n", host.namespace, "addr", "add", f"{host.inside}/30", "dev", inside)
            ip("-n", host.namespace, "link", "set", inside, "up")
            ip("-n", host.namespace, "link", "set", "lo", "up")
        yield made
    finally:
        # Deleting a namespace deletes the pair's end inside it, and so the pair.
        for host in made:
            subprocess.run(["ip", "netns", "del", host.namespace], check=False)


@dataclass
class Round:
    hosts: int
    result: LoadResult
    server_sessions: int
    clients: int

    @property
    def rate(self) -> float:
        return self.result.requests / self.result.seconds


def serve_round(
    count: int, dbname: str, bouncer: PgBouncer, all_hosts: list[Host], logs: Path
) -> Round:
    sampler = Sampler(dbname)
    with ExitStack() as stack:
        servers: list[AppServer] = []
        for n, host in enumerate(all_hosts[:count]):
            env = scale_env(
                dbname,
                bouncer.port,
                SCALE_DB_HOST=host.outside,
                SCALE_POOL_SIZE=str(POOL_SIZE),
                SCALE_POOLER="pgbouncer-transaction",
                SCALE_PROCESSES=str(count * WORKERS),
            )
            servers.append(
                stack.enter_context(
                    app_server(
                        env,
                        logs,
                        workers=WORKERS,
                        host=host.inside,
                        netns=host.namespace,
                        name=f"{count}-hosts-{n}",
                    )
                )
            )
        urls = [f"{server.url}{path}" for server in servers for path in ("/primary/", "/slow/")]
        sampler.start()
        result = load(urls, REQUESTS, CONCURRENCY)
        clients = bouncer.clients(dbname)
        samples = sampler.stop()
        for server in servers:
            log = server.stop()
            assert "Traceback" not in log, log[-3000:]
    return Round(count, result, max(samples), clients)


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
                served = serve_round(count, dbname, bouncer, all_hosts, tmp_path)
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
