"""The Huey instance of the benchmark's consumer (``huey_consumer ...huey_app.HUEY``).

djhuey's, from ``settings.HUEY``; ``own``: the task is a ``db_task()``
(``close_old_connections()`` around it); ``bridge``: a plain ``task()``, with
`async_dbbridge.integrations.huey.install`.
"""

from __future__ import annotations

import django

django.setup()

from huey.contrib.djhuey import HUEY, db_task, task  # noqa: E402

from benchmarks.queues_project import work  # noqa: E402
from benchmarks.queues_project.settings import BRIDGE  # noqa: E402

if BRIDGE:
    from async_dbbridge.integrations.huey import install

    install(HUEY)
    task(name="short_orm")(work.short_orm)
else:
    db_task(name="short_orm")(work.short_orm)

__all__ = ("HUEY",)
