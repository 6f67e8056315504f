"""pytest plugin: asgiref's own test suite with the bridge in every event loop.

Loaded by ``scripts/peer_suites.sh`` into a run of the tests from asgiref's sdist
(``-p tests.peers.asgiref_plugin``), against the *installed* asgiref. The mode
comes from ``PEERS_ASGIREF_MODE``:

``executor``
    The process-wide bridge (`get_bridge_executor`) is the default executor of
    every event loop the tests create; asgiref's functions are untouched. So
    ``sync_to_async(thread_sensitive=False)``, ``run_in_executor(None, ...)`` and
    ``asyncio.to_thread`` run on bridge workers, and every ``asyncio.run`` (the
    loops ``async_to_sync`` starts in threads included) ends by shutting its
    default executor down, which must end that loop's calls only: the session
    fails if the process-wide bridge had to be rebuilt (a loop's end shut it
    down for all the others).
``db_sync_to_async``
    The same, and ``asgiref.sync.sync_to_async(fn, thread_sensitive=False)``
    (no ``executor=``) becomes ``db_sync_to_async(fn)``. In the tests of
    `SURFACE_TESTS` every ``sync_to_async`` call without ``executor=`` is
    substituted, thread-sensitive or not: they test the wrapper's surface
    (decorator forms, ``__self__``, ``context=``, contextvars, argument
    passing, errors), which ``db_sync_to_async`` promises to share.

Hangs are bounded by pytest-timeout, which ``scripts/peer_suites.sh`` runs with
``--timeout-method=thread``: a deadlocked test dumps every thread's stack and
ends the run (the signal method fails the test once, then its teardown, which
joins the deadlocked threads, hangs for ever).

How every loop gets the bridge: an event loop policy whose ``new_event_loop()``
calls ``install_default_executor(loop=loop)``. ``asyncio.run``/``asyncio.Runner``
without a ``loop_factory``, ``asyncio.new_event_loop()`` and pytest-asyncio
(which takes the current policy) all create their loops through the policy, in
any thread, so no test and no asgiref code needs patching. A loop built another
way (a ``loop_factory``, a loop class called directly) would escape it, so a
guard counts loops that *run* without coming from the policy and fails the
session if there are any: the hook cannot silently miss loops.
"""

from __future__ import annotations

import asyncio
import contextvars
import faulthandler
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import pytest

from tests.peers import expectations

if TYPE_CHECKING:
    from async_dbbridge import DBExecutor

MODES: Final = ("executor", "db_sync_to_async")

#: asgiref tests (3.13.0) that test what a ``sync_to_async`` wrapper *is*, not
#: where it runs: in mode ``db_sync_to_async`` all their calls are substituted.
#: Left out on purpose: tests of thread sensitivity (``db_sync_to_async`` is
#: the ``thread_sensitive=False`` form), ``test_sync_to_async`` (it replaces the
#: loop's default with a plain one-worker pool and times the calls; the bridge
#: never hands ORM work to a pool that does not clean up), and tests that
#: subclass ``SyncToAsync`` or pass ``executor=``.
SURFACE_TESTS: Final = frozenset(
    {
        "tests/test_sync.py::test_sync_to_async_fail_non_function",
        "tests/test_sync.py::test_sync_to_async_fail_async",
        "tests/test_sync.py::test_async_to_sync_fail_partial",
        "tests/test_sync.py::test_sync_to_async_raises_typeerror_for_async_callable_instance",
        "tests/test_sync.py::test_sync_to_async_decorator",
        "tests/test_sync.py::test_nested_sync_to_async_retains_wrapped_function_attributes",
        "tests/test_sync.py::test_sync_to_async_method_decorator",
        "tests/test_sync.py::test_sync_to_async_method_self_attribute",
        "tests/test_sync.py::test_sync_to_async_detected_as_coroutinefunction",
        "tests/test_sync.py::test_sync_to_async_overlapping_kwargs",
        "tests/test_sync_contextvars.py::test_sync_to_async_contextvars",
        "tests/test_sync_contextvars.py::test_sync_to_async_contextvars_with_custom_context",
        "tests/test_sync_contextvars.py::"
        "test_sync_to_async_contextvars_with_custom_context_and_parallel_tasks",
        "tests/test_sync_contextvars.py::"
        "test_sync_to_async_contextvars_with_callable_with_context_attribute",
        "tests/test_sync_contextvars.py::test_restore_context_does_not_compare_values_by_equality",
    }
)

