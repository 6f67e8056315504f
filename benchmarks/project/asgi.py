"""The ASGI application: Django's own, or wrapped by ``async_dbbridge.asgi`` (``BENCH_VARIANT``).

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


def _application() -> Any:
    if os.environ.get("BENCH_VARIANT", "wrapper") == "wrapper":
        from benchmarks._common import library_first

        library_first()  # --wrapper-src / --baseline-src: that checkout's library
        from async_dbbridge.asgi import get_asgi_application

        return get_asgi_application()
    from django.core.asgi import get_asgi_application as django_asgi_application

    return django_asgi_application()


application = _application()
