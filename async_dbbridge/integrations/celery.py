"""Celery workers whose tasks take Django connections from the bridge's pool.

Celery's built-in Django fix-up (`celery.fixups.django`, Celery 5.6+) closes
every database connection before and after every task, whatever
`CONN_MAX_AGE` says (and with Django's psycopg pool in a prefork worker, closes
the whole pool after every task): each task pays a new session. `install(app)`
puts this module's fix-up in its place. A task then gets what a request gets
from the ASGI wrapper: connections from the alias's bounded pool (at most
`ASYNC_DBBRIDGE["POOL_SIZE"]` per alias per worker process), reused under
`CONN_MAX_AGE`, checked under `CONN_HEALTH_CHECKS`, really closed after a
database error or an interrupted task, a transaction left open rolled back
with a `TransactionLeftOpenWarning`.

How the built-in fix-up is replaced: Celery builds its fix-ups when the app is
created (`Celery(fixups=...)`, by default `celery.fixups.django:fixup`, which
connects two receivers: `import_modules` and `worker_init`; its per-task
receivers are connected only when the worker starts). `install(app)`
disconnects those receivers (and the per-task ones, if the worker already
started), removes the fix-up from `app.fixups` and `app._fixups`, and adds
this module's `fixup` there instead. Since `app.fixups` is part of how an app
is pickled, a pool child started with spawn or execv rebuilds the app with this
fix-up, not Celery's. Passing it at construction is equivalent:
`Celery("proj", fixups=["async_dbbridge.integrations.celery:fixup"])`.

What is kept from the built-in fix-up (everything but the connection handling):
`django.setup()` and the system checks (`run_checks()`, unless
`CELERY_SKIP_CHECKS` is set) before the task modules are imported, and again in
a pool child started with spawn/execv; the project directory first on
`sys.path`; `app.loader.now` from `django.utils.timezone`; the
`DjangoTask` task class (`delay_on_commit()`) unless the app has its own;
`app.autodiscover_tasks()` with no argument looking in `INSTALLED_APPS`;
`close_caches()` at worker start, in each pool child and after each task (what
`request_finished` does). Dropped: closing connections at worker start, per
task and when an embedded beat starts, and `CELERY_DB_REUSE_MAX`
(`CONN_MAX_AGE` is the lifetime now).

The signals used, all on the thread that runs the task:

* `task_prerun`: [`begin_job()`][async_dbbridge._lending.begin_job];
* `task_postrun`: [`end_job()`][async_dbbridge._lending.end_job]. It carries
  the outcome: the state, and as `retval` what a failed task raised (for a
  retry, the exception it retries on). A database error closes the task's
  connections; so does an *interrupted* task — a soft time limit, or an
  exception Celery re-raises (worker shutdown, `SystemExit`), after which
  `task_postrun` comes with no state. `task_failure` says nothing more.
  Eager tasks (`task.apply()`, `task_always_eager`) are left alone: they run
  on the caller's thread, whose connections are the caller's.
* `worker_process_shutdown` (a prefork child exiting) and `worker_shutdown`
  (the worker's main process, after its pool stopped): the thread's own
  connections ([`end_thread()`][async_dbbridge._lending.end_thread]), then the
  pools' idle connections and Django's psycopg pools are closed, so a stopped
  worker leaves no session behind.

Celery says nothing when a thread of its `threads` pool ends (its threads end
when the pool stops, before `worker_shutdown`); none needs it: every task gives
its connections back when it ends, so a thread holds none between tasks.

Fork: a prefork child inherits the parent's sockets. Importing this module
imports `async_dbbridge`, whose fork hook discards every inherited connection
(and pool) in the child without network I/O, so the parent's sessions survive
the children's cleanup; the parent's own connections are closed at
`worker_shutdown`. A hard time limit kills the child: its sessions end with
its sockets, and the replacement child starts with none.

gevent and eventlet: every task runs in a greenlet of its own, which Django
(with the standard library monkey-patched, as those pools require) treats as a
thread: `task_prerun` and `task_postrun` run in it, so each task still borrows
from and gives back to the process's bounded pool, and tasks beyond
`POOL_SIZE` wait for a connection up to `POOL_TIMEOUT`. Not covered by this
project's tests.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
import weakref
from datetime import UTC, datetime
from typing import Any, Final

from celery import Celery, signals, states
from celery.app.task import Task
from celery.exceptions import (
    Retry,
    SoftTimeLimitExceeded,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
)
from celery.local import Proxy

from .._lending import begin_job, close_pools, end_job, end_thread

__all__ = ("FIXUP", "DBBridgeFixup", "fixup", "install")

logger = logging.getLogger("async_dbbridge")

#: This module's fix-up, as `Celery(fixups=[...])` and `app.fixups` name it.
FIXUP: Final = "async_dbbridge.integrations.celery:fixup"

#: Celery's built-in Django fix-up, as `app.fixups` names it.
_BUILTIN: Final = "celery.fixups.django:fixup"

#: Raised in (or on behalf of) a task stopped from outside: whatever the driver
#: was doing may be half done, so the task's connections are closed.
_INTERRUPTIONS: Final = (SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError, Terminated)

#: The states in which `task_postrun`'s `retval` is what the task raised.
_RAISED: Final = frozenset({states.FAILURE, states.RETRY})


def install(app: Celery) -> DBBridgeFixup:
    """Make `app`'s workers lend their tasks pooled Django connections.

    Call it where the app is created, before a worker starts (in the module
    that `celery -A proj worker` imports):

    ```python
    # Not runnable: a Celery project's proj/celery.py
    import os

    from celery import Celery

    from async_dbbridge.integrations.celery import install

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    install(app)
    app.autodiscover_tasks()
    ```

    These two are equivalent, except that the first also removes Celery's
    built-in Django fix-up from an app created with it:

    ```python
    # Not runnable: illustration
    install(Celery("proj"))
    Celery("proj", fixups=["async_dbbridge.integrations.celery:fixup"])
    ```

    Idempotent. What is kept of the built-in fix-up and what changes: this
    module's docstring, and the documentation's Celery page.

    Returns:
        The app's fix-up (the same one on every call).
    """
    # Any: `fixups` and `_fixups` are attributes the type stubs do not list.
    target: Any = _unwrap(app)
    for installed in getattr(target, "_fixups", None) or ():
        if isinstance(installed, DBBridgeFixup):
            return installed
    _remove_builtin(target)
    fixups = target.fixups
    if isinstance(fixups, set):
        fixups.add(FIXUP)
    else:
        # A list or tuple passed to Celery(fixups=...): keep its kind and order.
        target.fixups = type(fixups)([*(f for f in fixups if f != FIXUP), FIXUP])
    ours = DBBridgeFixup(target).install()
    # Celery keeps its fix-up objects here, alive as long as the app.
    target._fixups.append(ours)
    return ours


def fixup(app: Celery, env: str = "DJANGO_SETTINGS_MODULE") -> DBBridgeFixup | None:
    """Celery's fix-up entry point: installs this module's fix-up when Django is configured.

    What `Celery(fixups=[FIXUP])` calls for each app, under the same
    condition as the built-in fix-up (the settings module environment
    variable is set, and the app does not use a Django-specific loader).
    """
    if not os.environ.get(env) or "django" in str(app.loader_cls).lower():
        return None
    return DBBridgeFixup(app).install()


def _unwrap(app: Any) -> Any:
    """The app behind a proxy such as `celery.current_app`."""
    return app._get_current_object() if isinstance(app, Proxy) else app


def _remove_builtin(app: Any) -> None:
    """Disconnect and forget Celery's built-in Django fix-up on `app`."""
    from celery.fixups.django import DjangoFixup

    builtins = [f for f in getattr(app, "_fixups", None) or () if isinstance(f, DjangoFixup)]
    for builtin in builtins:
        signals.import_modules.disconnect(builtin.on_import_modules, sender=app)
        # Celery 5.7 connects it with a dispatch_uid of its own, other releases may
        # not: both ways are undone.
        uid = getattr(builtin, "_worker_init_uid", None)
        if uid is not None:
            signals.worker_init.disconnect(dispatch_uid=uid)
        signals.worker_init.disconnect(builtin.on_worker_init)
        # Its per-task receivers exist only once a worker started (install()
        # called late, e.g. from a worker_init receiver of its own).
        worker_fixup = getattr(builtin, "_worker_fixup", None)
        if worker_fixup is not None:
            signals.task_prerun.disconnect(worker_fixup.on_task_prerun)
            signals.task_postrun.disconnect(worker_fixup.on_task_postrun)
            signals.worker_process_init.disconnect(worker_fixup.on_worker_process_init)
            signals.beat_embedded_init.disconnect(worker_fixup.close_database)
        app._fixups.remove(builtin)
    fixups = app.fixups
    if _BUILTIN in fixups:
        if isinstance(fixups, set):
            fixups.discard(_BUILTIN)
        else:
            app.fixups = type(fixups)(f for f in fixups if f != _BUILTIN)


