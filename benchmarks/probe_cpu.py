"""CPU per request of the project app, driven in process: no HTTP, no wrk, interleaved slices.

Over HTTP every server here saturates one core (the GIL), so its req/s is the
inverse of its CPU per request, and that is what this probe measures without
the noise of the HTTP layer, wrk and the network: the project app of
``bench_project.py`` (same settings, same database, same logged-in sessions)
is imported in one process per variant, all kept up side by side, and each is
driven in turn by ``--conns`` concurrent in-process clients (ASGI ``scope``,
``receive`` and ``send`` of their own) for slices of ``--requests`` requests,
the variants' order rotating each slice. CPU is the process's
(``time.process_time()``, which counts threads that have exited: stock
Django's per-request threads too); "loop" is the event loop's thread alone.
Ratios are medians of per-slice ratios against the last variant.

Variants: ``wrapper``, ``stock``, ``djpool`` (PostgreSQL) and ``a2wsgi``, as in
``bench_project.py``, and ``baseline``: the wrapper from another checkout
(``--baseline-src``) or under other settings (``--baseline-settings``), to
measure a change against what it changes. Every process runs uvloop, as
``uvicorn[standard]`` does.

    .venv/bin/python benchmarks/probe_cpu.py --backend mysql --path /one-query/sync/ \\
        --variants wrapper,a2wsgi
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks._common import http_scope

ROOT: Final = Path(__file__).resolve().parent.parent
VARIANTS: Final = ("wrapper", "baseline", "stock", "djpool", "a2wsgi")
CORS_ORIGIN: Final = "https://frontend.example.com"


# -- the served process ---------------------------------------------------------------


def _thread_cpu(tid: int) -> float:
    """Seconds of CPU the thread `tid` of this process has used."""
    with open(f"/proc/self/task/{tid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _scope(path: str, cookie: str, origin: str | None, n: int) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1:8000"), (b"cookie", f"sessionid={cookie}".encode())]
    if origin:
        headers.append((b"origin", origin.encode()))
    return http_scope(path, headers, ("127.0.0.1", 40000 + n % 1000))


async def _serve(variant: str, path: str, conns: int, keys: list[str], origin: str | None) -> None:
    """Answer each ``N`` line on stdin with one JSON line: N requests' CPU and statuses."""
    from benchmarks.project.asgi import application as app

    if variant in ("wrapper", "baseline"):
        # The wrapper sets up on lifespan startup, as under uvicorn --lifespan on.
        messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await messages.put({"type": "lifespan.startup"})
        started = asyncio.Event()

        async def lifespan_send(message: dict[str, Any]) -> None:
            if message["type"].startswith("lifespan.startup"):
                started.set()

        lifespan = asyncio.ensure_future(
            app({"type": "lifespan", "asgi": {"version": "3.0"}}, messages.get, lifespan_send)
        )
        await started.wait()
    loop = asyncio.get_running_loop()
    loop_tid = threading.get_native_id()
    print(json.dumps({"ready": True}), flush=True)

    async def one(n: int, statuses: dict[int, int]) -> None:
        sent = False
        forever = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await forever.wait()  # no disconnect: the client waits for its answer
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        await app(_scope(path, keys[n % len(keys)], origin, n), receive, send)

    while line := await loop.run_in_executor(None, sys.stdin.readline):
        total = int(line)
        statuses: dict[int, int] = {}
        numbers = iter(range(total))

        async def client(numbers: Iterator[int], statuses: dict[int, int]) -> None:
            for n in numbers:
                await one(n, statuses)

        cpu, wall, loop_cpu = time.process_time(), time.perf_counter(), _thread_cpu(loop_tid)
        await asyncio.gather(*(client(numbers, statuses) for _ in range(conns)))
        result = {
            "cpu_us": (time.process_time() - cpu) / total * 1e6,
            "wall_us": (time.perf_counter() - wall) / total * 1e6,
            "loop_us": (_thread_cpu(loop_tid) - loop_cpu) / total * 1e6,
            "statuses": statuses,
        }
        print(json.dumps(result), flush=True)
    if variant in ("wrapper", "baseline"):
        await messages.put({"type": "lifespan.shutdown"})
        await lifespan


def serve_main(args: argparse.Namespace) -> None:
    """The child: the project app of one variant, driven on request from the parent."""
    import uvloop

    keys = os.environ["PROBE_SESSION_KEYS"].split(",")
    origin = CORS_ORIGIN if os.environ.get("BENCH_STACK") == "real" else None
    uvloop.run(_serve(args.serve, args.path, args.conns, keys, origin))


# -- the parent -----------------------------------------------------------------------


