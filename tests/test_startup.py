"""A server that loads the wrapper with a bad setting does not start, under any lifespan mode."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BAD_SETTINGS = """\
from tests.e2e_project.settings import *  # noqa: F403

ASYNC_DBBRIDGE = {"POOL_TIMEOUT": float("inf"), "IDLE_TIMEOUT": float("nan"), "LANES": 4}
"""

ASGI = """\
from async_dbbridge.asgi import get_asgi_application

application = get_asgi_application()
"""


@pytest.mark.parametrize("lifespan", ["off", "on"])
def test_a_bad_setting_stops_the_server_before_it_listens(tmp_path: Path, lifespan: str) -> None:
    (tmp_path / "bad_settings.py").write_text(BAD_SETTINGS)
    (tmp_path / "bad_asgi.py").write_text(ASGI)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    env["DJANGO_SETTINGS_MODULE"] = "bad_settings"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bad_asgi:application",
            "--lifespan",
            lifespan,
            "--port",
            "0",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # uvicorn could not load the application: it exits, never listening, never
    # answering 500 to every request.
    assert result.returncode != 0, result.stderr
    assert "Uvicorn running" not in result.stderr
    assert "ImproperlyConfigured" in result.stderr or "SettingsError" in result.stderr
    # Every problem, each by its key, in one start.
    assert "ASYNC_DBBRIDGE has 3 problems:" in result.stderr, result.stderr
    assert "- ASYNC_DBBRIDGE has no key 'LANES'" in result.stderr
    assert "- ASYNC_DBBRIDGE['IDLE_TIMEOUT'] is nan;" in result.stderr
    assert "- ASYNC_DBBRIDGE['POOL_TIMEOUT'] is inf; expected a finite number of seconds" in (
        result.stderr
    )


def test_the_startup_line_goes_to_stderr_when_no_handler_would_show_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from async_dbbridge import _startup

    # A logger outside the hierarchy: no handler of its own, no root to inherit one from,
    # as the library's logger is in a project that never configured logging.
    isolated = logging.Logger("async_dbbridge")
    monkeypatch.setattr(_startup, "logger", isolated)
    _startup.announce(logging.INFO, "async_dbbridge started (pid %d): %s", 42, "ok")
    assert capsys.readouterr().err == "async_dbbridge started (pid 42): ok\n"

    # Once a handler exists (LOGGING configured), the line is a log record, and only that.
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    isolated.addHandler(Collect())
    _startup.announce(logging.INFO, "async_dbbridge started (pid %d): %s", 42, "ok")
    assert capsys.readouterr().err == ""
    assert [r.getMessage() for r in records] == ["async_dbbridge started (pid 42): ok"]
