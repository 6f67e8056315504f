"""`manage.py dbbridge_status [--json] [--connect]`: the pools of the process it runs in."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import connections

from ..._lending import begin_job, end_job, end_thread
from ..._status import format_text, snapshot


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
            aliases = list(connections)
            begin_job(aliases)
            error: BaseException | None = None
            try:
                for alias in aliases:
                    connections[alias].ensure_connection()
            except BaseException as exc:
                error = exc
                raise
            finally:
                end_job(error, owner=self.handle, databases=aliases)
                end_thread(aliases)
        report = snapshot()
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self.stdout.write(format_text(report))
