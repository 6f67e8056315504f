"""`manage.py dbbridge_status` and the status view, on a known pool state."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connections
from django.test import RequestFactory

from async_dbbridge.views import status, status_view
from tests.conftest import SetSetting
from tests.metrics_workload import ALIAS, HeldPool

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

ROOT = Path(__file__).resolve().parents[1]
#: The command's output that docs/metrics.md shows: written by this test with
#: DBBRIDGE_WRITE_DOCS=1, compared with what the command prints otherwise.
SNIPPET = ROOT / "docs" / "snippets" / "dbbridge_status.txt"


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("dbbridge_status", *args, stdout=out)
    return out.getvalue()


def test_json_report_names_every_connection_and_its_holder(settings: Any) -> None:
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, "POOL_SIZE": 2, "MAX_WAITING": 1}
    with HeldPool(used=2, pending=1, rejected=1):
        report = json.loads(run("--json"))
        text = run()
    pool = report["pools"][ALIAS]
    assert (pool["max_size"], pool["in_use"], pool["idle"], pool["waiting"]) == (2, 2, 0, 1)
    assert pool["rejected"] == 1
    assert [c["state"] for c in pool["connections"]] == ["used", "used"]
    assert {c["owner_thread"] for c in pool["connections"]} == {"held"}
    assert all(c["age"] >= 0 and c["idle_for"] is None for c in pool["connections"])
    assert report["pid"] == os.getpid()
    assert f"pool {ALIAS!r}: 2 used + 0 idle of 2, 1 waiting (at most 1)" in text
    assert text.count("thread held") == 2
    # No credentials, whatever the backend.
    password = str(connections[ALIAS].settings_dict.get("PASSWORD") or "no-password-set")
    assert password not in text
    assert str(connections[ALIAS].settings_dict.get("USER") or "no-user-set") not in text


def _normalised(text: str) -> str:
    text = re.sub(r"process \d+ at \S+", "process <pid> at <time>", text)
    return re.sub(r"\b\d+s\b", "<n>s", text)


def test_the_output_the_docs_show(db_settings: SetSetting) -> None:
    db_settings(CONN_MAX_AGE=60)
    output = run("--connect")
    if os.environ.get("DBBRIDGE_WRITE_DOCS") == "1":
        SNIPPET.write_text(output)
    assert _normalised(output) == _normalised(SNIPPET.read_text())
    assert "pool 'default': 0 used + 1 idle of 8" in output
    connections.close_all()


def test_the_view_is_staff_only_by_default(settings: Any) -> None:
    factory = RequestFactory()
    anonymous = factory.get("/-/dbbridge/")
    # A stand-in for request.user as AuthenticationMiddleware sets it (no auth app here).
    setattr(anonymous, "user", SimpleNamespace(is_active=True, is_staff=False))  # noqa: B010
    assert status(anonymous).status_code == 403
    staff = factory.get("/-/dbbridge/")
    setattr(staff, "user", SimpleNamespace(is_active=True, is_staff=True))  # noqa: B010
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, "POOL_SIZE": 1}
    with HeldPool(used=1, pending=0, rejected=0):
        response = status(staff)
    assert response.status_code == 200
    assert response["Cache-Control"].startswith("max-age=0")
    body = json.loads(response.content)
    assert body["pools"][ALIAS]["connections"][0]["owner_thread"] == "held"
    assert status(factory.post("/-/dbbridge/")).status_code == 405
    token = status_view(allow=lambda request: request.headers.get("X-Token") == "s3cret")
    assert token(factory.get("/", HTTP_X_TOKEN="s3cret")).status_code == 200
    assert token(factory.get("/", HTTP_X_TOKEN="nope")).status_code == 403
