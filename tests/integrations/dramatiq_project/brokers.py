"""The brokers of the tests (Django-free: the test process imports it to enqueue)."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware


def make_broker(kind: str, queue: str, middleware: list[Middleware]) -> dramatiq.Broker:
    """The broker both the worker and the test (to enqueue) use: ``queue`` is its namespace."""
    if kind == "redis":
        return RedisBroker(  # type: ignore[no-untyped-call]  # dramatiq's __init__ is untyped
            url="redis://127.0.0.1:6379/0", namespace=queue, middleware=middleware
        )
    if kind == "rabbitmq":
        return RabbitmqBroker(
            url="amqp://guest:guest@127.0.0.1:5672/%2F",
            middleware=middleware,
            confirm_delivery=True,
        )
    raise ValueError(f"DBBRIDGE_WORKER_BROKER must be redis or rabbitmq, not {kind!r}")
