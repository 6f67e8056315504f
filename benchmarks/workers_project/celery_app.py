"""The Celery app ``benchmarks/_workers_celery.py`` runs: one short ORM task.

``BENCH_VARIANT=bridge`` calls `install(app)`, as a project adopting the
integration does; ``own`` leaves Celery's built-in Django fix-up in charge (and
never imports async_dbbridge). ``BENCH_CELERY_BROKER``, ``BENCH_CELERY_RESULTS``
and ``BENCH_CELERY_QUEUE`` name the broker, the result backend and the queue.
"""

from __future__ import annotations

import os

from celery import Celery, shared_task
from django.db import connection

from benchmarks.workers_project.celery_config import celery_config

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.workers_project.settings")


@shared_task(name="bench.short_orm")
def short_orm(n: int) -> int | None:
    """One primary-key lookup; on MariaDB, also the session's id (counted by the harness)."""
    from tests.testapp.models import Item

    Item.objects.filter(pk=n % 10 + 1).values_list("value", flat=True).first()
    if connection.vendor != "mysql":
        # PostgreSQL counts sessions opened itself (pg_stat_database.sessions).
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        row = cursor.fetchone()
    return int(row[0])


app = Celery("bench_workers")
if "BENCH_CELERY_BROKER" in os.environ:
    app.conf.update(celery_config(os.environ))
if os.environ.get("BENCH_VARIANT", "bridge") == "bridge":
    from async_dbbridge.integrations.celery import install

    install(app)
