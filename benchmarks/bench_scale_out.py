"""Several app hosts through one PgBouncer: req/s and sessions per host count.

The harness of tests/test_scale_out.py (tests/scale.py): each host is a
network namespace running ``uvicorn --workers W`` on tests.scale_project with
``POOL_SIZE`` P, all connecting to one PgBouncer (transaction mode) in front of
PostgreSQL. Rounds are interleaved — every round serves each host count once,
in a rotated order — so drift on a shared machine spreads over every count;
the report gives each count's median req/s, its ratio to one host, and the
most server sessions and PgBouncer clients seen.

Needs root (namespaces), PostgreSQL on 127.0.0.1:5432 and Debian's pgbouncer::

    .venv/bin/python -m benchmarks.bench_scale_out --rounds 3 --hosts 1 2 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from tests.scale import (
    Round,
    hosts,
    manage,
    namespaces_unavailable,
    pgbouncer,
    scale_database,
    scale_env,
    serve_round,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers per host")
    parser.add_argument("--pool-size", type=int, default=4, help="POOL_SIZE per process")
    parser.add_argument("--bouncer-pool", type=int, default=10, help="PgBouncer's pool")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=48)
    args = parser.parse_args(argv)
    why = namespaces_unavailable()
    if why is not None:
        print(f"network namespaces are unavailable: {why}", file=sys.stderr)
        return 1
    results: dict[int, list[Round]] = {count: [] for count in args.hosts}
    logs = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    with hosts(max(args.hosts)) as all_hosts, scale_database("bench_hosts") as dbname:
        listen = ",".join(["127.0.0.1", *(host.outside for host in all_hosts)])
        with pgbouncer(pool_size=args.bouncer_pool, listen_addr=listen) as bouncer:
            done = manage(scale_env(dbname, bouncer.port), "migrate", "--no-input")
            if done.returncode != 0:
                print(done.stdout + done.stderr, file=sys.stderr)
                return 1
            for n in range(args.rounds):
                # Rotated order: no host count always runs first (or last).
                order = args.hosts[n % len(args.hosts) :] + args.hosts[: n % len(args.hosts)]
                for count in order:
                    served = serve_round(
                        count,
                        dbname,
                        bouncer,
                        all_hosts,
                        logs,
                        workers=args.workers,
                        pool_size=args.pool_size,
                        requests=args.requests,
                        concurrency=args.concurrency,
                    )
                    results[count].append(served)
                    print(
                        f"round {n + 1}: {count} host(s): {served.rate:.0f} req/s, "
                        f"{served.result.non_2xx} non-2xx, {served.server_sessions} server "
                        f"sessions, {served.clients} PgBouncer clients",
                        file=sys.stderr,
                    )
    base = statistics.median(r.rate for r in results[args.hosts[0]])
    print(
        f"\n{args.workers} uvicorn workers per host, POOL_SIZE {args.pool_size}, PgBouncer pool "
        f"{args.bouncer_pool}, {args.requests} requests x {args.rounds} rounds, "
        f"{args.concurrency} at a time\n"
    )
    print("| hosts | processes | req/s (median) | vs 1st | non-2xx | server sessions | clients |")
    print("|---|---|---|---|---|---|---|")
    for count, rounds in results.items():
        rate = statistics.median(r.rate for r in rounds)
        print(
            f"| {count} | {count * args.workers} | {rate:.0f} | {rate / base:.2f}x | "
            f"{sum(r.result.non_2xx for r in rounds)} | "
            f"{max(r.server_sessions for r in rounds)} | {max(r.clients for r in rounds)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
