"""The settings module of the benchmark's ``rq worker -c`` (it also sets Django up)."""

from __future__ import annotations

import os

import django

django.setup()

from benchmarks.queues_project.work import REDIS_URL  # noqa: E402

QUEUES = [os.environ["BENCH_QUEUE"]]
__all__ = ("QUEUES", "REDIS_URL")
