"""The ASGI application: Django's own, wrapped by ``async_dbbridge.asgi``, or Django's WSGI
handler under ``a2wsgi`` (``BENCH_VARIANT``).

Serve with ``uvicorn benchmarks.project.asgi:application --lifespan on`` from
the repository root. Django's own handler answers the lifespan protocol's
messages by raising, which uvicorn's ``--lifespan on`` reports as a startup
failure; ``bench_project.py`` therefore runs it with ``--lifespan off``
(``auto`` would log the error and carry on).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.project.settings")


def _record_metrics() -> None:
    """bench_project's ``wrapper-metrics``: both integrations recording, as a project would.

    The OpenTelemetry SDK with a reader nobody reads (durations are still fed to
    its histograms every second by the library's flusher thread), and the
    Prometheus collector on the default registry.
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from prometheus_client import REGISTRY

    from async_dbbridge.integrations.opentelemetry import instrument
    from async_dbbridge.integrations.prometheus import DBBridgeCollector

    instrument(meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]))
    REGISTRY.register(DBBridgeCollector())


def _application() -> Any:
    if os.environ.get("BENCH_VARIANT", "wrapper") == "wrapper":
        from benchmarks._common import library_first

        library_first()  # --wrapper-src / --baseline-src: that checkout's library
        from async_dbbridge.asgi import get_asgi_application

        if os.environ.get("BENCH_METRICS") == "1":
            _record_metrics()
        return get_asgi_application()
    if os.environ.get("BENCH_VARIANT") == "a2wsgi":
        from a2wsgi import WSGIMiddleware
        from django.core.wsgi import get_wsgi_application

        # As many threads as the other variants' pool: CONN_MAX_AGE=60 keeps
        # one connection per thread.
        return WSGIMiddleware(
            # django-stubs types WSGIHandler.__call__ as returning HttpResponseBase,
            # which is the iterable of bytes WSGI wants, but not declared as one.
            get_wsgi_application(),  # type: ignore[arg-type]
            workers=int(os.environ.get("BENCH_POOL_SIZE", "8")),
        )
    from django.core.asgi import get_asgi_application as django_asgi_application

    return django_asgi_application()


application = _application()
