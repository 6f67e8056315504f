"""The Django project ``bench_asgi.py`` serves with uvicorn: one model, three one-query views."""
