"""The `dbbridge_no_leaks` fixture, run the way a project runs it.

Each test writes a small test suite and runs pytest on it in a subprocess (its
own Django settings and test databases: this process's are already set up),
with `tests.settings` on the backend chosen by `DB_BACKEND`. The inner tests
open real connections and prove it with server-side counts; the outer tests
read what pytest printed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

# The inner run's whole budget (Django start-up, test databases, the tests):
# a hang becomes a failure of the outer test.
INNER_RUN_TIMEOUT = 100.0

INI = """\
[pytest]
DJANGO_SETTINGS_MODULE = tests.settings
addopts = -p no:cacheprovider
filterwarnings = error
asyncio_default_fixture_loop_scope = function
"""

# Opens a connection on a named plain thread and keeps it until the fixture
# that started the thread is torn down — which happens after dbbridge_no_leaks
# has checked, because the test requests it first.
HOLDER = """
import threading
from collections.abc import Callable, Iterator

import pytest
from django.db import connections

from async_dbbridge.testing import server_session_count


def hold_connection(alias: str, connected: threading.Event, release: threading.Event) -> None:
    connections[alias].ensure_connection()
    connected.set()
    release.wait()
    connections[alias].close()


@pytest.fixture
def leak_on_thread() -> Iterator[Callable[[str, str], None]]:
    release = threading.Event()
    threads = []

    def start(name: str, alias: str = "default") -> None:
        before = server_session_count(alias)
        connected = threading.Event()
        thread = threading.Thread(
            target=hold_connection, args=(alias, connected, release), name=name, daemon=True
        )
        threads.append(thread)
        thread.start()
        assert connected.wait(10)
        assert server_session_count(alias) == before + 1  # it really connected

    yield start
    release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
"""


def inner_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ini: str) -> None:
    """A project in pytester's directory that can import this repository's code."""
    # The subprocess imports async_dbbridge and tests.settings from this checkout
    # (ahead of any installed copy) and inherits DB_BACKEND.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    # pytest-django exported this process's settings module; the inner run's
    # pytest.ini is to say which one it uses.
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    pytester.makefile(".ini", pytest=ini)
    pytester.makeconftest(HOLDER)


def run_inner(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-v", *args, timeout=INNER_RUN_TIMEOUT)


def teardown_error(result: pytest.RunResult, test: str) -> str:
    """What pytest printed for ``test``'s error at teardown."""
    return section(result, f"ERROR at teardown of {test}")


def section(result: pytest.RunResult, title: str) -> str:
    text = result.stdout.str()
    # From the section's title bar to the next one, captured output or summary.
    match = re.search(
        rf"^_+ {re.escape(title)} _+$\n(.*?)(?=^_{{3,}} |^=+ |^-+ Captured )", text, re.M | re.S
    )
    assert match is not None, f"no section {title!r} in:\n{text}"
    return match.group(1)


def line_of(pytester: pytest.Pytester, name: str, text: str) -> int:
    """The number of the one line of file ``name`` that holds ``text``."""
    lines = (pytester.path / name).read_text().splitlines()
    found = [number for number, line in enumerate(lines, 1) if text in line]
    assert len(found) == 1, (name, text, found)
    return found[0]


FIX_HINT = [
    "How to fix: give every thread that touches the database an owner that closes its",
    "connections when its work is done:",
    "  - run the work on a DBExecutor (`with DBExecutor() as pool: pool.submit(fn)`), or from",
    "    async code with `await db_call(fn)`;",
    "  - start your own threads as DBThread instead of threading.Thread;",
    "  - in a long-lived thread, wrap each job in `with db_connection_scope():`.",
]

LEAKS = """
import gc
import threading

import pytest
from django.db import connection

from async_dbbridge import DBExecutor, DBThread, db_call
from async_dbbridge.testing import server_session_count
from tests.testapp.models import Item


def count_items() -> int:
    return Item.objects.count()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_threads_that_close(dbbridge_no_leaks):
    with DBExecutor(max_workers=2) as pool:
        assert list(pool.map(lambda _: count_items(), range(4))) == [0] * 4
        assert pool.stats().connections_opened["default"] >= 1
    thread = DBThread(target=count_items, name="closing-thread")
    thread.start()
    thread.join()


@pytest.mark.django_db(transaction=True)
def test_uses_its_own_thread(dbbridge_no_leaks):
    assert Item.objects.count() == 0
    assert connection.connection is not None


@pytest.mark.django_db(transaction=True)
def test_collector_is_off_during_a_test_with_the_fixture(dbbridge_no_leaks):
    # So that a connection stranded on an ended thread is reported every time.
    assert not gc.isenabled()


def test_and_on_again_after_it():
    assert gc.isenabled()


def test_without_database_access(dbbridge_no_leaks):
    pass


@pytest.mark.django_db(transaction=True)
async def test_db_call(dbbridge_no_leaks):
    assert await db_call(count_items) == 0


@pytest.mark.django_db(transaction=True)
async def test_checks_early_in_an_async_test(dbbridge_no_leaks):
    assert await db_call(count_items) == 0
    dbbridge_no_leaks()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_leaks_on_a_running_thread(leak_on_thread, dbbridge_no_leaks):
    leak_on_thread("report-worker")
    assert Item.objects.count() == 0  # and the test's own thread connects too


@pytest.mark.django_db(transaction=True)
def test_leaks_on_an_ended_thread(dbbridge_no_leaks):
    before = server_session_count()
    thread = threading.Thread(target=count_items, name="counter")
    thread.start()
    thread.join()
    assert server_session_count() == before + 1


@pytest.mark.django_db(transaction=True)
def test_checks_early(leak_on_thread, dbbridge_no_leaks):
    leak_on_thread("early-worker")
    dbbridge_no_leaks()
"""


