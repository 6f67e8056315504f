"""RQ: worker classes whose jobs run on connections the bridge handles.

One option on the command line, with RQ's own CLI or django-rq's:

```console
rq worker --worker-class async_dbbridge.integrations.rq.DBBridgeWorker
python manage.py rqworker --worker-class async_dbbridge.integrations.rq.DBBridgeSimpleWorker
```

`DBBridgeWorker` is RQ's default `Worker`: each job runs in a *work horse*
forked for it. `DBBridgeSimpleWorker` is `SimpleWorker`: jobs run one after
another in the worker process itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from rq.timeouts import JobTimeoutException
from rq.worker import SimpleWorker, Worker

from .._lending import begin_job, end_job, end_thread

if TYPE_CHECKING:
    from rq.job import Job
    from rq.queue import Queue

__all__ = ("DBBridgeSimpleWorker", "DBBridgeWorker")


def _owner(job: Job) -> Callable[..., object]:
    """The job's function, named in warnings (without importing anything new)."""
    try:
        fn = job.func
    except Exception:
        fn = None
    return fn if callable(fn) else type(job)


def _interrupted(error: BaseException | None) -> bool:
    # A job timeout (SIGALRM raised into the job), or a cold shutdown
    # (SystemExit from the worker's signal handler): the driver may have been
    # stopped mid-protocol.
    return isinstance(error, JobTimeoutException) or (
        error is not None and not isinstance(error, Exception)
    )


class _JobConnections:
    """What both worker classes do around a job (a mixin before RQ's class)."""

    #: The aliases to handle; `None`: every alias in `DATABASES`. Set it on a
    #: subclass to limit the handling to some databases.
    databases: ClassVar[tuple[str, ...] | None] = None

    _dbbridge_error: BaseException | None = None

    def perform_job(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> bool:
        # RQ 3 passes the Execution too; RQ 2 does not.
        self._dbbridge_error = None
        begin_job(self.databases)
        try:
            return super().perform_job(job, queue, *args, **kwargs)  # type: ignore[misc, no-any-return]  # the RQ class after this mixin
        finally:
            error, self._dbbridge_error = self._dbbridge_error, None
            self._end_job(job, error)

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        # RQ catches the job's exception inside perform_job() and reports it
        # here (after the failure callback ran): remember it for end_job().
        self._dbbridge_error = exc_info[1] if len(exc_info) > 1 else None
        super().handle_exception(job, *exc_info)  # type: ignore[misc]  # the RQ class after this mixin

    def _end_job(self, job: Job, error: BaseException | None) -> None:
        end_job(error, owner=_owner(job), interrupted=_interrupted(error), databases=self.databases)

    def teardown(self) -> None:
        # The worker process stops: close what its main thread holds (a
        # horse never gets here: it leaves through os._exit()).
        try:
            end_thread(self.databases)
        finally:
            super().teardown()  # type: ignore[misc]  # the RQ class after this mixin


class DBBridgeWorker(_JobConnections, Worker):
    """RQ's forking `Worker`, with each job's connections handled in its work horse.

    The horse is forked from the worker process for one job and ends with
    `os._exit()`:

    * the connections the worker process holds are discarded in the horse
      without network I/O (`async_dbbridge`'s fork hooks: a horse that used or
      closed them would use or end the *worker's* sessions);
    * the job runs between `begin_job()` and `end_job()`; its connections are
      then closed cleanly in the horse (a horse lives for one job: there is
      nothing to give them back to), a transaction it left open rolled back
      with a `TransactionLeftOpenWarning`.

    RQ's own `Worker` with django-rq does nothing per job: the horse runs the
    job on whatever it inherited, and exits without closing what it opened (the
    server sees the session drop). Either way a fresh session per job is the
    price of a fork per job; `DBBridgeSimpleWorker` reuses connections.
    """

    def _end_job(self, job: Job, error: BaseException | None) -> None:
        if not self.is_horse:
            super()._end_job(job, error)
            return
        # Closed rather than pooled: the horse exits after this job.
        end_job(error, owner=_owner(job), interrupted=True, databases=self.databases)


class DBBridgeSimpleWorker(_JobConnections, SimpleWorker):
    """RQ's `SimpleWorker` (jobs run in the worker process), with pooled connections.

    Each job runs between `begin_job()` and `end_job()`: its connections come
    from the process's pool of each alias and go back after it, reused under
    `CONN_MAX_AGE` and checked after idling with `CONN_HEALTH_CHECKS`; they are
    closed after a database error, a job timeout or a cold shutdown, and a
    transaction left open is rolled back with a `TransactionLeftOpenWarning`.
    The worker gives back and closes what it holds when it stops.

    RQ's own `SimpleWorker` with django-rq does nothing per job: one connection
    per alias for the worker's life, never checked (a restarted database server
    fails every job until the worker restarts), and a transaction a job left
    open carried into the next jobs.
    """
