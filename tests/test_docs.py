"""The documentation is true as printed: README.md, docs/*.md and the API reference.

Every ```python block there is one of four kinds, told apart by its first line,
which readers see as well:

* `# settings.py` — a fragment of a settings module. It is executed alone;
  `ASYNC_DBBRIDGE` must pass `async_dbbridge.conf.parse_settings()` and every
  other name must be a Django setting (`LOGGING` is applied with `dictConfig`).
* `# myapp/models.py` — the model the samples import. Each field is evaluated
  as printed and must equal the field of `tests.testapp`'s `Item`, which then
  stands in for `myapp.models` (the one thing a runnable sample may import that
  the reader writes: the quick start shows it, the other pages link to it).
* `# Not runnable: <reason>` — an illustration, such as the "these two lines are
  equivalent" pairs of the docstrings. It is compiled (top-level `await` allowed).
* anything else runs as printed, in this test project, against the database.

docs/testing.md's samples are pytest test modules: here they are compiled and
kept test modules; tests/test_testing_plugin.py runs them exactly as printed, in
a pytest session of their own, with the page's pytest.ini.

The settings page is checked against the code: every key `conf` accepts, with
its default as `parse_settings()` computes it, every system check ID defined in
`checks.py`, every level the `async_dbbridge` logger is called with. And no
docstring or page may carry reStructuredText markup, which the Markdown site
would print raw (scripts/check_docs_markup.py, also run by `make docs`).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import logging
import logging.config
import os
import pkgutil
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import global_settings
from django.db import models
from django.test import RequestFactory

import async_dbbridge
from async_dbbridge import DBExecutor, conf
from tests.testapp import models as testapp_models
from tests.testapp.models import Item

ROOT = Path(__file__).resolve().parent.parent
# docs/integrations/ too: one page per framework.
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Its samples are pytest test modules (see the module docstring).
PYTEST_PAGES = frozenset({"testing.md"})

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SNIPPET = re.compile(r'^--8<-- "(.+)"$', re.MULTILINE)
_NOT_RUNNABLE = re.compile(r"# Not runnable: \S")


def _load_markup_checker() -> types.ModuleType:
    path = ROOT / "scripts" / "check_docs_markup.py"
    spec = importlib.util.spec_from_file_location("check_docs_markup", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


markup = _load_markup_checker()


# -- collecting the samples ---------------------------------------------------


def expand_snippets(text: str) -> str:
    return _SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text().rstrip("\n"), text)


def python_blocks(text: str) -> list[str]:
    return [expand_snippets(block).rstrip("\n") for block in _BLOCK.findall(text)]


def section(text: str, heading: str) -> str:
    """The text under a `## heading`, up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match is not None, f"no '## {heading}' section"
    return match.group(1)