def test_leaks_fail_at_once_with_counts_holders_origins_and_the_fix(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A leak may only be reported once the count has settled: the deadline is
    # 60 s but each inner test gets 30 s, so waiting it out is a timeout.
    inner_project(
        pytester,
        monkeypatch,
        INI + "asyncio_mode = auto\ntimeout = 30\ndbbridge_leak_timeout = 60\n",
    )
    pytester.makepyfile(test_leaks=LEAKS)
    result = run_inner(pytester)

    result.assert_outcomes(passed=8, failed=1, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*::test_threads_that_close PASSED*",
            "*::test_uses_its_own_thread PASSED*",
            "*::test_collector_is_off_during_a_test_with_the_fixture PASSED*",
            "*::test_db_call PASSED*",
            "*::test_checks_early_in_an_async_test PASSED*",
            "*::test_leaks_on_a_running_thread PASSED*",
            "*::test_leaks_on_a_running_thread ERROR*",
            "*::test_leaks_on_an_ended_thread PASSED*",
            "*::test_leaks_on_an_ended_thread ERROR*",
            "*::test_checks_early FAILED*",
            # pytest-django runs the tests that use no database last.
            "*::test_and_on_again_after_it PASSED*",
            "*::test_without_database_access ERROR*",
        ]
    )
    assert "Timeout" not in result.stdout.str()

    opens = "connections[alias].ensure_connection()"
    running = teardown_error(result, "test_leaks_on_a_running_thread").splitlines()
    assert running == [
        "dbbridge_no_leaks: the test left 1 database session(s) open.",
        "Sessions per database, besides the test's own thread's (Django closes those):",
        "  'default': 0 before the test, 1 after",
        "  'other': 0 before the test, 0 after",
        "Django connections still open in this process:",
        "  'default' on thread 'report-worker' (still running)",
        "    opened at:",
        f"    conftest.py:{line_of(pytester, 'conftest.py', opens)} in hold_connection",
        "      connections[alias].ensure_connection()",
        *FIX_HINT,
        running[-1],
    ]
    assert re.fullmatch(r"\(reported after \d+\.\d s: the count settled\)", running[-1])

    ended = teardown_error(result, "test_leaks_on_an_ended_thread").splitlines()
    assert ended[:9] == [
        "dbbridge_no_leaks: the test left 1 database session(s) open.",
        "Sessions per database, besides the test's own thread's (Django closes those):",
        "  'default': 0 before the test, 1 after",
        "Django connections still open in this process:",
        "  'default' on thread 'counter' (ended without closing it)",
        "    opened at:",
        f"    test_leaks.py:{line_of(pytester, 'test_leaks.py', 'return Item')} in count_items",
        "      return Item.objects.count()",
        FIX_HINT[0],
    ]

    assert section(result, "ERROR at setup of test_without_database_access").splitlines() == [
        "dbbridge_no_leaks needs database access: mark the test with "
        "@pytest.mark.django_db(transaction=True)"
    ]

    # Checked from the test body, the leak fails the test itself.
    early = section(result, "test_checks_early")
    assert "dbbridge_no_leaks: the test left 1 database session(s) open." in early
    assert "  'default' on thread 'early-worker' (still running)" in early


UNSETTLED = '''
import threading

import pytest
from django.db import connections

from async_dbbridge import get_bridge_executor
from async_dbbridge.testing import server_session_count
from tests.testapp.models import Item


@pytest.fixture
def raw_session():
    """Opens a session with the driver directly: no Django connection holds it."""
    opened = []

    def open_session() -> None:
        conn = connections["default"]
        before = server_session_count()
        opened.append(conn.get_new_connection(conn.get_connection_params()))
        assert server_session_count() == before + 1

    yield open_session
    for raw in opened:
        raw.close()


@pytest.fixture
def stuck_bridge_call():
    """A bridge call that holds a connection and does not return until released."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        Item.objects.count()
        started.set()
        release.wait()

    def start() -> None:
        before = server_session_count()
        future = get_bridge_executor().submit(hold)
        assert started.wait(10)
        assert server_session_count() == before + 1
        calls.append(future)

    calls = []
    yield start
    release.set()
    for future in calls:
        future.result(timeout=10)


@pytest.mark.django_db(transaction=True)
def test_session_nobody_here_holds(raw_session, dbbridge_no_leaks):
    raw_session()


@pytest.mark.django_db(transaction=True)
def test_bridge_call_still_running(stuck_bridge_call, dbbridge_no_leaks):
    stuck_bridge_call()
'''


