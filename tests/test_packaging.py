"""The sdist and the wheel: what they hold, their metadata, and a wheel that works on its own.

Both are built the way a PEP 517 frontend (pip, ``python -m build``) builds them, through the
backend's hooks: the sdist from the checkout, and the wheel from the unpacked sdist, so a file the
sdist forgets breaks the wheel. The build requirements pyproject.toml names are part of the
``test`` extra, so the build runs in this environment (as ``--no-isolation`` does) and offline.

The wheel is then installed, without dependencies, into a second venv. Its dependencies (and
pytest and pytest-django) are not downloaded: the distributions this interpreter already has are
linked into that venv, one by one, following their requirements. So the run is offline, nothing
of the checkout or of the rest of this environment is importable there, and ``pip check``
proves the wheel's requirements hold. A pytest run in that venv then gets the plugin through
its ``pytest11`` entry point and runs the bridge on a real SQLite database.
"""

from __future__ import annotations

import configparser
import email.message
import email.parser
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import async_dbbridge

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# What the sdist takes from the checkout, besides the files every sdist has.
SDIST_ROOTS = ("async_dbbridge", "tests", "docs", "demo_asgi", "benchmarks")
SDIST_FILES = ("PKG-INFO", "pyproject.toml", "LICENSE", "README.md", "mkdocs.yml", ".gitignore")
# Build and tool leftovers that must never ship (the .gitignore entries, and SQLite's side files).
JUNK = re.compile(
    r"(^|/)(__pycache__|\.venv[^/]*|\.mypy_cache|\.ruff_cache|\.pytest_cache|htmlcov|site|build"
    r"|dist|[^/]*\.egg-info)(/|$)|\.py[cod]$|\.sqlite3(-[a-z]+)?$|(^|/)\.coverage|~$|\.(orig|rej)$"
)
# Seconds for one subprocess: less than the
# 120 s pytest-timeout of a whole test, so a hang fails with the command that hung.
STEP_TIMEOUT = 90
# The sdist's top directory; with ".dist-info", the wheel's metadata directory.
DIST_NAME = f"async_dbbridge-{async_dbbridge.__version__}"


def run(*args: str | Path, cwd: Path | None = None) -> str:
    """Run a command; its output is part of the failure message."""
    env = dict(os.environ)
    # Nothing from this test run may steer the child (a settings module, pytest options).
    for name in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE", "PYTEST_ADDOPTS", "PYTHONSTARTUP"):
        env.pop(name, None)
    proc = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc.stdout


def make_venv(path: Path) -> Path:
    """A venv without pip (fast to create); this interpreter's pip installs into it."""
    run(sys.executable, "-m", "venv", "--without-pip", path)
    return path / "bin" / "python"


def pip(python: Path, *args: str | Path) -> str:
    return run(sys.executable, "-m", "pip", "--python", python, *args)


def site_packages(python: Path) -> Path:
    return Path(
        run(python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    )


def check_build_requirements() -> None:
    """Every build-system requirement is installed here: the build runs offline."""
    for spec in PYPROJECT["build-system"]["requires"]:
        req = Requirement(spec)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"build requirement {spec!r} is not installed: add it to the test extra")
        if not req.specifier.contains(version, prereleases=True):
            pytest.fail(f"build requirement {spec!r} not met by the installed {version}")


def build(kind: str, source: Path, out: Path) -> Path:
    """One PEP 517 build (kind "sdist" or "wheel") of `source`, as a frontend runs it."""
    backend = PYPROJECT["build-system"]["build-backend"]
    call = "import importlib, json, sys; b = importlib.import_module(sys.argv[1]); "
    # -I (here and below): the child sees neither PYTHON* variables nor its working directory.
    requires = json.loads(
        run(
            sys.executable,
            "-I",
            "-c",
            call + f"print(json.dumps(b.get_requires_for_build_{kind}()))",
            backend,
            cwd=source,
        )
    )
    for spec in requires:
        try:
            importlib.metadata.version(Requirement(spec).name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"the backend asks for {spec!r} to build the {kind}: not installed")
    printed = run(
        sys.executable,
        "-I",
        "-c",
        call + f"print(b.build_{kind}(sys.argv[2]))",
        backend,
        out,
        cwd=source,
    )
    return out / printed.strip().splitlines()[-1]


