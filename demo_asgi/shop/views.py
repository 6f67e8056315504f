"""One endpoint per way to reach the database from an ASGI Django project.

Each product endpoint returns the same rows and says which thread ran the
query, so the difference between the paths is visible with curl:

- ``/products/db-call``: ``await db_call(fn)`` runs ``fn`` on a bridge worker.
- ``/products/sync-to-async``: a ``@db_sync_to_async`` function, same workers.
- ``/products/sync``: a plain sync view; Django runs it on the request's
  thread (a request thread under the async_dbbridge ASGI wrapper).
- ``/products/async-orm``: Django's async ORM (``async for``), which runs on
  the same thread as a sync view would.

``?delay=0.3`` (seconds, at most 2) holds the thread that long after the
query, standing in for a slow query so the dashboard has something to show.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

import async_dbbridge
from async_dbbridge import BridgeStats, PoolStats, db_call, db_sync_to_async
from async_dbbridge.asgi import DBBridgeASGIApp
from async_dbbridge.conf import get_settings
from async_dbbridge.testing import process_open_connections, server_session_count
from shop.models import Order, Product

__all__ = (
    "dashboard",
    "favicon",
    "load",
    "orders",
    "products_async_orm",
    "products_db_call",
    "products_sync",
    "products_sync_to_async",
    "stats",
)

MAX_DELAY = 2.0
#: demo_asgi/, where `python -m shop.load` finds the shop package.
DEMO_DIR = Path(__file__).resolve().parent.parent
PRODUCT_LIMIT = 20

# server_session_count() blocks (a query on PostgreSQL/MySQL), so it runs off
# the loop, on a thread of its own. Not on the bridge (nor asyncio.to_thread,
# which the ASGI wrapper routes to the bridge): the dashboard would then always
# see a busy worker of its own making. One thread: the dashboard polls once a second.
_stats_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-stats")


def _delay(request: HttpRequest) -> float:
    try:
        delay = float(request.GET.get("delay", "0"))
    except ValueError:
        return 0.0
    return max(0.0, min(delay, MAX_DELAY)) if math.isfinite(delay) else 0.0


def _product_rows(delay: float = 0.0) -> list[dict[str, Any]]:
    # Prices are Decimals: JsonResponse's encoder sends them as strings.
    rows = [
        {"id": p.pk, "name": p.name, "price": p.price, "stock": p.stock}
        for p in Product.objects.all()[:PRODUCT_LIMIT]
    ]
    if delay:
        time.sleep(delay)
    return rows


def _current_thread_name() -> str:
    return threading.current_thread().name


def _products_response(via: str, rows: list[dict[str, Any]], thread: str) -> JsonResponse:
    return JsonResponse({"via": via, "thread": thread, "count": len(rows), "products": rows})


# -- the four read paths --------------------------------------------------------


async def products_db_call(request: HttpRequest) -> JsonResponse:
    """``await db_call(fn, *args)``: the ORM code is an ordinary sync function."""

    def query(delay: float) -> tuple[list[dict[str, Any]], str]:
        return _product_rows(delay), _current_thread_name()

    rows, thread = await db_call(query, _delay(request))
    return _products_response("db_call", rows, thread)


@db_sync_to_async
def _products_on_bridge(delay: float) -> tuple[list[dict[str, Any]], str]:
    return _product_rows(delay), _current_thread_name()


async def products_sync_to_async(request: HttpRequest) -> JsonResponse:
    """A function decorated with ``@db_sync_to_async``, awaited like a coroutine."""
    rows, thread = await _products_on_bridge(_delay(request))
    return _products_response("db_sync_to_async", rows, thread)


def products_sync(request: HttpRequest) -> JsonResponse:
    """A plain sync view: Django runs it in a thread; no bridge call in sight."""
    return _products_response("sync view", _product_rows(_delay(request)), _current_thread_name())


async def products_async_orm(request: HttpRequest) -> JsonResponse:
    """Django's async ORM: each database round trip is a thread-sensitive sync_to_async."""
    rows = [
        {"id": p.pk, "name": p.name, "price": p.price, "stock": p.stock}
        async for p in Product.objects.all()[:PRODUCT_LIMIT]
    ]
    # Thread-sensitive, like the async ORM's own calls: it runs on the thread
    # that just ran the query, and stands in for a slow one.
    thread = await sync_to_async(_current_thread_name)()
    delay = _delay(request)
    if delay:
        await sync_to_async(time.sleep)(delay)
    return _products_response("async ORM", rows, thread)


