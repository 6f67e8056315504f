"""Serve the demo with uvicorn in a thread, request every URL once, shut down.

Usage (from anywhere; exit status 0 when everything passed)::

    .venv/bin/python demo_asgi/smoke_test.py               # SQLite file in a temp dir
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dbbridge_demo \\
        .venv/bin/python demo_asgi/smoke_test.py
    .venv/bin/python demo_asgi/smoke_test.py --app django  # stock Django handler, to compare
    .venv/bin/python demo_asgi/smoke_test.py --stats-json /tmp/stats.json  # keep the last /stats

Without ``DATABASE_URL`` the database is a fresh SQLite file in a temporary
directory, removed afterwards. The database is created if missing (local
servers only), migrated and seeded; the server listens on a free port of
127.0.0.1. Each URL must answer 2xx, with JSON where JSON is expected. After
shutdown, the server must show no session left on the database (with the
async_dbbridge ASGI application; stock Django's is only reported, since
stranding connections is what it is known for).

Runs Django with the demo's settings, so run it in its own process (for
example ``subprocess.run([sys.executable, "demo_asgi/smoke_test.py"])`` from a
test), not inside a process that already configured other settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).resolve().parent
BRIDGE_APP = "demo_asgi.asgi:application"
# Stock Django, built by uvicorn calling the factory: the baseline the bridge improves on.
DJANGO_APP = "django.core.asgi:get_asgi_application"
START_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0


class SmokeFailure(Exception):
    pass


def _prepare_database() -> None:
    from django.core.management import call_command
    from django.db import connections

    call_command("create_demo_database")
    call_command("migrate", interactive=False, verbosity=0)
    call_command("seed_demo")
    # The server's sessions are counted at the end: this thread must hold none.
    connections.close_all()


def _start_server(app: str) -> tuple[Any, threading.Thread, str]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Bound here and handed to uvicorn, so no other process can take the port
    # between choosing it and listening on it.
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, factory=app == DJANGO_APP, lifespan="auto", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    # Off the main thread uvicorn installs no signal handlers; shutdown is
    # requested through server.should_exit instead.
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="smoke-uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if not thread.is_alive():
            raise SmokeFailure("uvicorn exited during startup (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise SmokeFailure(f"uvicorn did not start within {START_TIMEOUT}s")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _check(
    client: Any,
    method: str,
    url: str,
    *,
    expect: Callable[[Any], str | None] | None = None,
    json_body: dict[str, Any] | None = None,
) -> Any:
    """One request; returns the decoded JSON (or the text for HTML)."""
    started = time.perf_counter()
    response = client.request(method, url, json=json_body)
    elapsed = (time.perf_counter() - started) * 1000
    if not 200 <= response.status_code < 300:
        raise SmokeFailure(f"{method} {url}: HTTP {response.status_code}: {response.text[:300]}")
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        body: Any = response.json()
    elif content_type.startswith("text/html"):
        body = response.text
    else:
        raise SmokeFailure(f"{method} {url}: unexpected content type {content_type!r}")
    problem = expect(body) if expect is not None else None
    if problem:
        raise SmokeFailure(f"{method} {url}: {problem}")
    detail = body.get("thread", "") if isinstance(body, dict) else ""
    print(f"  ok  {response.status_code} {method:4} {url:26} {elapsed:7.1f} ms  {detail}")
    return body


def _expect_products(body: Any) -> str | None:
    if not isinstance(body, dict) or not body.get("products"):
        return "expected a JSON object with a non-empty 'products' list"
    return None


#: The keys of /stats, and of its "bridge", "request_threads" and per-alias "pools"
#: objects: each figure once.
STATS_KEYS = frozenset(
    {
        "request_mode",
        "request_threads",
        "pools",
        "bridge",
        "server_sessions",
        "process_connections",
        "vendors",
        "time",
    }
)
BRIDGE_KEYS = frozenset(
    {
        "max_workers",
        "workers",
        "busy",
        "idle",
        "queued",
        "calls",
        "errors",
        "connection_policy",
        "shutting_down",
    }
)
REQUEST_THREAD_KEYS = frozenset({"busy", "idle", "started", "retired", "closing"})
POOL_KEYS = frozenset(
    {
        "max_size",
        "in_use",
        "idle",
        "waiting",
        "opened",
        "closed",
        "checkouts",
        "timeouts",
        "wait_time_total",
        "wait_time_max",
        "rejected",
        "health_checks",
        "replaced",
        "max_waiting",
    }
)


def _expect_stats(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "expected a JSON object"
    if set(body) != STATS_KEYS:
        return f"keys {sorted(body)}, expected {sorted(STATS_KEYS)}"
    bridge = body["bridge"]
    if bridge is not None and set(bridge) != BRIDGE_KEYS:
        return f"'bridge' has keys {sorted(bridge)}, expected {sorted(BRIDGE_KEYS)}"
    threads = body["request_threads"]
    if threads is not None and set(threads) != REQUEST_THREAD_KEYS:
        return (
            f"'request_threads' has keys {sorted(threads)}, expected {sorted(REQUEST_THREAD_KEYS)}"
        )
    for alias, pool in body["pools"].items():
        if set(pool) != POOL_KEYS:
            return f"pool {alias!r} has keys {sorted(pool)}, expected {sorted(POOL_KEYS)}"
    return None


def _expect_dashboard(body: Any) -> str | None:
    if not isinstance(body, str) or "async_dbbridge demo" not in body or "/stats" not in body:
        return "the dashboard page did not render"
    return None


def _exercise(base_url: str) -> Any:
    """Request every URL once; return the last /stats, taken after all the others."""
    import httpx

    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT) as client:
        _check(client, "GET", "/", expect=_expect_dashboard)
        _check(client, "GET", "/stats", expect=_expect_stats)
        products = None
        for url in (
            "/products/db-call",
            "/products/sync-to-async",
            "/products/sync",
            "/products/async-orm",
        ):
            products = _check(client, "GET", url, expect=_expect_products)
        assert products is not None
        in_stock = next(p for p in products["products"] if p["stock"] > 0)
        _check(
            client,
            "POST",
            "/orders",
            json_body={"product": in_stock["id"], "quantity": 1},
            expect=lambda b: None if b.get("stock_left") == in_stock["stock"] - 1 else "stock",
        )
        _check(client, "GET", "/orders", expect=lambda b: None if b.get("orders") else "no orders")
        # A refused order is an answer, not a bridge error (the last /stats shows errors 0).
        refused = client.post("/orders", json={"product": 10**9, "quantity": 1})
        if refused.status_code != 404:
            raise SmokeFailure(f"POST /orders (no such product): HTTP {refused.status_code}")
        icon = client.get("/favicon.ico")
        if icon.status_code != 200 or icon.headers.get("content-type") != "image/svg+xml":
            raise SmokeFailure(f"GET /favicon.ico: HTTP {icon.status_code}")
        _check(
            client,
            "GET",
            "/load",
            expect=lambda b: None if b.get("phase") == "idle" else f"phase {b.get('phase')!r}",
        )
        return _check(
            client,
            "GET",
            "/stats",
            expect=lambda b: _expect_stats(b) or (None if b["bridge"]["calls"] else "no calls"),
        )


def _sessions_after_shutdown(strict: bool) -> None:
    from django.conf import settings

    from async_dbbridge import reset_bridge_executor
    from async_dbbridge.testing import close_monitor, wait_for_server_sessions

    # The ASGI lifespan shutdown already did this for the bridge application;
    # for stock Django it stops the bridge /stats started, so what remains is
    # what the request threads stranded.
    reset_bridge_executor(wait=True)
    try:
        for alias in settings.DATABASES:
            try:
                wait_for_server_sessions(alias, 0, timeout=10.0)
            except AssertionError as exc:
                if strict:
                    raise SmokeFailure(f"left open after shutdown: {exc}") from None
                print(f"  note: {exc} (stock Django strands request-thread connections)")
            else:
                print(f"  ok  database {alias!r}: no session left after shutdown")
    finally:
        close_monitor()


def run(app: str = BRIDGE_APP, stats_json: Path | None = None) -> None:
    """Migrate, seed, serve ``app``, exercise every URL, shut down; raise SmokeFailure.

    ``stats_json``: where to write the last ``/stats`` answer, for a caller to inspect.
    """
    sys.path.insert(0, str(DEMO_DIR))
    # Forced, not setdefault: a test runner calling this may export its own.
    os.environ["DJANGO_SETTINGS_MODULE"] = "demo_asgi.settings"
    tmp_dir = None
    if not os.environ.get("DATABASE_URL"):
        tmp_dir = tempfile.mkdtemp(prefix="dbbridge-demo-")
        os.environ["DATABASE_URL"] = f"sqlite:///{tmp_dir}/demo.sqlite3"
    try:
        import django

        django.setup()
        from django.db import connections

        print(f"smoke test: {app} on {connections['default'].vendor}")
        _prepare_database()
        server, thread, base_url = _start_server(app)
        try:
            stats = _exercise(base_url)
            if stats_json is not None:
                stats_json.write_text(json.dumps(stats, indent=2))
        finally:
            server.should_exit = True
            thread.join(timeout=START_TIMEOUT)
            if thread.is_alive():
                raise SmokeFailure("uvicorn did not shut down")
        _sessions_after_shutdown(strict=app == BRIDGE_APP)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--app",
        default="bridge",
        choices=("bridge", "django"),
        help="bridge: demo_asgi.asgi:application (default); django: stock get_asgi_application()",
    )
    parser.add_argument(
        "--stats-json",
        type=Path,
        help="write the last /stats answer (taken after every other URL) to this file",
    )
    args = parser.parse_args(argv)
    try:
        run(BRIDGE_APP if args.app == "bridge" else DJANGO_APP, args.stats_json)
    except SmokeFailure as exc:
        print(f"smoke test FAILED: {exc}", file=sys.stderr)
        return 1
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
