"""The ASGI application: stock Django, or Django wrapped by ``async_dbbridge.asgi``.

Serve with ``uvicorn benchmarks.asgi_project.asgi:application`` from the
repository root; ``BENCH_MODE=wrapper`` selects the wrapper (which speaks the
lifespan protocol), every other mode Django's own handler (which does not:
run it with ``--lifespan off``).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.asgi_project.settings")


def _application() -> Any:
    if os.environ.get("BENCH_MODE", "wrapper") == "wrapper":
        from async_dbbridge.asgi import get_asgi_application

        return get_asgi_application()
    from django.core.asgi import get_asgi_application as django_asgi_application

    return django_asgi_application()


application = _application()
