"""Dramatiq: a broker middleware that lends each message pooled connections.

A drop-in for django_dramatiq's `DbConnectionsMiddleware`, at the same place in
`DRAMATIQ_BROKER["MIDDLEWARE"]`:

```python
# Not runnable: a fragment of a project's settings.py (needs django_dramatiq's broker setup)
DRAMATIQ_BROKER = {
    "BROKER": "dramatiq.brokers.redis.RedisBroker",
    "OPTIONS": {"url": "redis://127.0.0.1:6379/0"},
    "MIDDLEWARE": [
        "dramatiq.middleware.AgeLimit",
        "dramatiq.middleware.TimeLimit",
        "dramatiq.middleware.Callbacks",
        "dramatiq.middleware.Retries",
        "async_dbbridge.integrations.dramatiq.DBBridgeMiddleware",
    ],
}
```

Each worker thread runs its message between `begin_job()` and `end_job()`
(see `async_dbbridge._lending`): its connections come from the alias's pool of
the worker process (`ASYNC_DBBRIDGE["POOL_SIZE"]` sessions at most, shared by
the process's worker threads), go back to it after the message, are closed
after a database error or an interrupted message (`TimeLimitExceeded`,
`Shutdown`: any of Dramatiq's `Interrupt`s), and a transaction the actor left
open is rolled back with a `TransactionLeftOpenWarning`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from dramatiq.middleware import Middleware
from dramatiq.middleware.threading import Interrupt

from .._lending import begin_job, end_job, end_thread

if TYPE_CHECKING:
    from dramatiq.broker import Broker, MessageProxy
    from dramatiq.worker import ConsumerThread, Worker, WorkerThread

__all__ = ("DBBridgeMiddleware",)


def _owner(broker: Broker, message: MessageProxy) -> Callable[..., object]:
    """The actor's function, named in warnings (the middleware if it is unknown here)."""
    actor = broker.actors.get(message.actor_name)
    fn: Callable[..., object] | None = getattr(actor, "fn", None)
    return fn if fn is not None else DBBridgeMiddleware


class DBBridgeMiddleware(Middleware):
    """Lends each message the worker process's pooled connections.

    Replaces django_dramatiq's `DbConnectionsMiddleware` (which calls Django's
    `close_old_connections()` around each message: one connection per worker
    thread, 8 threads per process by default, none of them checked after a
    failover unless `CONN_HEALTH_CHECKS` is on, and a transaction left open
    carried into the next message).

    **Where in the list:** the place of `DbConnectionsMiddleware`, the last.
    Dramatiq runs the `before_` hooks in list order and the `after_` hooks in
    reverse, so database work of middleware listed *before* this one (such as
    django_dramatiq's `AdminMiddleware`) runs outside the message's job: it
    still takes pooled connections, which stay with the thread until its next
    message ends. List this middleware first to put that work inside the job too.

    Args:
        databases: The aliases to handle; `None` (the default): every alias
            in `DATABASES`.
    """

    def __init__(self, databases: Iterable[str] | None = None) -> None:
        self.databases: tuple[str, ...] | None = None if databases is None else tuple(databases)

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        begin_job(self.databases)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        # TimeLimitExceeded and Shutdown are raised asynchronously into the
        # thread: the driver may have been stopped mid-protocol, so the
        # connection is closed rather than given back.
        end_job(
            exception,
            owner=_owner(broker, message),
            interrupted=isinstance(exception, Interrupt),
            databases=self.databases,
        )

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        # A SkipMessage from a middleware listed after this one: begin_job()
        # already ran, so the job ends here.
        end_job(None, owner=_owner(broker, message), databases=self.databases)

    def before_worker_thread_shutdown(self, broker: Broker, thread: WorkerThread) -> None:
        end_thread(self.databases)

    def before_consumer_thread_shutdown(self, broker: Broker, thread: ConsumerThread) -> None:
        # Consumer threads run the ack/nack hooks of other middleware, which
        # may touch the database (django_dramatiq closes them here too).
        end_thread(self.databases)

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        # The worker process's main thread (broker and module imports may
        # have queried at boot).
        end_thread(self.databases)
