# mysite/settings.py — add at the end of the settings startproject wrote
INSTALLED_APPS += ["async_dbbridge", "myapp"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "quickstart",
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "CONN_MAX_AGE": 60,  # seconds a pooled connection is reused
        "CONN_HEALTH_CHECKS": True,  # checked before reuse
    }
}
ASYNC_DBBRIDGE = {"POOL_SIZE": 8}  # at most 8 connections per process
