"""A tiny Django project for the connection-pool acceptance tests (tests/test_asgi_pool.py)."""
