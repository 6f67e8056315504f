"""Huey: every task of a Huey instance runs on pooled connections.

One line after the Huey instance is made (with djhuey: in a module of yours
that Django imports at startup, e.g. an `AppConfig.ready()`):

```python
# Not runnable: needs a Huey instance (and its storage) configured for the project
from huey.contrib.djhuey import HUEY

from async_dbbridge.integrations.huey import install

install(HUEY)
```

Every task of that instance, `task()` and `periodic_task()` as well as djhuey's
`db_task()`, runs between `begin_job()` and `end_job()` (see
`async_dbbridge._lending`), on thread, process and greenlet workers alike.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from huey import signals
from huey.exceptions import TaskTimeout

from .._lending import begin_job, end_job, end_thread

if TYPE_CHECKING:
    from huey.api import Huey, Task

__all__ = ("install",)

#: The name the hooks are registered under (for `unregister_pre_execute()` & co).
HOOK_NAME = "async_dbbridge"

# The task the calling thread (or greenlet, with gevent's patched threading)
# runs between begin_job() and end_job(): signals emitted elsewhere, such as
# the consumer's notify_interrupted_tasks() on its main thread, must not end
# another thread's job.
_running = threading.local()


def _end(task: Task, error: BaseException | None, *, interrupted: bool) -> None:
    if getattr(_running, "task", None) is not task:
        return
    databases: tuple[str, ...] | None = _running.databases
    _running.task = None
    end_job(error, owner=type(task), interrupted=interrupted, databases=databases)


def install(huey: Huey, *, databases: Iterable[str] | None = None) -> Huey:
    """Run every task of `huey` on connections lent by the bridge's pool.

    Registers a `pre_execute` and a `post_execute` hook, an `on_shutdown` hook
    and a signal receiver, all named `"async_dbbridge"`; it patches nothing.
    Installing twice is harmless (the hooks replace themselves).

    What a task then gets, compared with Huey's own handling (none for `task()`,
    `close_old_connections()` around a `db_task()`):

    * its connections come from the worker process's pool of each alias
      (`ASYNC_DBBRIDGE["POOL_SIZE"]` sessions at most, shared by the process's
      worker threads or greenlets) and go back after the task;
    * a connection is closed after a database error, a `TaskTimeout` or an
      interrupted task (the consumer shutting down), and checked after
      idling with `CONN_HEALTH_CHECKS`;
    * a transaction the task left open is rolled back with a
      `TransactionLeftOpenWarning` (Huey's `close_old_connections()` cannot
      close inside an atomic block: the next task on that thread would run
      inside the leftover transaction);
    * worker processes (`-k process`) discard the connections they inherit
      from the consumer without network I/O (`async_dbbridge`'s fork hooks),
      and each worker thread or process gives back and closes what it holds
      when it stops.

    **Immediate mode** (`huey.immediate`, djhuey's default under `DEBUG`): tasks
    run inline on the caller's thread, whose connections are the caller's
    business; the hooks do nothing then, like djhuey's `db_task()`.

    **Hook order:** Huey runs `pre_execute` hooks in the order they were
    registered. Call `install()` before registering hooks that use the
    database, so that their queries run inside the task's job.

    Args:
        huey: The Huey instance (djhuey's `HUEY`).
        databases: The aliases to handle; `None` (the default): every alias
            in `DATABASES`.

    Returns:
        `huey`, so that `HUEY = install(RedisHuey(...))` reads as one line.
    """
    aliases = None if databases is None else tuple(databases)

    def pre_execute(task: Task) -> None:
        if huey.immediate:
            return
        # A previous job this thread never ended (an exception Huey lets
        # escape its worker loop): end it first.
        previous = getattr(_running, "task", None)
        if previous is not None:
            _end(previous, None, interrupted=True)
        begin_job(aliases)
        _running.task = task
        _running.databases = aliases

    def post_execute(task: Task, task_value: Any, exception: BaseException | None) -> None:
        _end(task, exception, interrupted=isinstance(exception, TaskTimeout))

    def on_signal(signal: str, task: Task, *args: Any) -> None:
        # Paths on which Huey never calls the post_execute hooks.
        if signal == signals.SIGNAL_INTERRUPTED:
            _end(task, None, interrupted=True)
        elif signal == signals.SIGNAL_CANCELED:
            # A pre_execute hook registered after ours cancelled the task.
            _end(task, None, interrupted=False)

    def on_shutdown() -> None:
        # Run by each worker (thread, process or greenlet) as it stops.
        _running.task = None
        end_thread(aliases)

    for unregister in (huey.unregister_pre_execute, huey.unregister_post_execute):
        unregister(HOOK_NAME)
    huey.unregister_on_shutdown(HOOK_NAME)
    for receiver in getattr(huey, "_dbbridge_receivers", ()):
        huey.disconnect_signal(receiver)
    huey.pre_execute(HOOK_NAME)(pre_execute)
    huey.post_execute(HOOK_NAME)(post_execute)
    huey.on_shutdown(HOOK_NAME)(on_shutdown)
    huey.signal(signals.SIGNAL_INTERRUPTED, signals.SIGNAL_CANCELED)(on_signal)
    huey._dbbridge_receivers = (on_signal,)  # our own marker, for a second install()
    return huey
