"""The benchmark's task, free of any framework and of Django at import time.

``short_orm(n)``: one primary-key lookup on the benchmark table; then it
counts itself done (or failed) in Redis and adds the server's id of the
session it ran on to a Redis set (read from the driver, without a query), so
the harness sees every outcome and, on MariaDB, the sessions used.
"""

from __future__ import annotations

import os
import threading
from typing import Any

#: A Redis database of its own (the test suites use 0, Celery's benchmark 14).
REDIS_URL = "redis://127.0.0.1:6379/15"

_redis: Any = None
_redis_lock = threading.Lock()


def keys(prefix: str) -> tuple[str, str, str]:
    """(done counter, failed counter, session ids set) of a round."""
    return f"{prefix}:done", f"{prefix}:failed", f"{prefix}:sessions"


def _client() -> Any:
    # One per process, made on first use: a forked child (RQ's work horse)
    # must not share its parent's socket, hence the pid check. Under a lock:
    # a client made by a racing thread and dropped would close, when freed,
    # the connections of the pool the other thread is using.
    global _redis
    with _redis_lock:
        if _redis is None or _redis[0] != os.getpid():
            from redis import Redis

            _redis = (os.getpid(), Redis.from_url(REDIS_URL))
        return _redis[1]


def _session_id() -> int:
    from django.db import connection

    raw: Any = connection.connection
    if connection.vendor == "postgresql":
        return int(raw.info.backend_pid)  # psycopg 3
    return int(raw.thread_id())  # mysqlclient


def short_orm(n: int) -> None:
    from tests.testapp.models import Item

    done, failed, sessions = keys(os.environ["BENCH_QUEUE"])
    try:
        Item.objects.get(pk=n % 10 + 1)
        session = _session_id()
    except BaseException:
        _client().incr(failed)
        raise
    pipe = _client().pipeline(transaction=False)
    pipe.sadd(sessions, session)
    pipe.incr(done)
    pipe.execute()
