from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.scale_project.settings")

from async_dbbridge.asgi import get_asgi_application

application = get_asgi_application()
