"""The WSGI application: stock Django, as ``startproject``'s ``wsgi.py`` (``BENCH_VARIANT=wsgi``).

Served by ``bench_project.py`` with ``gunicorn benchmarks.project.wsgi:application
--workers 1 --worker-class gthread --threads <pool size>`` from the repository root.
"""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.project.settings")

application = get_wsgi_application()
