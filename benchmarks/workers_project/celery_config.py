"""The Celery configuration the benchmark's worker and its client app share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def celery_config(env: Mapping[str, str]) -> dict[str, Any]:
    """From ``BENCH_CELERY_BROKER``, ``BENCH_CELERY_RESULTS`` and ``BENCH_CELERY_QUEUE``."""
    return {
        "broker_url": env["BENCH_CELERY_BROKER"],
        "result_backend": env["BENCH_CELERY_RESULTS"],
        "result_expires": 600,
        "task_default_queue": env["BENCH_CELERY_QUEUE"],
        "broker_connection_retry_on_startup": True,
        # No pidbox, no events: nothing of the worker's but its queue on the broker.
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
        "worker_hijack_root_logger": False,
    }