#: Seconds the interpreter may take to exit after the session: longer means a
#: thread is stuck (asyncio's and concurrent.futures' exit hooks join their
#: threads), and the process dumps every thread's stack and exits with 1.
EXIT_TIMEOUT: Final = 30.0


class _State:
    """What the plugin set up and saw, for the session summary."""

    def __init__(self) -> None:
        self.mode = "executor"
        self.run = ""
        self.lock = threading.Lock()
        # Loops made by the policy (weak: closed loops must not pile up).
        self.hooked: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self.loops_created = 0
        self.unhooked_runs: list[str] = []
        # Every distinct bridge installed: more than one means a loop's end shut
        # the shared bridge down and the next loop got a new one.
        self.bridges: list[DBExecutor] = []
        self.substituted = 0
        self.surface_test_running = False
        self.expected: dict[str, expectations.Expected] = {}
        self.collected: set[str] = set()


_state = _State()


def _configure_django() -> None:
    """The least Django the bridge needs: settings with a file SQLite database.

    File-backed, as in the project's own tests (in-memory SQLite ignores
    close()); asgiref's tests never query it, so it is normally never created.
    """
    import django
    from django.conf import settings

    from tests.dbconfig import sqlite_file

    if not settings.configured:
        settings.configure(
            DATABASES={
                "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": sqlite_file("peers")}
            },
            INSTALLED_APPS=["async_dbbridge"],
            USE_TZ=True,
        )
    django.setup()


class BridgePolicy(asyncio.DefaultEventLoopPolicy):
    """The default policy, but every new loop has the bridge as its default executor.

    Installed at configure time, before pytest-asyncio reads the current policy
    and before any test runs; ``asyncio.set_event_loop_policy`` is public API on
    Python 3.11-3.13 (checked on 3.11.7 and 3.13.0; deprecated from 3.14, where
    this would become a ``loop_factory``).
    """

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        from async_dbbridge import install_default_executor

        loop = super().new_event_loop()
        bridge = install_default_executor(loop=loop)
        with _state.lock:
            _state.hooked.add(loop)
            _state.loops_created += 1
            if not any(known is bridge for known in _state.bridges):
                _state.bridges.append(bridge)
        return loop


def _guard_unhooked_loops() -> None:
    """Record loops that run without having come from the policy.

    ``BaseEventLoop.run_forever`` is where every asyncio loop runs (also via
    ``run_until_complete``); it is public, unchanged in shape since 3.4 (checked
    on 3.11.7 and 3.13.0). Wrapped only to observe: it calls the original.
    """
    original = asyncio.BaseEventLoop.run_forever

    def run_forever(self: asyncio.BaseEventLoop) -> None:
        if self not in _state.hooked:
            with _state.lock:
                _state.unhooked_runs.append(f"{self!r} in {threading.current_thread().name}")
        return original(self)

    # mypy forbids assigning to a method; replacing it on the class is the point.
    asyncio.BaseEventLoop.run_forever = run_forever  # type: ignore[method-assign]


def _substitute_sync_to_async() -> None:
    """Make ``asgiref.sync.sync_to_async`` hand the calls of this mode to ``db_sync_to_async``.

    Done at configure time, before the test modules ``from asgiref.sync import
    sync_to_async``. ``context=`` is passed on only when given, so a
    ``db_sync_to_async`` without it fails exactly the tests that use it.
    """
    import asgiref.sync

    from async_dbbridge import db_sync_to_async

    original = asgiref.sync.sync_to_async

    def sync_to_async(
        func: Callable[..., Any] | None = None,
        *,
        thread_sensitive: bool = True,
        executor: Any = None,
        context: contextvars.Context | None = None,
    ) -> Any:
        substitute = executor is None and (not thread_sensitive or _state.surface_test_running)
        if not substitute:
            return original(
                func,  # type: ignore[arg-type]  # None is the decorator form; typed by overloads
                thread_sensitive=thread_sensitive,
                executor=executor,
                context=context,
            )
        with _state.lock:
            _state.substituted += 1
        extra: dict[str, Any] = {} if context is None else {"context": context}
        if func is None:
            return lambda f: db_sync_to_async(f, **extra)
        return db_sync_to_async(func, **extra)

    asgiref.sync.sync_to_async = sync_to_async


