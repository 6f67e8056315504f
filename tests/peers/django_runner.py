"""A Django test runner for Django's own tests with the bridge's ASGI wrapper in place.

Selected by ``tests.peers.django_settings`` (``TEST_RUNNER``) in a run of
Django's ``tests/runtests.py`` from the sdist of the installed Django.

**What "with the wrapper in place" covers.** The wrapper is an ASGI app around
Django's ``ASGIHandler``, so it is in place wherever Django's tests drive the
handler as an ASGI app:

- ``django.core.asgi.get_asgi_application`` is ``async_dbbridge.asgi.get_asgi_application``
  (what a project's ``asgi.py`` uses after following our docs);
- ``asgiref.testing.ApplicationCommunicator`` wraps any ``ASGIHandler`` it is
  given (the tests' own ``ASGIHandler`` subclasses too) in ``DBBridgeASGIApp``,
  unless it is a static-files handler: that one wraps the application
  (ours, from ``get_asgi_application``) as ``runserver``/daphne would.

Django's test client (``AsyncClient``, ``AsyncRequestFactory``) calls the handler
without ASGI, so tests using it run without the wrapper, as a project's tests
would. Both patches are installed before the test modules are imported (they
import the names) and removed at the end.

**Bounded hangs.** Each test has ``PEERS_TEST_TIMEOUT`` seconds (default 60):
past that, the test is named, every thread's stack is dumped and the process
exits with 1. Run
with ``--parallel 1``: in worker processes the timer would not be armed.

**Expected failures** come from ``expected_failures.txt`` for the run named by
``PEERS_RUN``: a listed test that fails is an expected failure, one that passes
is an unexpected success, which fails the run (Django counts those).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import unittest
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, ClassVar, TypeAlias

from django.test.runner import DiscoverRunner

from tests.peers import expectations

__all__ = ("PeerTestRunner",)

OptExcInfo: TypeAlias = (
    tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
)

DEFAULT_TEST_TIMEOUT = 60.0


def _test_timeout() -> float:
    raw = os.environ.get("PEERS_TEST_TIMEOUT", "")
    if not raw:
        return DEFAULT_TEST_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ValueError(f"PEERS_TEST_TIMEOUT must be a positive number of seconds, not {raw!r}")
    return value


def _test_cases(suite: unittest.TestSuite) -> Iterator[unittest.TestCase]:
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _test_cases(test)
        else:
            yield test


class _Patches:
    """The two substitutions that put the wrapper in place, reversibly."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        # ASGI apps the tests drove through a communicator, by whether the
        # wrapper was in front of Django's handler: proof that it was in place.
        self.through_wrapper = 0
        self.not_through_wrapper = 0

    def install(self) -> None:
        import asgiref.testing
        import django.core.asgi
        from django.contrib.staticfiles.handlers import StaticFilesHandlerMixin
        from django.core.handlers.asgi import ASGIHandler

        from async_dbbridge.asgi import DBBridgeASGIApp, get_asgi_application

        original_get = django.core.asgi.get_asgi_application
        original_communicator = asgiref.testing.ApplicationCommunicator
        patches = self

        # The class is a runtime value here (whatever asgiref.testing holds), which mypy
        # cannot check as a base.
        class BridgedCommunicator(original_communicator):  # type: ignore[misc,valid-type]
            """``ApplicationCommunicator`` that drives Django handlers through the wrapper."""

            def __init__(self, application: Any, scope: Any) -> None:
                if isinstance(application, ASGIHandler) and not isinstance(
                    application, StaticFilesHandlerMixin
                ):
                    application = DBBridgeASGIApp(application)
                # StaticFilesHandlerMixin keeps the app it wraps in .application
                # (Django 5.2.19 and 6.1.3).
                inner = getattr(application, "application", None)
                if isinstance(application, DBBridgeASGIApp) or isinstance(inner, DBBridgeASGIApp):
                    patches.through_wrapper += 1
                else:
                    patches.not_through_wrapper += 1
                super().__init__(application, scope)

        # Ours returns DBBridgeASGIApp, not ASGIHandler: the point of the patch.
        django.core.asgi.get_asgi_application = get_asgi_application  # type: ignore[assignment]
        # mypy sees a class being reassigned; it is a module attribute like any other.
        asgiref.testing.ApplicationCommunicator = BridgedCommunicator  # type: ignore[misc]

        def undo() -> None:
            django.core.asgi.get_asgi_application = original_get
            asgiref.testing.ApplicationCommunicator = original_communicator  # type: ignore[misc]  # as above

        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def _timed_out(test_id: str, timeout: float) -> None:
    sys.stderr.write(f"\npeers: TIMEOUT: {test_id} still running after {timeout:g}s\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(1)


class PeerTestResult(unittest.TextTestResult):
    """Applies the expected-failures list, and bounds each test's time."""

    # Set on a subclass made per run (unittest builds the result from its class).
    expected: ClassVar[dict[str, expectations.Expected]] = {}
    timeout: ClassVar[float] = DEFAULT_TEST_TIMEOUT

    _timer: threading.Timer | None = None

    def startTest(self, test: unittest.TestCase) -> None:
        # A deadlock must fail the run, not stall CI: past the timeout the test
        # is named, every thread's stack is written to stderr and the process
        # exits with 1. faulthandler's own watchdog (a C thread that needs no
        # GIL) is the backstop should the timer thread itself be stuck.
        self._timer = threading.Timer(self.timeout, _timed_out, args=(test.id(), self.timeout))
        self._timer.daemon = True
        self._timer.start()
        faulthandler.dump_traceback_later(self.timeout + 15, exit=True)
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        faulthandler.cancel_dump_traceback_later()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expected(self, test: unittest.TestCase) -> expectations.Expected | None:
        return self.expected.get(test.id())

    def addFailure(self, test: unittest.TestCase, err: OptExcInfo) -> None:
        if self._expected(test) is not None:
            self.addExpectedFailure(test, err)
        else:
            super().addFailure(test, err)

    def addError(self, test: unittest.TestCase, err: OptExcInfo) -> None:
        if self._expected(test) is not None and err[0] is not None:
            self.addExpectedFailure(test, err)
        else:
            super().addError(test, err)

    def addSubTest(
        self, test: unittest.TestCase, subtest: unittest.TestCase, err: OptExcInfo | None
    ) -> None:
        if err is not None and err[0] is not None and self._expected(test) is not None:
            self.addExpectedFailure(test, err)  # the test as a whole failed: counted once below
        else:
            super().addSubTest(test, subtest, err)

    def addExpectedFailure(self, test: unittest.TestCase, err: OptExcInfo) -> None:
        # Once per test, however many of its subtests failed.
        if not any(done is test for done, _ in self.expectedFailures):
            super().addExpectedFailure(test, err)

    def addSuccess(self, test: unittest.TestCase) -> None:
        if self._expected(test) is not None:
            self.addUnexpectedSuccess(test)
        else:
            super().addSuccess(test)


class PeerTestRunner(DiscoverRunner):
    """``DiscoverRunner`` with the wrapper in place and the expected-failures list applied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run = expectations.run_name()
        self.expected = expectations.load(self.run)
        self._patches = _Patches()
        self._timeout = _test_timeout()

    def setup_test_environment(self, **kwargs: Any) -> None:
        # Before build_suite imports the test modules, which import the names.
        self._patches.install()
        super().setup_test_environment(**kwargs)

    def teardown_test_environment(self, **kwargs: Any) -> None:
        super().teardown_test_environment(**kwargs)
        self._patches.remove()

    def build_suite(self, *args: Any, **kwargs: Any) -> unittest.TestSuite:
        suite = super().build_suite(*args, **kwargs)
        ids = {test.id() for test in _test_cases(suite)}
        missing = [entry for test_id, entry in self.expected.items() if test_id not in ids]
        if missing and expectations.check_complete():
            raise expectations.ExpectedFailuresError(expectations.stale_message(self.run, missing))
        return suite

    def get_resultclass(self) -> type[unittest.TextTestResult] | None:
        if self.debug_sql or self.pdb:
            return super().get_resultclass()
        expected, timeout = self.expected, self._timeout

        class Result(PeerTestResult):
            pass

        Result.expected = expected
        Result.timeout = timeout
        return Result

    def run_suite(self, suite: unittest.TestSuite, **kwargs: Any) -> unittest.TextTestResult:
        import async_dbbridge

        self.log(
            f"peers: run {self.run}; {len(self.expected)} expected failure(s) listed; "
            f"async_dbbridge from {os.path.dirname(async_dbbridge.__file__)}"
        )
        # Before running: a suite drops its tests as they finish.
        ran_asgi = any(test.id().startswith("asgi.") for test in _test_cases(suite))
        result = super().run_suite(suite, **kwargs)
        patches = self._patches
        self.log(
            f"peers: {patches.through_wrapper} ASGI app(s) driven through the wrapper, "
            f"{patches.not_through_wrapper} without it"
        )
        if ran_asgi and patches.through_wrapper == 0:
            # The asgi tests ran, but never through the wrapper: the patches
            # missed, and a green run would claim what it did not test.
            raise RuntimeError("peers: Django's asgi tests ran, but none through the wrapper")
        return result
