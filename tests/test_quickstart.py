"""README.md's install and quick start, followed as printed, in fresh venvs, served by uvicorn.

What a new user does on a clean machine: the `console` blocks of the README's "Install" and
"Quick start" sections run line by line (a `cd` moves to the next directory), the quick
start's files are written from the README's `python` blocks (each names its file on its first
line; the settings block is appended to what `startproject` wrote), `manage.py check` must
report nothing, and `uvicorn mysite.asgi:application` serves every view of the snippet.

Three departures, each the least a test on a shared machine needs:

* `git clone <url>` becomes a link to this checkout (the clone the README's next line installs
  from), so the code under test is the code in front of us.
* pip reads wheels from the venv's `wheelhouse` (scripts/bootstrap.sh downloads the versions this
  venv has) instead of an index, through its own environment variables (`PIP_NO_INDEX`,
  `PIP_FIND_LINKS`): the commands are the README's, the run is offline.
* The database is named for this run instead of `quickstart` (other runs share the server), and
  uvicorn listens on a free port.

The wheel route follows in the same venv, the clone's install removed: build the wheel as
printed, install it with the extra as printed, and the same project passes `check` with it.
PostgreSQL runs only (the quick start's
database), in the Django 5.2 series of the matrix (`slow`: about 40 s on a busy machine).
"""

from __future__ import annotations

import ensurepip
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
STEP_TIMEOUT = 120
README_DATABASE = "quickstart"
POOL_SIZE = 8  # the README's ASYNC_DBBRIDGE

# A fresh venv per route costs tens of seconds: one matrix run (Django 5.2, PostgreSQL).
pytestmark = [pytest.mark.vendor("postgresql"), pytest.mark.slow]


def section(heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match is not None, f"README.md has no '## {heading}' section"
    return match.group(1)


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def server_params() -> dict[str, str]:
    return {
        "host": os.environ.get("PGHOST", "127.0.0.1"),
        "port": os.environ.get("PGPORT", "5432"),
        "user": os.environ.get("PGUSER", "postgres"),
    }


def admin_connection() -> psycopg.Connection[tuple[object, ...]]:
    params = server_params()
    conninfo = psycopg.conninfo.make_conninfo(dbname="postgres", **params)
    return psycopg.connect(conninfo, autocommit=True)


def sessions_on(database: str) -> int:
    with admin_connection() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [database]
        ).fetchone()
    assert row is not None
    count = row[0]
    assert isinstance(count, int)
    return count


class Shell:
    """Runs README lines in one venv, as a shell with that venv activated would."""

    def __init__(self, venv: Path, cwd: Path, substitutions: dict[str, str]) -> None:
        self.venv = venv
        self.cwd = cwd
        self.substitutions = substitutions
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"PYTHONPATH", "DJANGO_SETTINGS_MODULE", "VIRTUAL_ENV", "PYTEST_ADDOPTS"}
            and not k.startswith("PIP_")
        }
        self.env.update(
            VIRTUAL_ENV=str(venv),
            PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
            # No pip configuration of this machine: only the wheelhouse, no index.
            PIP_CONFIG_FILE=os.devnull,
            PIP_NO_INDEX="1",
            PIP_FIND_LINKS=str(WHEELHOUSE),
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            # No .pyc for the thousands of Django modules: seconds of CPU per venv.
            PIP_NO_COMPILE="1",
            PGHOST=server_params()["host"],
            PGPORT=server_params()["port"],
        )

    def run(self, line: str) -> str:
        for old, new in self.substitutions.items():
            line = line.replace(old, new)
        words = shlex.split(line)
        if words[0] == "cd":
            self.cwd = self.cwd / words[1]
            return ""
        t0 = time.monotonic()
        proc = subprocess.run(
            line,
            shell=True,
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
            check=False,
        )
        print(f"{time.monotonic() - t0:6.2f}s {line}")
        assert proc.returncode == 0, (
            f"{line!r} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
            f"--- stderr\n{proc.stderr}"
        )
        return proc.stdout + proc.stderr


def make_venv(path: Path) -> Path:
    """A venv with pip, as `python -m venv` makes it, without compiling pip's modules.

    `ensurepip` byte-compiles all of pip (tens of seconds on a busy machine); its own bundled
    wheel, installed with `--no-compile`, gives the same pip.
    """
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", path], check=True, timeout=STEP_TIMEOUT
    )
    bundled = Path(ensurepip.__file__).parent / "_bundled"
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", path / "bin" / "python"]
    pip.append("install")
    subprocess.run(
        [*pip, "--quiet", "--no-compile", "--no-index", "--find-links", bundled, "pip"],
        check=True,
        timeout=STEP_TIMEOUT,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
    )
    print(f"{time.monotonic() - t0:6.2f}s python -m venv")
    return path