class Served:
    """One child process serving one variant in process."""

    def __init__(self, variant: str, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.variant = variant
        src = args.baseline_src if variant == "baseline" else None
        child_env = {**os.environ, **env}
        child_env["BENCH_VARIANT"] = "wrapper" if variant == "baseline" else variant
        if variant == "baseline":
            child_env["BENCH_ASYNC_DBBRIDGE"] = json.dumps(args.baseline_settings)
        if src:
            child_env["BENCH_LIBRARY_SRC"] = str(Path(src).resolve())
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.probe_cpu",
                "--serve",
                variant,
                "--path",
                args.path,
                "--conns",
                str(args.conns),
            ],
            cwd=ROOT,
            env=child_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if "ready" not in self._read():
            raise RuntimeError(f"{variant}: the probe process did not start")

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.variant}: the probe process exited")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, requests: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{requests}\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def probe(args: argparse.Namespace) -> int:
    from benchmarks import bench_project

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {VARIANTS}")
    if "baseline" in variants and not (args.baseline_src or args.baseline_settings_given):
        raise SystemExit("variant 'baseline' needs --baseline-src or --baseline-settings")
    if "djpool" in variants and args.backend != "postgresql":
        raise SystemExit("djpool is Django's psycopg pool: PostgreSQL only")
    database = bench_project.Database.for_run(args.backend, "dbbridge_probe_cpu", 0)
    if args.stack == "real":
        database.static_root = str(Path(os.environ.get("TMPDIR", "/tmp"), "dbbridge_probe_static"))
    bench_project._setup_django(database, args.stack)
    database.create(64)
    env = {
        **database.server_env(),
        "DJANGO_SETTINGS_MODULE": bench_project.SETTINGS_MODULE,
        "BENCH_STACK": args.stack,
        "BENCH_STATIC_ROOT": database.static_root,
        "BENCH_POOL_SIZE": str(args.pool_size),
        "BENCH_HEALTH_CHECKS": "0",
        "BENCH_ASYNC_DBBRIDGE": json.dumps(args.wrapper_settings),
        "PROBE_SESSION_KEYS": ",".join(database.session_keys),
    }
    served: list[Served] = []
    try:
        for variant in variants:
            served.append(Served(variant, args, env))
        for each in served:
            each.run(args.requests)  # warm-up: connections, caches, threads
        results: dict[str, list[dict[str, Any]]] = {each.variant: [] for each in served}
        for n in range(args.slices):
            k = n % len(served)
            for each in served[k:] + served[:k]:
                results[each.variant].append(each.run(args.requests))
    finally:
        for each in served:
            each.close()
        database.drop()
    print(
        f"probe_cpu: {args.backend}, {args.stack} stack, {args.path}, {args.conns} in flight, "
        f"{args.slices} slices of {args.requests} requests, medians"
    )
    for variant, runs in results.items():
        statuses: dict[str, int] = {}
        for run in runs:
            for status, count in run["statuses"].items():
                statuses[status] = statuses.get(status, 0) + count
        print(
            f"  {variant:9s} CPU/request {statistics.median(r['cpu_us'] for r in runs):8.1f} us"
            f"  loop thread {statistics.median(r['loop_us'] for r in runs):7.1f} us"
            f"  wall {statistics.median(r['wall_us'] for r in runs):8.1f} us  statuses {statuses}"
        )
    reference = variants[-1]
    for variant in variants[:-1]:
        ratios = [
            a["cpu_us"] / b["cpu_us"]
            for a, b in zip(results[variant], results[reference], strict=True)
        ]
        print(f"  {variant} / {reference}: CPU per request {statistics.median(ratios):.3f}x")
    bad = [
        variant
        for variant, runs in results.items()
        if any(status != "200" for run in runs for status in run["statuses"])
    ]
    return 1 if bad else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backend", choices=("postgresql", "mysql"), default="postgresql")
    parser.add_argument("--stack", choices=("startproject", "real"), default="startproject")
    parser.add_argument("--path", default="/one-query/sync/", help="the view (bench_project's)")
    parser.add_argument("--variants", default="wrapper,a2wsgi", help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--baseline-src", help="a checkout the 'baseline' variant imports")
    parser.add_argument(
        "--wrapper-settings",
        default="{}",
        metavar="JSON",
        help="ASYNC_DBBRIDGE keys merged over bench_project's defaults (null removes a key)",
    )
    parser.add_argument(
        "--baseline-settings",
        metavar="JSON",
        help="the same for 'baseline' (default: the wrapper's); with no --baseline-src, "
        "'baseline' is this checkout under these settings",
    )
    parser.add_argument("--conns", type=int, default=32, help="requests in flight (32)")
    parser.add_argument("--requests", type=int, default=400, help="requests per slice (400)")
    parser.add_argument("--slices", type=int, default=8, help="interleaved slices (8)")
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("conns", "requests", "slices", "pool_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    from benchmarks.bench_project import _wrapper_settings_option

    args.baseline_settings_given = args.baseline_settings is not None
    try:
        args.wrapper_settings = _wrapper_settings_option(args.wrapper_settings, args.pool_size)
        args.baseline_settings = (
            args.wrapper_settings
            if args.baseline_settings is None
            else _wrapper_settings_option(args.baseline_settings, args.pool_size)
        )
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve_main(args)
        return 0
    return probe(args)


if __name__ == "__main__":
    sys.exit(main())
