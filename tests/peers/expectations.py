"""The expected-failures list of the peers' suites (``expected_failures.txt``).

One entry a line, fields separated by whitespace::

    RUN-GLOB  TEST-ID  CATEGORY  REASON...

``RUN-GLOB`` is an ``fnmatch`` pattern over run names (``asgiref/executor/py3.11``,
``asgiref/db_sync_to_async/py3.13``, ``django-5.2/sqlite``, ``django-6.1/postgresql``...),
``TEST-ID`` a pytest node id (asgiref) or a unittest id (Django), ``CATEGORY``
one of `CATEGORIES`. ``#`` starts a comment.

An expected failure that passes fails the run (like ``xfail(strict=True)`` and
unittest's unexpected success), and so does an entry for a run that names a
test the run does not have: the list can only describe what really happens.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ("CATEGORIES", "Expected", "ExpectedFailuresError", "load", "stale_message")

LIST_FILE: Final = Path(__file__).with_name("expected_failures.txt")

#: Why a test may be listed. ``genuine``: the bridge differs from stock
#: asgiref/Django on purpose (the reason says which promise the test pins);
#: ``upstream``: the test fails the same way without the bridge.
CATEGORIES: Final = ("genuine", "upstream")


class ExpectedFailuresError(Exception):
    """The list is malformed, or names tests a run does not have."""


@dataclass(frozen=True)
class Expected:
    run_glob: str
    test_id: str
    category: str
    reason: str
    line: int

    def describe(self) -> str:
        return f"{self.category}: {self.reason}"


def _parse(path: Path) -> list[Expected]:
    entries: list[Expected] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split(None, 3)
        if len(fields) < 4:
            raise ExpectedFailuresError(
                f"{path}:{number}: expected 'RUN-GLOB TEST-ID CATEGORY REASON', got {raw!r}"
            )
        run_glob, test_id, category, reason = fields
        if category not in CATEGORIES:
            raise ExpectedFailuresError(
                f"{path}:{number}: the category must be one of {', '.join(CATEGORIES)}, "
                f"not {category!r}"
            )
        entries.append(Expected(run_glob, test_id, category, reason, number))
    return entries


def load(run: str, path: Path | None = None) -> dict[str, Expected]:
    """The entries that apply to ``run``, by test id.

    Raises:
        ExpectedFailuresError: A line is malformed, or two entries name the same
            test for this run.
    """
    path = LIST_FILE if path is None else path
    found: dict[str, Expected] = {}
    for entry in _parse(path):
        if not fnmatch.fnmatchcase(run, entry.run_glob):
            continue
        if entry.test_id in found:
            raise ExpectedFailuresError(
                f"{path}:{entry.line}: {entry.test_id} is already listed for run {run} "
                f"on line {found[entry.test_id].line}"
            )
        found[entry.test_id] = entry
    return found


def run_name() -> str:
    """This run's name, from ``PEERS_RUN`` (set by ``scripts/peer_suites.sh``)."""
    name = os.environ.get("PEERS_RUN", "")
    if not name:
        raise ExpectedFailuresError(
            "PEERS_RUN is not set: run the peers' suites through scripts/peer_suites.sh "
            "(make peers), or set PEERS_RUN to the run's name (e.g. asgiref/executor/py3.11)"
        )
    return name


def check_complete() -> bool:
    """Whether the run is the whole suite, so every listed test must exist in it.

    ``scripts/peer_suites.sh`` unsets ``PEERS_PARTIAL`` unless extra arguments
    narrow the run (then a listed test may simply not be selected).
    """
    return os.environ.get("PEERS_PARTIAL", "") != "1"


def stale_message(run: str, missing: list[Expected]) -> str:
    lines = "\n".join(f"  line {e.line}: {e.test_id}" for e in missing)
    return (
        f"{LIST_FILE.name} lists tests that run {run} does not have "
        f"(renamed or removed upstream? update the list):\n{lines}"
    )
