"""The dashboard's burst: the same load against each server in turn, measured over time.

Run by the dashboard (``POST /load``) as a process of its own, so that neither server
under test spends its CPU on generating load, and the browser's limits (six connections
per host, identical URLs served one after the other) play no part::

    python -m shop.load --out run.json --clients 48 --seconds 5 --delay 0.1 \\
        --target "async_dbbridge=http://127.0.0.1:8000" --target "stock Django=http://127.0.0.1:8001"

For each target, one after the other: ``--clients`` clients each send
``GET /products/sync?delay=...`` (a sync view that holds its database connection for
``delay`` seconds, like a slow query) back to back for ``--seconds`` seconds, each URL
unique. Every ``SAMPLE`` seconds the run records, per target: requests answered 2xx, 503
and otherwise (errors and refused connections) per second, requests in flight, and
from the target's ``/stats``: the database server's sessions and the threads waiting for
a pooled connection. ``--out`` is rewritten (atomically) after every sample, so the
dashboard can draw the run as it goes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

SAMPLE = 0.25
STATS_EVERY = 0.5
#: Seconds after the burst during which /stats is still sampled: stranded
#: connections stay, pooled ones go back (idle, within the pool's bound).
COOL_DOWN = 1.5
_unique = itertools.count()


class Target:
    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.samples: list[dict[str, Any]] = []
        self.error: str | None = None
        self.totals = {"ok": 0, "unavailable": 0, "errors": 0}
        self._window = {"ok": 0, "unavailable": 0, "errors": 0}
        self.in_flight = 0
        self.sessions: int | None = None
        self.waiting: int | None = None
        self.in_use: int | None = None
        self.pool_size: int | None = None
        self.mode: str | None = None

    def count(self, outcome: str) -> None:
        self.totals[outcome] += 1
        self._window[outcome] += 1

    def sample(self, t: float, interval: float) -> None:
        rates = {k: round(v / interval, 1) for k, v in self._window.items()}
        self._window = {"ok": 0, "unavailable": 0, "errors": 0}
        self.samples.append(
            {
                "t": round(t, 2),
                "ok_per_s": rates["ok"],
                "unavailable_per_s": rates["unavailable"],
                "errors_per_s": rates["errors"],
                "in_flight": self.in_flight,
                "waiting": self.waiting,
                "in_use": self.in_use,
                "sessions": self.sessions,
            }
        )

    def as_dict(self) -> dict[str, Any]:
        sessions = [s["sessions"] for s in self.samples if s["sessions"] is not None]
        return {
            "name": self.name,
            "url": self.url,
            "mode": self.mode,
            "pool_size": self.pool_size,
            "error": self.error,
            "totals": self.totals,
            "peak_sessions": max(sessions, default=None),
            "sessions_after": sessions[-1] if sessions else None,
            "samples": self.samples,
        }


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.targets = [Target(*spec.split("=", 1)) for spec in args.target]
        self.phase = "starting"
        self.started = time.time()

    def write(self) -> None:
        data = {
            "phase": self.phase,
            "started": self.started,
            "clients": self.args.clients,
            "seconds": self.args.seconds,
            "delay": self.args.delay,
            "sample": SAMPLE,
            "targets": [t.as_dict() for t in self.targets],
        }
        partial = self.out.with_suffix(".tmp")
        partial.write_text(json.dumps(data))
        os.replace(partial, self.out)

    async def main(self) -> None:
        limits = httpx.Limits(max_connections=self.args.clients + 4)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            for target in self.targets:
                self.phase = f"running: {target.name}"
                self.write()
                await self.burst(client, target)
        self.phase = "done"
        self.write()

    async def burst(self, client: httpx.AsyncClient, target: Target) -> None:
        try:
            await self.read_stats(client, target)
        except (httpx.HTTPError, ValueError) as exc:
            target.error = f"{target.url} did not answer /stats: {exc}"
            return
        start = time.monotonic()
        stop_at = start + self.args.seconds

        async def one_client() -> None:
            while time.monotonic() < stop_at:
                target.in_flight += 1
                try:
                    url = f"{target.url}/products/sync?delay={self.args.delay}&n={next(_unique)}"
                    reply = await client.get(url)
                    outcome = (
                        "ok"
                        if reply.status_code < 300
                        else "unavailable"
                        if reply.status_code == 503
                        else "errors"
                    )
                except httpx.HTTPError:
                    outcome = "errors"
                finally:
                    target.in_flight -= 1
                target.count(outcome)

        end = stop_at + COOL_DOWN

        async def stats_reader() -> None:
            # Apart from the sampler: a server slow to answer /stats under load
            # must not stretch the samples' interval.
            while time.monotonic() < end:
                try:
                    await self.read_stats(client, target)
                except (httpx.HTTPError, ValueError):
                    pass  # a busy server: keep the last figures
                await asyncio.sleep(STATS_EVERY)

        async def sampler() -> None:
            previous = start
            while True:
                await asyncio.sleep(SAMPLE)
                now = time.monotonic()
                target.sample(now - start, now - previous)
                previous = now
                self.write()
                if now >= end:
                    return

        await asyncio.gather(
            sampler(), stats_reader(), *(one_client() for _ in range(self.args.clients))
        )

    async def read_stats(self, client: httpx.AsyncClient, target: Target) -> None:
        stats = (await client.get(f"{target.url}/stats")).json()
        target.mode = stats["request_mode"]
        target.sessions = stats["server_sessions"].get("default")
        pool = stats["pools"].get("default")
        target.waiting = pool["waiting"] if pool else None
        target.in_use = pool["in_use"] if pool else None
        target.pool_size = pool["max_size"] if pool else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", action="append", required=True, help="NAME=URL")
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--delay", type=float, default=0.1)
    asyncio.run(Run(parser.parse_args()).main())


if __name__ == "__main__":
    main()