def test_a_count_that_may_still_fall_is_waited_for_until_the_deadline(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not settled: a session no Django connection here holds (the server may be
    about to drop it), or a bridge call still running (it cleans up when it
    returns). Both are waited for — within the deadline, then reported."""
    inner_project(pytester, monkeypatch, INI + "timeout = 60\ndbbridge_leak_timeout = 1\n")
    pytester.makepyfile(test_unsettled=UNSETTLED)
    result = run_inner(pytester)

    result.assert_outcomes(passed=2, errors=2)
    raw = teardown_error(result, "test_session_nobody_here_holds").splitlines()
    assert raw[:3] == [
        "dbbridge_no_leaks: the test left 1 database session(s) open.",
        "Sessions per database, besides the test's own thread's (Django closes those):",
        "  'default': 0 before the test, 1 after "
        "(some not held by any Django connection in this process)",
    ]
    assert raw[3] == FIX_HINT[0]  # no Django connection to name
    assert re.fullmatch(r"\(reported after \d+\.\d s: dbbridge_leak_timeout = 1 s\)", raw[-1])

    stuck = teardown_error(result, "test_bridge_call_still_running")
    assert "  'default': 0 before the test, 1 after\n" in stuck
    assert re.search(
        r"^Cleanup still under way at the deadline:\n"
        r"  <DBExecutor shutdown .*>: 1 call\(s\) running, 0 queued$",
        stuck,
        re.M,
    ), stuck
    assert re.search(r"^\(reported after \d+\.\d s: dbbridge_leak_timeout = 1 s\)$", stuck, re.M)


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_a_bad_deadline_is_a_usage_error_naming_the_option(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    inner_project(pytester, monkeypatch, INI + f"dbbridge_leak_timeout = {value}\n")
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = run_inner(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*dbbridge_leak_timeout must be a number of seconds greater than 0, not '{value}'*"]
    )


# -- the pytest samples in docs/testing.md, run exactly as printed ---------------

DOCS = ROOT / "docs" / "testing.md"
# A fenced block whose first line names its file: "# pytest.ini", "# test_items.py".
_NAMED_BLOCK = re.compile(r"^```(\w+)\n# (\S+)\n(.*?)^```\n", re.M | re.S)
_OUTPUT_BLOCK = re.compile(r"^```text\n(.*?)^```\n", re.M | re.S)


def docs_files() -> dict[str, str]:
    """Every file the testing page prints, by name, exactly as printed."""
    files = {}
    for match in _NAMED_BLOCK.finditer(DOCS.read_text()):
        kind, name, body = match.groups()
        assert name not in files, f"docs/testing.md prints {name} twice"
        files[name] = f"# {name}\n{body}" if kind == "python" else body
    return files


def test_the_testing_page_prints_its_configuration_and_samples() -> None:
    files = docs_files()
    assert "pytest.ini" in files
    assert sum(name.startswith("test_") for name in files) >= 3


def test_the_testing_page_samples_run_as_printed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page's pytest.ini and test files, verbatim, in a project whose
    `mysite.settings` is this repository's test settings plus the quick start's
    URL, and whose `myapp` is the test app with the quick start's views."""
    files = docs_files()
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    for name, text in files.items():
        (pytester.path / name).write_text(text)
    mysite = pytester.mkpydir("mysite")
    (mysite / "settings.py").write_text(
        'from tests.settings import *  # noqa: F403\n\nROOT_URLCONF = "mysite.urls"\n'
    )
    (mysite / "urls.py").write_text(
        "from django.urls import path\n\nfrom myapp.views import items\n\n"
        'urlpatterns = [path("items/", items)]\n'
    )
    myapp = pytester.mkpydir("myapp")
    (myapp / "models.py").write_text("from tests.testapp.models import Item  # noqa: F401\n")
    (myapp / "views.py").write_text((ROOT / "docs/snippets/quickstart.py").read_text())

    result = run_inner(pytester)

    leaking = [name for name, text in files.items() if "# leaks" in text]
    assert len(leaking) == 1, "the page has one sample that leaks, marked '# leaks'"
    test_files = [name for name in files if name.startswith("test_")]
    result.assert_outcomes(passed=len(test_files), errors=1)
    shown = _OUTPUT_BLOCK.findall(DOCS.read_text())
    assert len(shown) == 1, "the page shows the leak report once"
    # What the page shows is what a run prints, the timing aside.
    printed = teardown_error(result, _leaking_test(files[leaking[0]])).splitlines()
    expected = shown[0].splitlines()
    timing = re.compile(r"\d+\.\d s")
    assert [timing.sub("_", line) for line in printed] == [
        timing.sub("_", line) for line in expected
    ]


def _leaking_test(source: str) -> str:
    names = re.findall(r"^(?:async )?def (test_\w+)", source, re.M)
    assert len(names) == 1, "the leaking sample holds one test"
    return str(names[0])
