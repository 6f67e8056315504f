"""The settings module of ``rq worker -c tests.integrations.rq_project.config``.

RQ's CLI knows nothing of Django: this module, imported by the worker process
before it forks any work horse, sets Django up. With
``DBBRIDGE_WORKER_PARENT_SESSION=1`` the worker process then holds a session
(work horses are forked from it, one per job).
"""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.integrations.worker_settings")
django.setup()

REDIS_URL = "redis://127.0.0.1:6379/0"
QUEUES = [os.environ["DBBRIDGE_WORKER_QUEUE"]]

if os.environ.get("DBBRIDGE_WORKER_PARENT_SESSION") == "1":
    from tests.integrations import workload

    workload.parent_session()