def public_modules() -> list[types.ModuleType]:
    # Subpackages too (async_dbbridge.integrations.<framework>).
    names = [
        info.name
        for info in pkgutil.walk_packages(async_dbbridge.__path__, "async_dbbridge.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    return [async_dbbridge, *(importlib.import_module(name) for name in sorted(names))]


def public_docstrings() -> list[tuple[str, str]]:
    """(name, docstring) of every public module, object and public member."""
    found: list[tuple[str, str]] = []
    seen: set[int] = set()

    def add(name: str, obj: object) -> None:
        if isinstance(obj, classmethod | staticmethod):
            obj = obj.__func__
        if id(obj) in seen or isinstance(obj, str | int | float | tuple | dict | frozenset):
            return
        seen.add(id(obj))
        doc = obj.__doc__ if isinstance(obj, property) else inspect.getdoc(obj)
        if doc:
            found.append((name, inspect.cleandoc(doc)))
        if inspect.isclass(obj) and obj.__module__.startswith("async_dbbridge"):
            for attr, value in vars(obj).items():
                if not attr.startswith("_") or attr in ("__init__", "__call__"):
                    add(f"{name}.{attr}", value)

    for module in public_modules():
        add(module.__name__, module)
        for attr in getattr(module, "__all__", ()):
            add(f"{module.__name__}.{attr}", getattr(module, attr))
    return found


def docstring_blocks() -> list[tuple[str, str, str]]:
    """(object, id, block) of every sample in a public docstring."""
    return [
        (name, f"{name}-{i}", block.rstrip("\n"))
        for name, doc in public_docstrings()
        for i, block in enumerate(_BLOCK.findall(doc))
    ]


def all_samples() -> list[tuple[str, str, str]]:
    """(page or object, id, block) of every sample the docs show."""
    samples = [
        (path.name, f"{path.name}-{i}", block)
        for path in DOC_FILES
        for i, block in enumerate(python_blocks(path.read_text()))
    ]
    samples += docstring_blocks()
    return samples


def kind(block: str) -> str:
    first = block.split("\n", 1)[0]
    if first.startswith(("# settings.py", "# mysite/settings.py")):
        return "settings"
    if first.startswith("# myapp/models.py"):
        return "model"
    if first.startswith("# Not runnable"):
        assert _NOT_RUNNABLE.match(first), f"say why it is not runnable: {first!r}"
        return "not runnable"
    return "run"


SAMPLES = all_samples()


def samples_of(wanted: str) -> list[Any]:
    return [
        pytest.param(block, id=sample_id)
        for where, sample_id, block in SAMPLES
        if kind(block) == wanted and where not in PYTEST_PAGES
    ]


# -- the samples --------------------------------------------------------------


def test_there_are_samples_of_every_kind() -> None:
    kinds = [kind(block) for _, _, block in SAMPLES]
    assert kinds.count("run") >= 8
    assert {"settings", "model", "not runnable"} <= set(kinds)


@pytest.mark.parametrize(
    "block", [pytest.param(block, id=sample_id) for _, sample_id, block in SAMPLES]
)
def test_every_sample_compiles(block: str) -> None:
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if kind(block) == "not runnable" else 0
    compile(block, "<docs sample>", "exec", flags=flags)


def run_block(block: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "docs_sample"}
    exec(compile(block, "<docs sample>", "exec"), namespace)
    # Cleanup the reader would do when done; the sample itself ran as printed.
    for value in namespace.values():
        if isinstance(value, DBExecutor):
            value.shutdown()
    return namespace


@pytest.fixture
def myapp() -> Iterator[None]:
    """`myapp.models` is tests.testapp's models (test_the_printed_model_... checks it)."""
    package = types.ModuleType("myapp")
    package.models = testapp_models  # type: ignore[attr-defined]
    sys.modules["myapp"] = package
    sys.modules["myapp.models"] = testapp_models
    # The quick start's views, for its urls.py.
    views = types.ModuleType("myapp.views")
    exec(compile(QUICKSTART_VIEWS.read_text(), str(QUICKSTART_VIEWS), "exec"), views.__dict__)
    package.views = views  # type: ignore[attr-defined]
    sys.modules["myapp.views"] = views
    yield
    del sys.modules["myapp"], sys.modules["myapp.models"], sys.modules["myapp.views"]


QUICKSTART_VIEWS = ROOT / "docs/snippets/quickstart.py"


@pytest.mark.usefixtures("myapp")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("block", samples_of("run"))
def test_runnable_samples_run_as_printed(block: str) -> None:
    run_block(block)


@contextlib.contextmanager
def restored_logging() -> Iterator[None]:
    """Undo what `dictConfig()` does to the loggers, so other tests see none of it."""
    manager = logging.Logger.manager
    saved = {
        name: (logger.handlers[:], logger.level, logger.propagate, logger.disabled)
        for name, logger in [("", logging.getLogger()), *manager.loggerDict.items()]
        if isinstance(logger, logging.Logger)
    }
    try:
        yield
    finally:
        _restore(manager, saved)


def _restore(manager: logging.Manager, saved: dict[str, Any]) -> None:
    for name, logger in [("", logging.getLogger()), *manager.loggerDict.items()]:
        if not isinstance(logger, logging.Logger):
            continue
        for handler in logger.handlers:
            if handler not in saved.get(name, ([],))[0]:
                handler.close()
        handlers, level, propagate, disabled = saved.get(name, ([], logging.NOTSET, True, False))
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled


#: What `django-admin startproject` writes that a settings fragment may extend
#: (`INSTALLED_APPS += [...]`): the quick start's is added to that file.
STARTPROJECT_SETTINGS: dict[str, Any] = {
    "INSTALLED_APPS": [
        "django.contrib.admin",
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
        "django.contrib.staticfiles",
    ],
}


def _assigned_names(block: str) -> list[str]:
    tree = ast.parse(block)
    names: list[str] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names += [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]
    return names


@pytest.mark.parametrize("block", samples_of("settings"))
def test_settings_samples_are_valid_settings(block: str) -> None:
    namespace: dict[str, Any] = {k: list(v) for k, v in STARTPROJECT_SETTINGS.items()}
    exec(compile(block, "<settings.py sample>", "exec"), namespace)
    names = _assigned_names(block)
    assert names, "a settings.py sample that sets nothing"
    for name in names:
        value = namespace[name]
        if name == conf.SETTING_NAME:
            conf.parse_settings(value)  # raises ImproperlyConfigured, naming the key
        else:
            assert hasattr(global_settings, name), f"{name} is not a Django setting"
        if name == "INSTALLED_APPS":
            assert "async_dbbridge" in value
        if name == "LOGGING":
            assert "async_dbbridge" in value["loggers"]
            with restored_logging():
                logging.config.dictConfig(value)


def _model_fields(block: str) -> dict[str, tuple[Any, ...]]:
    """The printed model's fields, each evaluated as printed: name -> deconstruct()."""
    tree = ast.parse(block)
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert [ast.unparse(node) for node in imports] == ["from django.db import models"]
    (model,) = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    assert model.name == "Item"
    assert [ast.unparse(base) for base in model.bases] == ["models.Model"]
    fields: dict[str, tuple[Any, ...]] = {}
    for statement in model.body:
        assert isinstance(statement, ast.Assign), f"unexpected: {ast.unparse(statement)}"
        (target,) = statement.targets
        assert isinstance(target, ast.Name)
        expression = compile(ast.Expression(statement.value), "<myapp/models.py>", "eval")
        field = eval(expression, {"models": models})
        fields[target.id] = field.deconstruct()[1:]
    return fields


@pytest.mark.parametrize("block", samples_of("model"))
def test_the_printed_model_is_the_model_the_samples_run_against(block: str) -> None:
    expected = {
        field.name: field.deconstruct()[1:]
        for field in Item._meta.get_fields()
        if isinstance(field, models.Field) and not field.auto_created
    }
    assert _model_fields(block) == expected


def test_pages_that_use_the_model_link_to_it() -> None:
    for path in DOC_FILES:
        if path.name in PYTEST_PAGES | {"README.md", "index.md"}:
            continue
        text = path.read_text()
        if any("from myapp.models import" in block for block in python_blocks(text)):
            # "(index.md#...", or "(../index.md#..." from docs/integrations/.
            assert "index.md#quick-start)" in text, f"{path.name}: link to the model"


def test_testing_page_samples_are_test_modules() -> None:
    for block in python_blocks((ROOT / "docs" / "testing.md").read_text()):
        tree = ast.parse(block)
        assert any(
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
            for node in tree.body
        ), block


# -- the quick start ----------------------------------------------------------


def test_readme_quick_start_is_the_docs_quick_start() -> None:
    readme = python_blocks(section((ROOT / "README.md").read_text(), "Quick start"))
    docs = python_blocks(section((ROOT / "docs" / "index.md").read_text(), "Quick start"))
    assert readme == docs
    assert [kind(block) for block in readme] == ["settings", "run", "model", "run", "run"]
    # The console steps too: tests/test_quickstart.py runs the README's.
    console = re.compile(r"^```console\n(.*?)^```", re.MULTILINE | re.DOTALL)
    for heading in ("Install", "Quick start"):
        assert console.findall(section((ROOT / "README.md").read_text(), heading)) == (
            console.findall(section((ROOT / "docs" / "index.md").read_text(), heading))
        ), heading
    assert (ROOT / "docs/snippets/quickstart.py").read_text().rstrip("\n") in readme


@pytest.mark.usefixtures("myapp")
@pytest.mark.django_db(transaction=True)
def test_quick_start_views_work() -> None:
    namespace = run_block((ROOT / "docs/snippets/quickstart.py").read_text())

    async def scenario() -> bytes:
        await namespace["add_item"]("from the docs")
        response = await namespace["items"](RequestFactory().get("/items/"))
        assert response.status_code == 200
        return bytes(response.content)

    assert b"from the docs" in asyncio.run(scenario())
    response = namespace["item_count"](RequestFactory().get("/items/count/"))
    assert response.status_code == 200
    assert response.content == b'{"count": 1}'


@pytest.mark.usefixtures("myapp")
# The sample bumps pks 0-99: sequences start afresh so the three rows are among them
# whatever tests ran before (a transactional flush keeps PostgreSQL's sequences).
@pytest.mark.django_db(transaction=True, reset_sequences=True)
def test_readme_executor_sample_updates_rows() -> None:
    items = [Item.objects.create(name=f"i{n}") for n in range(3)]
    block = next(b for b in python_blocks((ROOT / "README.md").read_text()) if "def bump" in b)
    namespace = run_block(block)
    assert namespace["updated"] == 3
    assert sorted(Item.objects.values_list("value", flat=True)) == [1, 1, 1]
    assert len(items) == 3


@pytest.mark.usefixtures("myapp")
@pytest.mark.django_db(transaction=True)
def test_connections_transfer_sample_moves_the_amount() -> None:
    source = Item.objects.create(name="src", value=50)
    target = Item.objects.create(name="dst", value=0)
    text = (ROOT / "docs/connections.md").read_text()
    block = next(b for b in python_blocks(text) if "def transfer" in b)
    namespace = run_block(block)
    asyncio.run(namespace["db_call"](namespace["transfer"], source.pk, target.pk, 10))
    source.refresh_from_db()
    target.refresh_from_db()
    assert (source.value, target.value) == (40, 10)


# -- no reStructuredText markup -------------------------------------------------


def test_public_docstrings_have_no_sphinx_markup() -> None:
    docstrings = public_docstrings()
    assert len(docstrings) > 30
    findings = [
        str(finding) for name, doc in docstrings for finding in markup.find_markup(doc, name)
    ]
    assert not findings, "\n".join(findings)


def test_no_docstring_in_the_package_has_sphinx_markup() -> None:
    findings = markup.scan_docstrings()
    assert not findings, "\n".join(map(str, findings))


def test_docs_pages_have_no_sphinx_markup() -> None:
    findings = [
        str(finding)
        for path in DOC_FILES
        for finding in markup.find_markup(path.read_text(), path.name)
    ]
    assert not findings, "\n".join(findings)


def test_the_markup_check_finds_what_the_site_would_print_raw(tmp_path: Path) -> None:
    raw = """Run it with :func:`db_call` or :py:class:`~async_dbbridge.DBExecutor`::

        pool.submit(fn)

    .. code-block:: python
    :param fn: the function
    See `the docs <https://example.org>`_.
    """
    problems = [finding.problem for finding in markup.find_markup(inspect.cleandoc(raw), "x")]
    assert [problem.split(": ")[0] for problem in problems] == [
        "Sphinx role",
        "Sphinx `~module.Name` shortcut",
        "literal-block marker `::`",
        "reST directive",
        "reST field list",
        "reST link",
    ]
    markdown = """Run it with [`db_call`][async_dbbridge.db_call]:

    ```python
    items[::2]
    value = {"a":`b`}::
    ```

    ::: async_dbbridge.db_call
    """
    assert markup.find_markup(inspect.cleandoc(markdown), "x") == []

    page = tmp_path / "index.html"
    page.write_text(
        "<html><body><p>Use :class:<code>DBExecutor</code> here.</p>"
        "<p>These are equivalent::</p><pre><code>a = b[::2]\n:func:`x`</code></pre>"
        "<p>A <code>~a.B</code> and <code>ok::</code> inline</p></body></html>"
    )
    found = [(f.line, f.problem.split(": ")[0]) for f in markup.scan_html(page)]
    assert found == [
        (1, "Sphinx role"),
        (1, "literal-block marker `::`"),
        (2, "Sphinx `~module.Name` shortcut"),  # the line after the <pre>'s newline
    ]


# -- the settings page against the code -------------------------------------------

SETTINGS_PAGE = ROOT / "docs" / "settings.md"


def table_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def bridge_values(parsed: conf.BridgeSettings) -> dict[str, object]:
    """Each key's value as `parse_settings()` resolved it."""
    values: dict[str, object] = {}
    for key in sorted(conf._KEYS):
        if key == "POLICY":
            values[key] = parsed.policy.kind
        elif key == "MAX_AGE":
            values[key] = parsed.policy.seconds
        else:
            assert hasattr(parsed, key.lower()), (
                f"conf accepts {key}, but BridgeSettings has no {key.lower()}: "
                "tell bridge_values() where its value is"
            )
            values[key] = getattr(parsed, key.lower())
    return values


# Configurations that change what other keys default to; each documented
# default is checked against parse_settings() under every one of them.
PROBES: list[dict[str, object]] = [
    {},
    {"MAX_WORKERS": 3},
    {"IDLE_TIMEOUT": 7.5},
    {"POOL_SIZE": 2},
    {"HOLD": "request"},
    {"POLICY": "max_age"},
    {"POLICY": "close"},
]


def test_settings_page_lists_every_key_with_the_default_the_code_gives_it() -> None:
    rows = table_rows(SETTINGS_PAGE.read_text(), "| Key | Type | Default | Effect |")
    defaults: dict[str, str] = {}
    for key_cell, _type, default_cell, effect in rows:
        key_match = re.fullmatch(r"`([A-Z_]+)`", key_cell)
        default_match = re.fullmatch(r"`([^`]+)`", default_cell)
        assert key_match, f"malformed key: {key_cell}"
        assert default_match, f"{key_cell}: the default must be one Python expression"
        assert effect, f"{key_cell}: say what it does"
        defaults[key_match.group(1)] = default_match.group(1)
    assert sorted(defaults) == sorted(conf._KEYS)
    for probe in PROBES:
        values = bridge_values(conf.parse_settings(probe))
        for key, expression in defaults.items():
            if key in probe:
                continue
            documented = eval(expression, {"os": os}, dict(values))
            assert documented == values[key], (
                f"{key}: the docs say the default is {expression} (= {documented!r}), "
                f"but with ASYNC_DBBRIDGE = {probe} it is {values[key]!r}"
            )


def test_check_tables_list_exactly_the_checks_defined() -> None:
    source = (ROOT / "async_dbbridge" / "checks.py").read_text()
    defined = set(re.findall(r'id="(async_dbbridge\.[A-Z]\d{3})"', source))
    assert defined
    tables = {
        path.name: set(re.findall(r"^\| `(async_dbbridge\.[A-Z]\d{3})` \|", path.read_text(), re.M))
        for path in DOC_FILES
    }
    assert tables["settings.md"] == defined
    for page, listed in tables.items():
        assert not listed or listed == defined, f"{page} lists {sorted(listed)}"


def test_logger_table_lists_every_level_the_library_logs_at() -> None:
    sources = [path.read_text() for path in sorted((ROOT / "async_dbbridge").glob("*.py"))]
    code = "\n".join(sources)
    assert set(re.findall(r"getLogger\(([^)]*)\)", code)) == {'"async_dbbridge"'}
    calls = re.findall(r"\blogger\.(debug|info|warning|error|exception|critical)\(", code)
    used = {"ERROR" if level == "exception" else level.upper() for level in calls}
    page = section(SETTINGS_PAGE.read_text(), "The `async_dbbridge` logger")
    documented = {row[0].strip("`") for row in table_rows(page, "| Level |")}
    assert documented == used


# -- retired names and test markers ------------------------------------------------------


def test_no_page_or_docstring_names_anything_retired() -> None:
    """The sources of the site and of the long description; `make docs` greps the built site."""
    findings = [
        str(finding)
        for path in [*DOC_FILES, *sorted((ROOT / "docs" / "snippets").glob("*.py"))]
        for finding in markup.find_retired(path.read_text(), path.name)
        if finding.problem.startswith("retired")
    ]
    findings += [
        str(finding)
        for path in sorted((ROOT / "async_dbbridge").glob("*.py"))
        for finding in markup.find_retired(path.read_text(), path.name)
        if finding.problem.startswith("retired")
    ]
    assert findings == []


def test_the_site_check_finds_retired_names_and_markers(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<p>Request lanes need asgiref 3.13.</p>")
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search_index.json").write_text(
        '{"docs": [{"text": "LANE_WAIT_TIMEOUT"}, {"text": "# Not runnable: a reason"}]}'
    )
    found = sorted(
        (Path(f.where).name, f.problem.split(" (")[0]) for f in markup.scan_site(tmp_path)
    )
    assert found == [
        ("index.html", "retired name"),
        ("search_index.json", "retired name"),
        ("search_index.json", "test marker in a rendered sample"),
    ]
    assert markup.find_retired("a plain page", "x") == []


def test_rendered_samples_drop_the_test_marker() -> None:
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts/mkdocs_hooks.py")
    assert spec is not None
    assert spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    html = (
        '<div class="highlight"><pre><span></span><code><span class="c1"># Not runnable: '
        'two lines of asgi.py.</span>\n<span class="n">application</span></code></pre></div>'
    )
    assert hooks.on_page_content(html) == (
        '<div class="highlight"><pre><span></span><code><span class="n">application</span>'
        "</code></pre></div>"
    )


def test_quick_start_blocks_fit_a_page_without_scrolling() -> None:
    for block in python_blocks(section((ROOT / "README.md").read_text(), "Quick start")):
        long = [line for line in block.splitlines() if len(line) > 80]
        assert long == [], long