def _builtin_task_receivers() -> list[str]:
    """The per-task signals a built-in Django fix-up still receives (any app's)."""
    from celery.fixups import django as builtin

    # Not in the type stubs.
    worker_fixup_class: type = builtin.DjangoWorkerFixup  # type: ignore[attr-defined]
    found: list[str] = []
    for name, signal in (
        ("task_prerun", signals.task_prerun),
        ("task_postrun", signals.task_postrun),
    ):
        # `receivers`: (lookup key, receiver or weak reference to it) pairs.
        for _key, receiver in list(getattr(signal, "receivers", ())):
            fn = receiver() if isinstance(receiver, weakref.ref) else receiver
            if isinstance(getattr(fn, "__self__", None), worker_fixup_class):
                found.append(name)
    return found


def _outcome(retval: object, state: str | None) -> tuple[BaseException | None, bool]:
    """(what the task raised, whether it was interrupted) from `task_postrun`'s arguments."""
    if state is None:
        # Celery's tracer re-raises a BaseException (WorkerShutdown,
        # SystemExit, KeyboardInterrupt) and still sends task_postrun, with
        # neither a state nor a retval: the task was stopped mid-way.
        return None, True
    if state not in _RAISED or not isinstance(retval, BaseException):
        return None, False
    error: BaseException = retval
    if isinstance(error, Retry) and isinstance(error.exc, BaseException):
        # self.retry(exc=...) on a database error: that error decides.
        error = error.exc
    interrupted = isinstance(error, _INTERRUPTIONS) or not isinstance(error, Exception)
    return error, interrupted


