"""`install(app)` in the test process: what it does to an app and its signals, no worker.

The real workers are driven by ``test_celery.py``; here the fix-up's
bookkeeping is checked on real Celery app objects (no broker is contacted).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, signals, states
from celery.exceptions import Retry, SoftTimeLimitExceeded, WorkerShutdown
from celery.fixups.django import DjangoFixup
from django.db import DatabaseError, connections

from async_dbbridge.integrations.celery import FIXUP, DBBridgeFixup, _outcome, install
from tests.testapp.models import Item


def receivers_of(signal: Any, cls: type) -> int:
    """How many of ``signal``'s receivers are bound methods of a ``cls`` instance."""
    count = 0
    for _key, receiver in list(signal.receivers):
        fn = receiver() if isinstance(receiver, weakref.ref) else receiver
        count += isinstance(getattr(fn, "__self__", None), cls)
    return count


@pytest.fixture
def apps() -> Iterator[list[Celery]]:
    """Apps made by a test; the fix-ups' receivers they installed are disconnected after."""
    made: list[Celery] = []
    yield made
    for app in made:
        for fixup in getattr(app, "_fixups", []):
            if isinstance(fixup, DBBridgeFixup):
                fixup._disconnect()


def test_install_replaces_the_builtin_fixup(apps: list[Celery]) -> None:
    app = Celery("proj", set_as_current=False)
    apps.append(app)
    # DJANGO_SETTINGS_MODULE is set: Celery installed its own Django fix-up.
    assert app.fixups == {"celery.fixups.django:fixup"}  # type: ignore[attr-defined]
    assert receivers_of(signals.import_modules, DjangoFixup) >= 1
    before = receivers_of(signals.import_modules, DjangoFixup)

    fixup = install(app)
    assert install(app) is fixup  # idempotent
    assert app.fixups == {FIXUP}  # type: ignore[attr-defined]
    assert [type(f) for f in app._fixups] == [DBBridgeFixup]  # type: ignore[attr-defined]
    assert receivers_of(signals.import_modules, DjangoFixup) == before - 1
    assert receivers_of(signals.task_prerun, DBBridgeFixup) >= 1
    # Kept from the built-in fix-up: Django's task class and its notion of now.
    assert app.task_cls == "celery.contrib.django.task:DjangoTask"
    assert app.loader.now() is not None
    assert "tests.testapp" in fixup.autodiscover_tasks()


def test_the_fixup_can_be_named_at_construction(apps: list[Celery]) -> None:
    app = Celery("proj", set_as_current=False, fixups=[FIXUP])
    apps.append(app)
    assert [type(f) for f in app._fixups] == [DBBridgeFixup]  # type: ignore[attr-defined]
    assert install(app) is app._fixups[0]  # type: ignore[attr-defined]


def test_a_builtin_fixup_still_receiving_task_signals_is_reported_once(
    apps: list[Celery], caplog: pytest.LogCaptureFixture
) -> None:
    other = Celery("other", set_as_current=False)
    ours = Celery("ours", set_as_current=False)
    apps += [other, ours]
    fixup = install(ours)
    # The other app's fix-up as a worker start installs it: per-task receivers.
    builtin = next(f for f in other._fixups if isinstance(f, DjangoFixup))  # type: ignore[attr-defined]
    worker_fixup = builtin.worker_fixup
    signals.task_prerun.connect(worker_fixup.on_task_prerun)
    try:
        with caplog.at_level(logging.WARNING, logger="async_dbbridge"):
            fixup._check_builtin()
            fixup._check_builtin()
    finally:
        signals.task_prerun.disconnect(worker_fixup.on_task_prerun)
    messages = [r.getMessage() for r in caplog.records if r.name == "async_dbbridge"]
    assert len(messages) == 1
    assert "built-in Django fix-up still receives task_prerun" in messages[0]


@pytest.mark.parametrize(
    ("retval", "state", "error", "interrupted"),
    [
        (42, states.SUCCESS, None, False),
        (DatabaseError("boom"), states.FAILURE, DatabaseError, False),
        (ValueError("no"), states.FAILURE, ValueError, False),
        (SoftTimeLimitExceeded(), states.FAILURE, SoftTimeLimitExceeded, True),
        (Retry(exc=DatabaseError("boom")), states.RETRY, DatabaseError, False),
        # A BaseException Celery re-raises: task_postrun comes with no state.
        (None, None, None, True),
        (WorkerShutdown(), states.FAILURE, WorkerShutdown, True),
        # A task may return an exception object: it did not raise it.
        (DatabaseError("returned"), states.SUCCESS, None, False),
    ],
)
def test_the_outcome_of_a_task_decides_its_connections_fate(
    retval: object, state: str | None, error: type[BaseException] | None, interrupted: bool
) -> None:
    got, got_interrupted = _outcome(retval, state)
    assert (type(got) if got is not None else None) is error
    assert got_interrupted is interrupted


@pytest.mark.django_db(transaction=True)
def test_an_eager_task_leaves_the_callers_connection_alone(apps: list[Celery]) -> None:
    app = Celery("proj", set_as_current=False)
    apps.append(app)
    install(app)

    @app.task(name="count_items")
    def count_items() -> int:
        return Item.objects.count()

    assert count_items.apply().get() == 0
    conn = connections["default"]
    assert conn.connection is not None  # the task ran on this thread's connection ...
    assert not getattr(conn, "_dbbridge_pooled", False)  # ... which is still the caller's own
