"""CPU per thread hop: one no-op sync call from the event loop, six ways, interleaved.

An async view pays one round trip to a thread per sync call (each async ORM
query, Django's adapted middleware hooks, ``request_started``, the response's
``close()``), so the CPU a hop costs, times the hops a request makes, is most
of what separates ASGI servers on a CPU-bound machine. Each "request" here
makes ``--hops`` calls of a no-op function; ``--conns`` requests are in flight
at once; CPU is the process's (``time.process_time()``), per hop. Paths:

* ``wrapper`` — ``sync_to_async(thread_sensitive=True)`` inside
  ``ThreadSensitiveContext(executor=RequestBinding(...))``: the ASGI wrapper's
  request threads, as Django's own calls reach them;
* ``stock`` — the same call inside a plain ``ThreadSensitiveContext()``:
  asgiref's thread per request, as stock Django runs under ASGI;
* ``binding`` — ``loop.run_in_executor(binding, fn)``: the request thread
  without asgiref's ``SyncToAsync`` around the call;
* ``s2a-binding`` — ``sync_to_async(fn, thread_sensitive=False, executor=binding)``:
  ``SyncToAsync``'s own cost, without its thread-sensitive lookups;
* ``s2a-pool`` — the same on a shared 8-thread pool;
* ``raw`` — ``loop.run_in_executor(ThreadPoolExecutor(8), fn)``: no thread
  affinity, threads shared by every request.

The settings are the test suite's (SQLite; no call touches a database).

    .venv/bin/python benchmarks/probe_hop.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, cast

ROOT: Final = Path(__file__).resolve().parent.parent
PATHS: Final = ("wrapper", "stock", "binding", "s2a-binding", "s2a-pool", "raw")


def _noop() -> None:
    return None


def _requests(hops: int) -> dict[str, Callable[[], Awaitable[None]]]:
    """One coroutine function per path: a request making `hops` no-op calls."""
    from asgiref.sync import ThreadSensitiveContext, sync_to_async

    from async_dbbridge._binding import RequestBinding
    from async_dbbridge._request_threads import RequestThreads

    threads = RequestThreads(hold="transaction", idle_timeout=60)
    pool = ThreadPoolExecutor(8)
    sensitive = sync_to_async(_noop, thread_sensitive=True)
    on_pool = sync_to_async(_noop, thread_sensitive=False, executor=pool)

    async def wrapper() -> None:
        binding = RequestBinding(threads)
        async with ThreadSensitiveContext(executor=binding):
            for _ in range(hops):
                await sensitive()
        await asyncio.wrap_future(binding.end())

    async def stock() -> None:
        async with ThreadSensitiveContext():
            for _ in range(hops):
                await sensitive()

    async def binding() -> None:
        loop = asyncio.get_running_loop()
        binding = RequestBinding(threads)
        for _ in range(hops):
            await loop.run_in_executor(binding, _noop)
        await asyncio.wrap_future(binding.end())

    async def s2a_binding() -> None:
        binding = RequestBinding(threads)
        # asgiref types `executor` as a ThreadPoolExecutor; any Executor works.
        call = sync_to_async(
            _noop, thread_sensitive=False, executor=cast("ThreadPoolExecutor", binding)
        )
        for _ in range(hops):
            await call()
        await asyncio.wrap_future(binding.end())

    async def s2a_pool() -> None:
        for _ in range(hops):
            await on_pool()

    async def raw() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(hops):
            await loop.run_in_executor(pool, _noop)

    return {
        "wrapper": wrapper,
        "stock": stock,
        "binding": binding,
        "s2a-binding": s2a_binding,
        "s2a-pool": s2a_pool,
        "raw": raw,
    }


async def _cpu_per_hop(
    request: Callable[[], Awaitable[None]], requests: int, conns: int, hops: int
) -> float:
    async def client(numbers: Iterator[int]) -> None:
        for _ in numbers:
            await request()

    numbers = iter(range(requests))
    started = time.process_time()
    await asyncio.gather(*(client(numbers) for _ in range(conns)))
    return (time.process_time() - started) / (requests * hops) * 1e6


async def _probe(args: argparse.Namespace) -> dict[str, list[float]]:
    paths = _requests(args.hops)
    chosen = args.paths.split(",")
    for name in chosen:  # warm-up: threads started, code paths hot
        await _cpu_per_hop(paths[name], args.requests, args.conns, args.hops)
    results: dict[str, list[float]] = {name: [] for name in chosen}
    for n in range(args.rounds):
        k = n % len(chosen)
        for name in chosen[k:] + chosen[:k]:
            cpu = await _cpu_per_hop(paths[name], args.requests, args.conns, args.hops)
            results[name].append(cpu)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--paths", default=",".join(PATHS), help=f"from {', '.join(PATHS)}")
    parser.add_argument("--conns", type=int, default=32, help="requests in flight (32)")
    parser.add_argument("--hops", type=int, default=10, help="calls per request (10)")
    parser.add_argument("--requests", type=int, default=200, help="requests per round (200)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (7)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.paths.split(",") if name not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    for name in ("conns", "hops", "requests", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    os.environ.setdefault("DB_BACKEND", "sqlite")
    import django
    import uvloop

    django.setup()
    results = uvloop.run(_probe(args))
    print(
        f"probe_hop: CPU per no-op hop, {args.conns} requests in flight, {args.hops} hops each, "
        f"medians of {args.rounds} interleaved rounds (uvloop)"
    )
    for name, samples in results.items():
        print(f"  {name:12s} {statistics.median(samples):7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
