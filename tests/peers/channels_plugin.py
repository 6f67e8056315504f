"""pytest plugin: Channels' own test suite with the integration's drop-ins in place.

Loaded by ``scripts/peer_suites.sh`` into a run of the tests of the *installed*
Channels (``-p tests.peers.channels_plugin``), from its source tree at the same
version. Before any test module is imported, Channels' names become this
library's:

* ``channels.db.database_sync_to_async`` is
  ``async_dbbridge.integrations.channels.database_sync_to_async``, so every
  module imported afterwards binds it: the tests', and Channels' own
  ``channels.auth`` (``get_user``, ``login``, ``logout``) and
  ``channels.sessions`` (the session save);
* ``channels.consumer.SyncConsumer`` and ``channels.generic.websocket``'s
  ``SyncConsumer``, ``WebsocketConsumer`` and ``JsonWebsocketConsumer`` are
  the integration's consumers, so the tests' consumers subclass them.

The run fails (``peers: FAILED``) if a name was not substituted where the
tests used it, or if nothing ran on the bridge. Channels' settings
(``tests.sample_project.config.settings``, SQLite in a file) are used as they
are; the bridge runs on its defaults.

**One package name, two suites.** Channels' tests are the package ``tests``
(its settings module is ``tests.sample_project.config.settings``), and so are
this repository's, where this plugin lives. Channels' directory (from
``PEERS_CHANNELS_TESTS``) is put first in the already imported package's
search path: every ``tests.*`` module Channels names is found in its tree,
as upstream lays it out, and ``tests.peers`` is still found here.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Final

import pytest

import tests
from tests.peers import expectations

#: The names replaced, by module: (module, attribute, replacement's attribute).
SUBSTITUTIONS: Final = (
    ("channels.db", "database_sync_to_async", "database_sync_to_async"),
    ("channels.consumer", "SyncConsumer", "SyncConsumer"),
    ("channels.generic.websocket", "SyncConsumer", "SyncConsumer"),
    ("channels.generic.websocket", "WebsocketConsumer", "WebsocketConsumer"),
    ("channels.generic.websocket", "JsonWebsocketConsumer", "JsonWebsocketConsumer"),
)

#: Channels modules that bind ``database_sync_to_async`` when imported: they
#: must be imported after the substitution, or they keep Channels' own.
BINDS_AT_IMPORT: Final = ("channels.auth", "channels.sessions")


class _State:
    def __init__(self) -> None:
        self.run = ""
        self.expected: dict[str, expectations.Expected] = {}
        self.collected: set[str] = set()


_state = _State()


def _channels_tests_first() -> None:
    source = os.environ.get("PEERS_CHANNELS_TESTS", "")
    if not source or not os.path.isfile(os.path.join(source, "conftest.py")):
        raise RuntimeError(
            "PEERS_CHANNELS_TESTS must name the tests/ directory of Channels' source tree "
            f"(run through scripts/peer_suites.sh), not {source!r}"
        )
    search_path: Any = tests.__path__
    search_path.insert(0, os.path.abspath(source))


# At import (``-p`` imports the plugin before pytest loads any conftest): Channels'
# conftest is imported as ``tests.conftest``, before pytest_configure.
_channels_tests_first()


def _substitute() -> None:
    import importlib

    early = [name for name in BINDS_AT_IMPORT if name in sys.modules]
    if early:
        raise pytest.UsageError(
            f"{', '.join(early)} imported before the substitution: they would keep "
            "Channels' own database_sync_to_async"
        )
    from async_dbbridge.integrations import channels as integration

    for module, attribute, replacement in SUBSTITUTIONS:
        setattr(importlib.import_module(module), attribute, getattr(integration, replacement))


def _problems() -> list[str]:
    """What shows the run did not test what it claims."""
    from async_dbbridge.integrations import channels as integration

    problems = []
    for module, attribute, replacement in SUBSTITUTIONS:
        if getattr(sys.modules[module], attribute) is not getattr(integration, replacement):
            problems.append(f"{module}.{attribute} is not the integration's any more")
    for name in BINDS_AT_IMPORT:
        imported = sys.modules.get(name)
        if imported is not None and imported.database_sync_to_async is not (
            integration.database_sync_to_async
        ):
            problems.append(f"{name} kept Channels' own database_sync_to_async")
    if _bridge_calls() == 0:
        problems.append("no call ran on the bridge")
    if not _tests_consumers():
        problems.append("no consumer of the tests subclassed the integration's")
    return problems


def _tests_consumers() -> list[type[Any]]:
    """The consumer classes defined outside the integration on top of its SyncConsumer."""
    from async_dbbridge.integrations import channels as integration

    found: list[type[Any]] = []
    pending: list[type[Any]] = [integration.SyncConsumer]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__ != integration.__name__:
            found.append(cls)
    return found


def _bridge_calls() -> int:
    from async_dbbridge import _install

    bridge = _install._bridge
    return 0 if bridge is None else bridge.stats().calls


def pytest_configure(config: pytest.Config) -> None:
    _state.run = expectations.run_name()
    try:
        _state.expected = expectations.load(_state.run)
    except expectations.ExpectedFailuresError as exc:
        raise pytest.UsageError(str(exc)) from None
    _substitute()


def pytest_report_header(config: pytest.Config) -> list[str]:
    import channels

    import async_dbbridge

    return [
        f"peers: run {_state.run}",
        f"peers: channels {channels.__version__} from {os.path.dirname(channels.__file__)}",
        f"peers: async_dbbridge from {os.path.dirname(async_dbbridge.__file__)}",
        f"peers: Channels' tests from {tests.__path__[0]}",
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


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    from async_dbbridge.integrations import channels as integration

    terminalreporter.write_line(
        f"peers: {_bridge_calls()} calls ran on the bridge; {len(_tests_consumers())} of the "
        "tests' consumer classes subclass the integration's; "
        f"substituted: {', '.join(f'{m}.{a}' for m, a, _ in SUBSTITUTIONS)} "
        f"(from {integration.__name__})"
    )
    for problem in _problems():
        terminalreporter.write_line(f"peers: FAILED: {problem}", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.testscollected and _problems() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