@dataclass(frozen=True)
class Artifacts:
    sdist: Path
    wheel: Path
    sdist_names: list[str]  # relative to the sdist's top directory
    wheel_names: list[str]
    pkg_info: email.message.Message
    metadata: email.message.Message


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    tmp = tmp_path_factory.mktemp("packaging")
    check_build_requirements()
    out = tmp / "dist"
    sdist = build("sdist", ROOT, out)
    with tarfile.open(sdist) as tar:
        top = f"{DIST_NAME}/"
        members = tar.getnames()
        assert all(name.startswith(top) for name in members), members
        tar.extractall(tmp / "unpacked", filter="data")
    wheel = build("wheel", tmp / "unpacked" / top, out)
    with zipfile.ZipFile(wheel) as zf:
        wheel_names = zf.namelist()
        metadata = zf.read(f"{DIST_NAME}.dist-info/METADATA")
    # Core metadata is UTF-8 text in email header format (what importlib.metadata reads).
    parser = email.parser.Parser()
    return Artifacts(
        sdist=sdist,
        wheel=wheel,
        sdist_names=[name.removeprefix(top) for name in members if name != top.rstrip("/")],
        wheel_names=wheel_names,
        pkg_info=parser.parsestr((tmp / "unpacked" / top / "PKG-INFO").read_text("utf-8")),
        metadata=parser.parsestr(metadata.decode("utf-8")),
    )


def source_files(*roots: str) -> set[str]:
    """The checkout's files under `roots`, leftovers excluded."""
    return {
        path.relative_to(ROOT).as_posix()
        for root in roots
        for path in (ROOT / root).rglob("*")
        if path.is_file() and not JUNK.search(path.relative_to(ROOT).as_posix())
    }


def test_sdist_holds_the_source_and_no_leftovers(artifacts: Artifacts) -> None:
    names = set(artifacts.sdist_names)
    assert {name.split("/")[0] for name in names} == {*SDIST_ROOTS, *SDIST_FILES}
    assert [name for name in names if JUNK.search(name)] == []
    # All the test suite and the docs build need: the tests drive demo_asgi and benchmarks.
    missing = source_files(*SDIST_ROOTS) - names
    assert not missing, f"not in the sdist: {sorted(missing)}"
    with tarfile.open(artifacts.sdist) as tar:
        member = tar.extractfile(f"{DIST_NAME}/LICENSE")
        assert member is not None
        assert member.read() == (ROOT / "LICENSE").read_bytes()


def test_wheel_holds_the_package_and_nothing_else(artifacts: Artifacts) -> None:
    package = source_files("async_dbbridge")
    assert "async_dbbridge/py.typed" in package
    dist_info = f"{DIST_NAME}.dist-info"
    assert sorted(artifacts.wheel_names) == sorted(
        package
        | {
            f"{dist_info}/{name}"
            for name in ("METADATA", "WHEEL", "RECORD", "entry_points.txt", "licenses/LICENSE")
        }
    )
    with zipfile.ZipFile(artifacts.wheel) as zf:
        assert zf.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(f"{dist_info}/entry_points.txt").decode())
    assert dict(entry_points["pytest11"]) == {"async_dbbridge": "async_dbbridge.testing"}


def test_license_file_is_bsd_3_clause() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License\n")
    assert "Copyright (c) 2026, async_dbbridge developers" in text


@pytest.mark.parametrize("which", ["wheel", "sdist"])
def test_metadata(artifacts: Artifacts, which: str) -> None:
    meta = artifacts.metadata if which == "wheel" else artifacts.pkg_info
    assert meta["Name"] == "async-dbbridge"
    assert meta["Version"] == async_dbbridge.__version__
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Requires-Python"] == PROJECT["requires-python"]
    assert meta.get_all("Classifier") == PROJECT["classifiers"]
    assert sorted(meta.get_all("Requires-Dist") or []) == sorted(
        artifacts.metadata.get_all("Requires-Dist") or []
    )
    assert meta["Description-Content-Type"] == "text/markdown"


def test_classifiers_match_requires_python() -> None:
    requires_python = SpecifierSet(PROJECT["requires-python"])
    pythons = sorted(
        int(match.group(1))
        for c in PROJECT["classifiers"]
        if (match := re.fullmatch(r"Programming Language :: Python :: 3\.(\d+)", c))
    )
    assert pythons, "no Python version classifiers"
    # Every listed version is allowed, and the oldest allowed one is listed.
    assert all(f"3.{minor}.0" in requires_python for minor in pythons), pythons
    assert f"3.{pythons[0] - 1}.99" not in requires_python, (pythons, requires_python)
    assert any(c.startswith("Development Status :: ") for c in PROJECT["classifiers"])


