"""The Django project the task workers of ``bench_workers.py`` run (``settings.py``),
and the Celery app (``celery_app.py``); other frameworks' apps can live beside it."""

from __future__ import annotations