def pytest_configure(config: pytest.Config) -> None:
    mode = os.environ.get("PEERS_ASGIREF_MODE", "executor")
    if mode not in MODES:
        raise pytest.UsageError(
            f"PEERS_ASGIREF_MODE must be one of {', '.join(MODES)}, not {mode!r}"
        )
    _state.mode = mode
    _state.run = expectations.run_name()
    try:
        _state.expected = expectations.load(_state.run)
    except expectations.ExpectedFailuresError as exc:
        raise pytest.UsageError(str(exc)) from None
    _configure_django()
    asyncio.set_event_loop_policy(BridgePolicy())
    _guard_unhooked_loops()
    if mode == "db_sync_to_async":
        _substitute_sync_to_async()


def pytest_report_header(config: pytest.Config) -> list[str]:
    import asgiref

    import async_dbbridge

    return [
        f"peers: run {_state.run}, mode {_state.mode}",
        f"peers: asgiref {asgiref.__version__} from {os.path.dirname(asgiref.__file__)}",
        f"peers: async_dbbridge from {os.path.dirname(async_dbbridge.__file__)}",
    ]


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        _state.collected.add(item.nodeid)
        entry = _state.expected.get(item.nodeid)
        if entry is not None:
            # strict: a listed test that passes fails the run, so the list stays honest.
            item.add_marker(pytest.mark.xfail(reason=entry.describe(), strict=True))
    if not expectations.check_complete():
        return
    missing = [e for tid, e in _state.expected.items() if tid not in _state.collected]
    if missing:
        raise pytest.UsageError(expectations.stale_message(_state.run, missing))
    gone = sorted(SURFACE_TESTS - _state.collected)
    if gone and _state.mode == "db_sync_to_async":
        raise pytest.UsageError(
            "asgiref's suite no longer has these tests of SURFACE_TESTS "
            f"(tests/peers/asgiref_plugin.py): {', '.join(gone)}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    surface = _state.mode == "db_sync_to_async" and item.nodeid in SURFACE_TESTS
    _state.surface_test_running = surface
    try:
        return (yield)
    finally:
        _state.surface_test_running = False


def _bridge_summary() -> list[str]:
    calls = 0
    for bridge in _state.bridges:
        calls += bridge.stats().calls
    lines = [
        f"peers: {_state.loops_created} event loops created, each with the bridge as "
        f"default executor; {calls} calls ran on {len(_state.bridges)} bridge instance(s)"
    ]
    if _state.mode == "db_sync_to_async":
        lines.append(f"peers: {_state.substituted} sync_to_async calls ran as db_sync_to_async")
    return lines


def _session_problems() -> list[str]:
    problems = []
    if _state.unhooked_runs:
        # A run whose loops escaped the hook tested less than it claims.
        problems.append(
            f"{len(_state.unhooked_runs)} event loop run(s) without the bridge (not made by "
            "the policy): " + "; ".join(_state.unhooked_runs[:5])
        )
    if _state.loops_created == 0:
        problems.append("no event loop came from the bridge policy")
    if len(_state.bridges) > 1:
        # DESIGN 4b: a loop ending releases only what belongs to that loop; the
        # process-wide bridge closes at process exit or on an explicit close.
        problems.append(
            f"the process-wide bridge was replaced {len(_state.bridges) - 1} time(s): "
            "a loop's end shut it down for every other loop"
        )
    return problems


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for line in _bridge_summary():
        terminalreporter.write_line(line)
    for problem in _session_problems():
        terminalreporter.write_line(f"peers: FAILED: {problem}", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.testscollected and _session_problems() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # A deadlocked thread would hang interpreter exit (asyncio and
    # concurrent.futures join their threads at exit): bound it, with stacks.
    faulthandler.dump_traceback_later(EXIT_TIMEOUT, exit=True)