@pytest.fixture
def database() -> Iterator[str]:
    name = f"dbbridge_quickstart_{os.getpid()}"
    yield name
    with admin_connection() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_quick_start_files(project: Path, database: str) -> None:
    """Each python block of the quick start, into the file its first line names."""
    for block in blocks(section("Quick start"), "python"):
        first = block.splitlines()[0]
        match = re.match(r"# (\S+\.py)\b", first)
        assert match is not None, f"a quick start block that names no file: {first!r}"
        path = project / match.group(1)
        if path.name == "settings.py":
            assert f'"NAME": "{README_DATABASE}"' in block
            with path.open("a") as settings:
                settings.write("\n" + block.replace(README_DATABASE, database))
        else:
            path.write_text(block)


class Server:
    """`uvicorn mysite.asgi:application` as printed, on a free port; stderr read as it comes."""

    def __init__(self, shell: Shell, line: str) -> None:
        assert line == "uvicorn mysite.asgi:application", line
        self.proc = subprocess.Popen(
            [*shlex.split(line), "--port", "0"],
            cwd=shell.cwd,
            env=shell.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert self.proc.stderr is not None
        stderr = self.proc.stderr

        def read() -> None:
            for line in stderr:
                self.lines.put(line)

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.seen:
                if match := re.search(pattern, line):
                    return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                pytest.fail(f"no {pattern!r} on uvicorn's stderr:\n{''.join(self.seen)}")
            try:
                self.seen.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                continue

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(timeout=10)
            assert self.proc.stderr is not None
            self.proc.stderr.close()
            while not self.lines.empty():
                self.seen.append(self.lines.get())


def test_the_readme_install_and_quick_start_work_as_printed(tmp_path: Path, database: str) -> None:
    if not WHEELHOUSE.is_dir():
        pytest.fail(f"no {WHEELHOUSE}: run scripts/bootstrap.sh, which downloads it")
    install_from_clone, install_from_wheel = blocks(section("Install"), "console")
    clone, *from_clone = commands(install_from_clone)
    assert re.fullmatch(r"git clone https://\S+/async-dbbridge\.git", clone), clone
    # The clone: this checkout, under the name `git clone` gives it.
    (tmp_path / "async-dbbridge").symlink_to(ROOT)
    setup, serve = (commands(b) for b in blocks(section("Quick start"), "console"))
    substitutions = {f" {README_DATABASE}": f" {database}"}

    # -- from the clone: install, build the project, check, serve ---------------------------
    shell = Shell(make_venv(tmp_path / "venv"), tmp_path, substitutions)
    for line in from_clone:
        shell.run(line)
    for line in setup:
        shell.run(line)
    project = shell.cwd
    write_quick_start_files(project, database)
    *steps, uvicorn = serve
    for line in steps:
        output = shell.run(line)
    # The last step, `check`: nothing from the library, nothing at all.
    assert output.strip() == "System check identified no issues (0 silenced).", output

    server = Server(shell, uvicorn)
    try:
        port = server.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+)").group(1)
        # The startup line, on stderr, though the project configures no logging.
        started = server.wait_for(r"^async_dbbridge started \(pid \d+\): (.*)$").group(1)
        assert started.startswith("requests on request threads (HOLD='transaction'); ")
        assert f"(POOL_SIZE={POOL_SIZE} for 'default', POOL_TIMEOUT=5s)" in started
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/items/").json() == {"items": []}
            assert client.get("/items/count/").json() == {"count": 0}
            # Many clients at once: the server sees no more than the pool.
            with ThreadPoolExecutor(max_workers=24) as pool:
                replies = list(pool.map(lambda _: client.get("/items/count/"), range(96)))
        assert {reply.status_code for reply in replies} == {200}
        assert 1 <= sessions_on(database) <= POOL_SIZE
    finally:
        code = server.stop()
    assert code == 0, "".join(server.seen)
    # Shutdown closed every connection before uvicorn exited.
    assert sessions_on(database) == 0
    assert sum("async_dbbridge started" in line for line in server.seen) == 1

    # -- from a wheel: build it, install it with the extra, the project checks -------------
    # In the same venv, the clone's install removed first: the wheel route is the README's two
    # commands, and its dependencies are the same (a venv of its own would add half a minute of
    # installing Django again; tests/test_packaging.py installs the wheel on its own).
    shell.cwd = tmp_path
    shell.run("python -m pip uninstall --yes async-dbbridge")
    for line in commands(install_from_wheel):
        output = shell.run(line)
    assert "Successfully installed async-dbbridge-" in output, output
    assert list((tmp_path / "dist").glob("async_dbbridge-*-py3-none-any.whl"))
    shell.cwd = project
    where = shell.run("python -c 'import async_dbbridge; print(async_dbbridge.__file__)'")
    assert f"{tmp_path / 'venv'}/lib/" in where, where
    output = shell.run("python manage.py check")
    assert output.strip() == "System check identified no issues (0 silenced).", output
