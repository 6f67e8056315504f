# settings.py
INSTALLED_APPS = [
    # ... Django's apps and your own ...
    "async_dbbridge",
]
ASYNC_DBBRIDGE = {"MAX_WORKERS": 8}  # optional: 8 threads, so at most 8 connections per alias
