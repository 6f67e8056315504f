"""The app ``celery -A tests.integrations.celery_project.worker`` runs.

With ``CELERY_TEST_VARIANT=bridge`` it calls `install(app)` as a project
would; with ``own`` Celery's built-in Django fix-up handles the connections.
``CELERY_TEST_PARENT_FILE`` makes the worker's main process hold a session
of its own from before its pool forks to its shutdown, and write what it saw
into that file: ``start <session>`` and, when it is told to stop, ``stop
<session>`` (the session it then finds, still the same) or ``stop error
<message>``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.integrations.celery_project.settings")

from tests.integrations.celery_project.config import celery_config

app = Celery("celery_project")
app.conf.update(celery_config(os.environ))
if os.environ.get("CELERY_TEST_VARIANT", "bridge") == "bridge":
    from async_dbbridge.integrations.celery import install

    install(app)
app.autodiscover_tasks()

PARENT_FILE = os.environ.get("CELERY_TEST_PARENT_FILE")


def _write(line: str) -> None:
    assert PARENT_FILE is not None
    with open(PARENT_FILE, "a") as f:
        f.write(line + "\n")


@signals.worker_init.connect
def hold_a_session(**kwargs: Any) -> None:
    """In the main process, before the pool forks its children."""
    if PARENT_FILE is None:
        return
    import django

    django.setup()
    from tests.integrations.celery_project.tasks import session_id

    _write(f"start {session_id()}")


@signals.worker_shutting_down.connect
def use_it_again(**kwargs: Any) -> None:
    """In the main process, told to stop: its session must still be the same, and work."""
    if PARENT_FILE is None:
        return
    from tests.integrations.celery_project.tasks import session_id

    try:
        _write(f"stop {session_id()}")
    except Exception as exc:
        _write(f"stop error {exc!r}")