# -- the write path -------------------------------------------------------------


class _OrderError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _place_order(product_id: int, quantity: int) -> dict[str, Any] | _OrderError:
    # The whole transaction runs inside one call on one worker thread: an
    # atomic block must begin and end on the thread that owns the connection,
    # so it never spans an await. An order refused (no such product, not
    # enough stock) is returned, not raised: the bridge counts calls that
    # raise as errors, and a refused order is not a failure of the bridge.
    with transaction.atomic():
        # Row lock on PostgreSQL and MySQL, so concurrent orders cannot
        # oversell; SQLite has no row locks (and ignores this), but with
        # transaction_mode=IMMEDIATE its writers are serialized anyway.
        product = Product.objects.select_for_update().filter(pk=product_id).first()
        if product is None:
            return _OrderError(404, f"no product with id {product_id}")
        if product.stock < quantity:
            return _OrderError(409, f"only {product.stock} {product.name!r} left")
        product.stock -= quantity
        product.save(update_fields=["stock"])
        order = Order.objects.create(product=product, quantity=quantity)
    return {
        "id": order.pk,
        "product": {"id": product.pk, "name": product.name},
        "quantity": order.quantity,
        "stock_left": product.stock,
        "created_at": order.created_at,
        "thread": _current_thread_name(),
    }


def _recent_orders() -> list[dict[str, Any]]:
    return [
        {
            "id": o.pk,
            "product": o.product.name,
            "quantity": o.quantity,
            "total": o.product.price * o.quantity,
            "created_at": o.created_at,
        }
        for o in Order.objects.select_related("product")[:PRODUCT_LIMIT]
    ]