def test_long_description_is_the_readme_and_the_newest_changelog_entry(
    artifacts: Artifacts,
) -> None:
    description = artifacts.metadata.get_payload()
    assert isinstance(description, str)
    assert description.startswith((ROOT / "README.md").read_text().rstrip("\n"))
    changelog = (ROOT / "docs" / "changelog.md").read_text()
    # The body of the first "## " entry: its "###" sections, up to the next entry.
    newest = re.search(r"^## [^\n]+\n+(.+?)\s*(?=^## |\Z)", changelog, re.MULTILINE | re.DOTALL)
    assert newest is not None
    assert newest.group(1).startswith("### ")
    assert newest.group(1) in description


# -- the wheel installed on its own --------------------------------------------------------

WHEEL_SETTINGS = """\
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECRET_KEY = "wheel-check"
USE_TZ = True
INSTALLED_APPS = ["async_dbbridge"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(HERE / "db.sqlite3"),
        "TEST": {"NAME": str(HERE / "test.sqlite3")},
    }
}
"""

WHEEL_TEST = """\
import importlib
import importlib.metadata
import sys
from pathlib import Path

import pytest
from django.db import connection

import async_dbbridge
import async_dbbridge.testing


def test_the_package_is_the_installed_wheel():
    dist = importlib.metadata.distribution("async-dbbridge")
    site = Path(dist.locate_file(""))
    assert Path(sys.prefix) in site.parents
    assert Path(async_dbbridge.__file__).parent == site / "async_dbbridge"
    assert dist.version == async_dbbridge.__version__
    modules = [
        str(f.with_suffix("")).replace("/", ".").removesuffix(".__init__")
        for f in dist.files
        if f.suffix == ".py"
    ]
    assert "async_dbbridge.asgi" in modules
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # An integration needs its framework, an optional extra not installed here.
            missing = exc.name or ""
            if not name.startswith("async_dbbridge.integrations.") or missing.startswith(
                "async_dbbridge"
            ):
                raise


def test_the_plugin_comes_from_the_entry_point(pytestconfig):
    (ep,) = importlib.metadata.entry_points(group="pytest11", name="async_dbbridge")
    assert ep.value == "async_dbbridge.testing"
    assert ep.dist.name == "async-dbbridge"
    assert pytestconfig.pluginmanager.get_plugin("async_dbbridge") is async_dbbridge.testing


@pytest.mark.django_db(transaction=True)
def test_a_call_on_the_bridge_leaves_no_connection(dbbridge_no_leaks):
    def connect():
        connection.ensure_connection()
        return async_dbbridge.testing.server_session_count()

    with async_dbbridge.DBExecutor(max_workers=1, policy="close") as executor:
        assert executor.submit(connect).result() >= 1
    dbbridge_no_leaks()
"""


def dependency_closure(requirements: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """This environment's distributions that `requirements` need, transitively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [(Requirement(text), "") for text in requirements]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name not in found:
            dist = found[name] = importlib.metadata.distribution(name)
            for wanted in ("", *requirement.extras):
                todo.extend((Requirement(text), wanted) for text in dist.requires or [])
    return found


def link_distributions(dists: dict[str, importlib.metadata.Distribution], target: Path) -> None:
    """Make each distribution importable from `target` by linking its top-level entries."""
    for dist in dists.values():
        assert dist.files is not None, f"{dist.metadata['Name']} has no RECORD"
        tops = {PurePosixPath(f).parts[0] for f in dist.files}
        for top in sorted(tops - {"..", "__pycache__"}):
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (target / top).exists():
                (target / top).symlink_to(source)


def test_the_wheel_works_installed_on_its_own(artifacts: Artifacts, tmp_path: Path) -> None:
    python = make_venv(tmp_path / "venv")
    pip(python, "install", "--quiet", "--no-index", "--no-deps", artifacts.wheel)
    needed = [*(artifacts.metadata.get_all("Requires-Dist") or []), "pytest", "pytest-django"]
    link_distributions(dependency_closure(needed), site_packages(python))
    pip(python, "check")

    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text(
        "[pytest]\n"
        "pythonpath = .\n"
        "DJANGO_SETTINGS_MODULE = wheel_settings\n"
        "addopts = -p no:cacheprovider --strict-markers\n"
        "filterwarnings = error\n"
    )
    (project / "wheel_settings.py").write_text(WHEEL_SETTINGS)
    (project / "test_wheel.py").write_text(WHEEL_TEST)
    # -I: no user site either; the ini's pythonpath makes wheel_settings importable.
    output = run(python, "-I", "-m", "pytest", "-q", cwd=project)
    assert "3 passed" in output, output
