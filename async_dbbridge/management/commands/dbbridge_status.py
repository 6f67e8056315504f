"""`manage.py dbbridge_status [--json] [--connect]`: the pools of the process it runs in."""

from __future__ import annotations

import json
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import connections

from ..._lending import begin_job, end_job, end_thread
from ..._status import format_text, snapshot


def _connect_once(aliases: list[str]) -> None:
    """Check one pooled connection out and back in per alias, on a thread of its own.

    Not on the calling thread: lending it pooled connections would change its
    wrappers for good (a test runner's, a shell's).
    """
    errors: list[BaseException] = []

    def connect() -> None:
        begin_job(aliases)
        error: BaseException | None = None
        try:
            for alias in aliases:
                connections[alias].ensure_connection()
        except BaseException as exc:
            error = exc
            errors.append(exc)
        finally:
            end_job(error, owner=connect, databases=aliases)
            end_thread(aliases)

    thread = threading.Thread(target=connect, name="dbbridge_status-connect")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


class Command(BaseCommand):
    help = (
        "Show async_dbbridge's connection pools, waiting threads and every pooled "
        "connection of this process (a live server's: mount async_dbbridge.views.status)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument(
            "--connect",
            action="store_true",
            help="first check one pooled connection out and back in per alias (a smoke "
            "test of the settings and the server: the report then shows a live pool)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["connect"]:
            _connect_once(list(connections))
        report = snapshot()
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self.stdout.write(format_text(report))
