"""The Celery project ``tests/integrations/test_celery.py`` starts real workers of.

``config.py`` holds what the worker and the test's client app share (broker,
queue, result backend, from the environment the test sets); ``worker.py`` is
the app ``celery -A`` loads; ``tasks.py`` the tasks; ``settings.py`` the
worker's Django settings.
"""

from __future__ import annotations
