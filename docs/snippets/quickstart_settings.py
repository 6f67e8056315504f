# settings.py
INSTALLED_APPS = [
    # ...
    "async_dbbridge",
]
ASYNC_DBBRIDGE = {"MAX_WORKERS": 8}  # threads, so at most 8 connections per alias

# asgi.py — serve with: uvicorn mysite.asgi:application
from async_dbbridge.asgi import get_asgi_application  # noqa: E402

application = get_asgi_application()
