"""A worker process for the Prometheus multiprocess test (run as a script).

Configures Django on the test process's database (`DBBRIDGE_WORKER_DB`),
makes a `DBBridgeCollector` (which, with `PROMETHEUS_MULTIPROC_DIR` set,
writes its figures to that directory), holds a known pool state, and steps
through it on the parent's command: a line on stdin each.
"""

from __future__ import annotations

import os
import sys

import django
from django.conf import settings


def main() -> None:
    from tests.dbconfig import database

    backend = os.environ["DBBRIDGE_WORKER_BACKEND"]
    used = int(os.environ["DBBRIDGE_WORKER_USED"])
    config = database(backend, "unused")
    config["NAME"] = os.environ["DBBRIDGE_WORKER_DB"]
    # Pooled connections stay open (idle) after the hold: a gauge to see.
    config["CONN_MAX_AGE"] = 60
    settings.configure(
        DATABASES={"default": config},
        INSTALLED_APPS=["async_dbbridge"],
        USE_TZ=True,
        ASYNC_DBBRIDGE={"POOL_SIZE": used, "MAX_WAITING": 1},
    )
    django.setup()

    from async_dbbridge.integrations.prometheus import DBBridgeCollector
    from tests.metrics_workload import HeldPool

    # Refreshed by hand below; the thread's own schedule would only add noise.
    collector = DBBridgeCollector(interval=3600)
    assert collector.multiprocess
    with HeldPool(used=used, pending=1, rejected=1):
        collector.refresh()
        print("held", flush=True)
        sys.stdin.readline()
    collector.refresh()
    print("released", flush=True)
    sys.stdin.readline()
    collector.close()


if __name__ == "__main__":
    main()
