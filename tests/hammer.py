"""Clients that hammer one URL from a process of their own (no GIL shared with the server).

Run as ``python -m tests.hammer URL CLIENTS CLIENT_TIMEOUT``: each of CLIENTS
clients sends requests back to back until standard input closes; a request
that takes longer than CLIENT_TIMEOUT seconds is given up (status 0, as wrk
does); after any answer but a 200 a client pauses 0.5 s, then sends the next.
One line per reply on standard output: ``<time.monotonic()> <status>`` (-1:
the connection broke). CLOCK_MONOTONIC is
system-wide on Linux, so the test compares these times with its own.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx


async def main(url: str, clients: int, client_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the test closes stdin to stop us
    lines: list[str] = []

    async def flush() -> None:
        while not stop.is_set():
            if lines:
                sys.stdout.write("".join(lines))
                sys.stdout.flush()
                lines.clear()
            await asyncio.sleep(0.02)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=client_timeout, trust_env=False) as client:

        async def one() -> None:
            while not stop.is_set():
                try:
                    status = (await client.get(url)).status_code
                except httpx.TimeoutException:
                    status = 0
                except httpx.TransportError:
                    status = -1
                lines.append(f"{time.monotonic():.6f} {status}\n")
                if status != 200:
                    # A client that honours Retry-After only in part (a load
                    # balancer's retry backoff, say): half a second, then again.
                    await asyncio.sleep(0.5)

        await asyncio.gather(flush(), *(one() for _ in range(clients)))
    sys.stdout.write("".join(lines))
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
