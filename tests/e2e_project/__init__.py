"""A tiny Django project served through ``async_dbbridge.asgi`` by the ASGI and e2e tests."""
