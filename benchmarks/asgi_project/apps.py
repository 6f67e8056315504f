"""Counts the connections Django opens in the server, by the kind of thread that opened them."""

from __future__ import annotations

import re
import threading
from collections import Counter
from typing import Any

from django.apps import AppConfig
from django.db.backends.signals import connection_created

_lock = threading.Lock()
_connects: Counter[str] = Counter()

# async_dbbridge names its threads <prefix>-request-N (the wrapper's request
# threads) and <prefix>-N (the bridge behind db_call); anything else is a
# thread of Django's or asgiref's own (stock Django: a new one per request).
_KINDS = (
    ("request thread", re.compile(r"-request-\d+$")),
    ("bridge", re.compile(r"^dbbridge-\d+$")),
)


def _kind(thread_name: str) -> str:
    for kind, pattern in _KINDS:
        if pattern.search(thread_name):
            return kind
    return "asgiref thread"


def _count(sender: object, connection: Any, **kwargs: object) -> None:
    # With a pool (psycopg's, or async_dbbridge's), "opened" means "taken from
    # the pool": Django sends the signal on every checkout.
    if connection.alias != "default":
        return
    kind = _kind(threading.current_thread().name)
    with _lock:
        _connects[kind] += 1


def connects() -> dict[str, int]:
    """Connections Django opened so far, by kind of thread."""
    with _lock:
        return dict(_connects)


class AsgiProjectConfig(AppConfig):
    name = "benchmarks.asgi_project"
    label = "asgi_project"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        connection_created.connect(_count, dispatch_uid="bench_asgi.connects")