def _order_input(request: HttpRequest) -> tuple[int, int]:
    if request.content_type == "application/json":
        try:
            data = json.loads(request.body or b"{}")
        except ValueError as exc:
            raise _OrderError(400, f"invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _OrderError(400, 'expected a JSON object like {"product": 1, "quantity": 2}')
    else:
        data = request.POST
    try:
        product_id = int(data["product"])
        quantity = int(data.get("quantity", 1))
    except KeyError:
        raise _OrderError(400, "missing 'product' (a product id)") from None
    except (TypeError, ValueError):
        raise _OrderError(400, "'product' and 'quantity' must be integers") from None
    if quantity < 1:
        raise _OrderError(400, "'quantity' must be at least 1")
    return product_id, quantity


@require_http_methods(["GET", "POST"])
async def orders(request: HttpRequest) -> JsonResponse:
    """``GET``: the latest orders. ``POST`` ``{"product": id, "quantity": n}``: place one.

    The write is a ``db_call`` whose function holds the whole
    ``transaction.atomic()`` block.
    """
    if request.method == "GET":
        return JsonResponse({"orders": await db_call(_recent_orders)})
    try:
        product_id, quantity = _order_input(request)
    except _OrderError as exc:
        return JsonResponse({"error": str(exc)}, status=exc.status)
    order = await db_call(_place_order, product_id, quantity)
    if isinstance(order, _OrderError):
        return JsonResponse({"error": str(order)}, status=order.status)
    return JsonResponse(order, status=201)


# -- observing the pool ---------------------------------------------------------


def _wrapper() -> DBBridgeASGIApp | None:
    # The ASGI application object uvicorn loaded; looked up, not imported, so
    # that serving the project with another application (stock Django's, to
    # compare) does not build a second one here.
    app = getattr(sys.modules.get("demo_asgi.asgi"), "application", None)
    return app if isinstance(app, DBBridgeASGIApp) else None


def _request_mode(app: DBBridgeASGIApp | None) -> str:
    """How requests run: on request threads, on per-request threads, or under stock Django."""
    if app is None:
        return "stock-django"
    return app.mode or "not-started"


def _bridge_figures(snapshot: BridgeStats) -> dict[str, Any] | None:
    """The bridge (db_call, @db_sync_to_async, the default executor): threads and calls.

    Its connections are the pools' (shown once, under "pools").
    """
    s = snapshot.bridge
    if s is None:
        return None
    return {
        "max_workers": s.max_workers,  # MAX_WORKERS
        "workers": s.workers,
        "busy": s.busy,
        "idle": s.idle,
        "queued": s.queued,
        "calls": s.calls,
        "errors": s.errors,
        # POLICY: what a worker does with its connections after a call
        # ("request": give them back to the pool, "close": close them).
        "connection_policy": s.policy,
        "shutting_down": s.shutdown,
    }


def _pool_figures(
    app: DBBridgeASGIApp | None, snapshot: BridgeStats, aliases: list[str]
) -> dict[str, Any]:
    """Each alias's pool; before its first checkout, an empty one of the configured size.

    A pool is built on its first checkout; until then the dashboard shows the
    row it will have (nothing in use, nothing opened), not a blank one.
    Under stock Django there is no pool at all.
    """
    pools: dict[str, Any] = {alias: pool.as_dict() for alias, pool in snapshot.pools.items()}
    if app is None:
        return pools
    configured = get_settings()
    empty = PoolStats(
        max_size=configured.effective_pool_size,
        in_use=0,
        idle=0,
        waiting=0,
        opened=0,
        closed=0,
        checkouts=0,
        timeouts=0,
        wait_time_total=0.0,
        wait_time_max=0.0,
        max_waiting=configured.effective_max_waiting,
    ).as_dict()
    for alias in aliases:
        pools.setdefault(alias, dict(empty))
    return pools


def _collect_stats() -> dict[str, Any]:
    aliases = list(settings.DATABASES)
    app = _wrapper()
    snapshot = async_dbbridge.stats()
    threads = snapshot.request_threads
    return {
        # "request-threads", "per-request" (asgiref < 3.13: each request on a
        # thread of its own, connections closed at its end), "stock-django"
        # or "not-started".
        "request_mode": _request_mode(app),
        # The threads that run each request's sync views and async ORM calls.
        "request_threads": threads.as_dict() if threads is not None else None,
        # One connection pool per database alias, shared by request threads
        # and bridge workers: POOL_SIZE connections at most.
        "pools": _pool_figures(app, snapshot, aliases),
        "bridge": _bridge_figures(snapshot),
        "server_sessions": {alias: server_session_count(alias) for alias in aliases},
        # Django connections open on any thread of this process: under stock
        # Django's ASGI handler with CONN_MAX_AGE > 0 this grows with every
        # request thread that touched the database.
        "process_connections": {alias: process_open_connections(alias) for alias in aliases},
        "vendors": {alias: connections[alias].vendor for alias in aliases},
        "time": time.time(),
    }


@require_GET
async def stats(request: HttpRequest) -> JsonResponse:
    """How requests run, the pools, the bridge, and the server's session count per database."""
    loop = asyncio.get_running_loop()
    return JsonResponse(await loop.run_in_executor(_stats_thread, _collect_stats))


# -- the burst: the same load against this server and stock Django --------------

#: Where stock Django serves the same project (scripts/run_demo.sh starts it).
STOCK_URL = os.environ.get("DEMO_STOCK_URL", "")
_load_lock = threading.Lock()
_load: dict[str, Any] = {"process": None, "out": None}
LOAD_LIMITS = {"clients": (1, 200, 48), "seconds": (1.0, 30.0, 5.0), "delay": (0.0, 1.0, 0.1)}


def _load_parameter(request: HttpRequest, name: str) -> float:
    low, high, default = LOAD_LIMITS[name]
    try:
        value = float(request.POST.get(name, default))
    except ValueError:
        value = default
    return max(low, min(high, value)) if math.isfinite(value) else default


def _start_load(request: HttpRequest) -> JsonResponse:
    with _load_lock:
        process = _load["process"]
        if process is not None and process.poll() is None:
            return JsonResponse({"error": "a burst is already running"}, status=409)
        if process is not None:
            process.wait()
        own = f"{request.scheme}://{request.get_host()}"
        targets = [f"async_dbbridge={own}"]
        if STOCK_URL:
            targets.append(f"stock Django={STOCK_URL}")
        out = Path(tempfile.gettempdir()) / f"dbbridge-demo-load-{os.getpid()}.json"
        out.unlink(missing_ok=True)
        command = [sys.executable, "-m", "shop.load", "--out", str(out)]
        for name in ("clients", "seconds", "delay"):
            value = _load_parameter(request, name)
            command += [f"--{name}", str(int(value) if name == "clients" else value)]
        for target in targets:
            command += ["--target", target]
        # A process of its own: load generated here would take this server's CPU.
        _load["process"] = subprocess.Popen(command, cwd=DEMO_DIR)
        _load["out"] = out
    return JsonResponse({"started": True, "targets": targets}, status=202)


def _read_load() -> dict[str, Any]:
    with _load_lock:
        out: Path | None = _load["out"]
        process = _load["process"]
    data: dict[str, Any] = {"phase": "idle", "targets": []}
    if out is not None and out.exists():
        data = json.loads(out.read_text())
    elif process is not None and process.poll() is None:
        data["phase"] = "starting"
    if process is not None and process.poll() not in (None, 0):
        data["phase"] = f"failed (exit {process.returncode})"
    data["stock_url"] = STOCK_URL or None
    return data


# The dashboard's own form posts here; no cookies or sessions in this demo.
@csrf_exempt
@require_http_methods(["GET", "POST"])
async def load(request: HttpRequest) -> JsonResponse:
    """``POST``: start the burst (``clients``, ``seconds``, ``delay``). ``GET``: its figures."""
    loop = asyncio.get_running_loop()
    if request.method == "POST":
        return await loop.run_in_executor(_stats_thread, _start_load, request)
    return JsonResponse(await loop.run_in_executor(_stats_thread, _read_load))


# An SVG pool of four slots, so the browser's tab has an icon and the log no 404.
_FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect x="1" y="1" width="6" height="6" rx="1" fill="#e8833a"/>'
    b'<rect x="9" y="1" width="6" height="6" rx="1" fill="#3a9e5f"/>'
    b'<rect x="1" y="9" width="6" height="6" rx="1" fill="#3a9e5f"/>'
    b'<rect x="9" y="9" width="6" height="6" rx="1" fill="#d8dce0"/></svg>'
)


@require_GET
async def favicon(request: HttpRequest) -> HttpResponse:
    return HttpResponse(_FAVICON, content_type="image/svg+xml")


ENDPOINTS = (
    ("products-db-call", "await db_call(fn)"),
    ("products-sync-to-async", "@db_sync_to_async"),
    ("products-sync", "sync view"),
    ("products-async-orm", "async ORM (async for)"),
    ("orders", "recent orders (POST to place one)"),
    ("stats", "stats JSON"),
)


@require_GET
async def dashboard(request: HttpRequest) -> HttpResponse:
    """The pool, live: a page that polls ``/stats`` every second."""
    context = {
        "endpoints": [(reverse(name), label) for name, label in ENDPOINTS],
        "stats_url": reverse("stats"),
        "load_url": reverse("load"),
        "pool_size": get_settings().effective_pool_size,
        "pool_timeout": get_settings().pool_timeout,
        "stock_url": STOCK_URL,
        "vendor": connections["default"].vendor,
        "orders_url": reverse("orders"),
        "max_delay": MAX_DELAY,
    }
    return render(request, "shop/dashboard.html", context)
