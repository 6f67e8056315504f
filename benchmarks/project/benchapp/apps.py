"""Counts the connections Django opens on the benchmark database in the server."""

from __future__ import annotations

import threading
from typing import Any

from django.apps import AppConfig
from django.db.backends.signals import connection_created

_lock = threading.Lock()
_connects = 0


def _count(sender: object, connection: Any, **kwargs: object) -> None:
    # With psycopg's pool, "opened" means "taken from the pool": Django sends
    # the signal on every checkout.
    global _connects
    if connection.alias != "default":
        return
    with _lock:
        _connects += 1


def connects() -> int:
    """Connections Django opened on ``default`` so far (pool checkouts included)."""
    with _lock:
        return _connects


class BenchAppConfig(AppConfig):
    name = "benchmarks.project.benchapp"
    label = "benchapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        connection_created.connect(_count, dispatch_uid="bench_project.connects")