def _close_caches() -> None:
    from django.core.cache import close_caches

    try:
        close_caches()
    except Exception:
        # Like the built-in fix-up: a cache backend failing to close must not fail the task.
        logger.debug("closing Django's caches failed", exc_info=True)


def _close_django_pools() -> None:
    """Close Django's own psycopg pools (`OPTIONS["pool"]`) this process built."""
    from django.db import connections

    for alias in connections:
        conn = connections[alias]
        # Only a pool that exists: the `pool` property would build one to close it.
        pools = getattr(type(conn), "_connection_pools", None)
        if not isinstance(pools, dict) or alias not in pools:
            continue
        try:
            conn.close_pool()  # type: ignore[attr-defined]  # PostgreSQL's wrapper, Django >= 5.1
        except Exception:
            logger.warning("closing Django's connection pool of %r failed", alias, exc_info=True)


class DBBridgeFixup:
    """The fix-up `install()` puts on an app in place of Celery's built-in Django one.

    Made by [`install()`][async_dbbridge.integrations.celery.install] or by
    Celery from `Celery(fixups=[FIXUP])`; the module docstring says what it
    does at each signal.
    """

    def __init__(self, app: Celery) -> None:
        # Any: the fix-up sets attributes the type stubs do not list (`loader.now`).
        self.app: Any = app
        # Receivers are held strongly (weak=False): this object lives as long
        # as the process's signals. A fresh uid each, as Celery's own fix-up
        # has: an id() can be reused once an object is gone, a uuid cannot.
        self._uid = f"async_dbbridge.integrations.celery.{uuid.uuid4().hex}"
        self._checked = False
        self._check_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<DBBridgeFixup app={self.app!r}>"

    def install(self) -> DBBridgeFixup:
        # The project directory first, as the built-in fix-up does: `celery -A
        # proj` run from it must find the project's modules before any other.
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        self.app.loader.now = self.now
        if not getattr(self.app, "_custom_task_cls_used", False):
            self.app.task_cls = "celery.contrib.django.task:DjangoTask"
        connections = (
            (signals.import_modules, self.on_import_modules, self.app),
            (signals.worker_init, self.on_worker_init, None),
            (signals.worker_process_init, self.on_worker_process_init, None),
            (signals.task_prerun, self.on_task_prerun, None),
            (signals.task_postrun, self.on_task_postrun, None),
            (signals.worker_process_shutdown, self.on_process_shutdown, None),
            (signals.worker_shutdown, self.on_worker_shutdown, None),
        )
        for signal, receiver, sender in connections:
            signal.connect(receiver, sender=sender, weak=False, dispatch_uid=self._uid)
        return self

    def _disconnect(self) -> None:
        """Undo `install()`'s signal receivers (the tests' clean-up)."""
        signals.import_modules.disconnect(sender=self.app, dispatch_uid=self._uid)
        for signal in (
            signals.worker_init,
            signals.worker_process_init,
            signals.task_prerun,
            signals.task_postrun,
            signals.worker_process_shutdown,
            signals.worker_shutdown,
        ):
            signal.disconnect(dispatch_uid=self._uid)

    # -- what the built-in fix-up does that is not about connections -----------------------

    def now(self, utc: bool = False) -> datetime:
        """`app.loader.now`: Django's notion of now (aware or not, as `USE_TZ` says)."""
        if utc:
            return datetime.now(UTC)
        from django.utils import timezone as django_timezone

        return django_timezone.now()

    def autodiscover_tasks(self) -> list[str]:
        """What `app.autodiscover_tasks()` with no argument searches: `INSTALLED_APPS`."""
        from django.apps import apps

        return [config.name for config in apps.get_app_configs()]

    def validate_models(self) -> None:
        """`django.setup()` and the system checks (unless `CELERY_SKIP_CHECKS` is set)."""
        import django
        from django.core.checks import run_checks

        django.setup()
        if not os.environ.get("CELERY_SKIP_CHECKS"):
            run_checks()

    def on_import_modules(self, **kwargs: Any) -> None:
        # Before the task modules are imported: they import models.
        self.validate_models()

    def on_worker_init(self, sender: Any = None, **kwargs: Any) -> None:
        if not self._is_ours(getattr(sender, "app", None)):
            return
        _close_caches()

    def on_worker_process_init(self, **kwargs: Any) -> None:
        # A child started afresh (spawn, execv) has imported nothing yet; a
        # forked one had its inherited connections discarded by the library's
        # fork hook already (no network I/O: the parent's sessions survive).
        if os.environ.get("FORKED_BY_MULTIPROCESSING"):
            self.validate_models()
        _close_caches()

    # -- the connection handling --------------------------------------------------------------

    def _is_ours(self, app: Any) -> bool:
        return app is None or _unwrap(app) is self.app

    def on_task_prerun(self, sender: Task[Any, Any] | None = None, **kwargs: Any) -> None:
        if sender is None or getattr(sender.request, "is_eager", False):
            return
        if not self._is_ours(sender.app):
            return
        if not self._checked:
            self._check_builtin()
        begin_job()

    def on_task_postrun(
        self,
        sender: Task[Any, Any] | None = None,
        retval: object = None,
        state: str | None = None,
        **kwargs: Any,
    ) -> None:
        if sender is None or getattr(sender.request, "is_eager", False):
            return
        if not self._is_ours(sender.app):
            return
        error, interrupted = _outcome(retval, state)
        try:
            end_job(error, owner=sender.run, interrupted=interrupted)
        finally:
            _close_caches()

    def on_process_shutdown(self, **kwargs: Any) -> None:
        # A prefork child about to exit (os._exit: no atexit hook runs after).
        self._close_process()

    def on_worker_shutdown(self, sender: Any = None, **kwargs: Any) -> None:
        if self._is_ours(getattr(sender, "app", None)):
            self._close_process()

    def _close_process(self) -> None:
        """Leave no session behind: this thread's connections, the pools' idle ones."""
        end_thread()
        # In use elsewhere (a thread still finishing a task): closed when given back.
        close_pools(0)
        _close_django_pools()

    def _check_builtin(self) -> None:
        """Once per process, at the first task: warn if the built-in fix-up still runs."""
        with self._check_lock:
            if self._checked:
                return
            self._checked = True
        found = _builtin_task_receivers()
        if found:
            logger.warning(
                "Celery's built-in Django fix-up still receives %s in this worker: it closes "
                "every database connection before and after each task, so the pool's "
                "connections are not reused. Call async_dbbridge.integrations.celery."
                "install(app) on the app the worker runs, where the app is created.",
                " and ".join(found),
            )
