"""Every Python sample in README.md and docs/ compiles, and runs against the database."""

from __future__ import annotations

import asyncio
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import RequestFactory

from async_dbbridge import DBExecutor
from tests.testapp import models as testapp_models
from tests.testapp.models import Item

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SNIPPET = re.compile(r'^--8<-- "(.+)"$', re.MULTILINE)


def python_blocks(path: Path) -> list[str]:
    text = path.read_text()
    return [
        _SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text().rstrip("\n"), block).rstrip("\n")
        for block in _BLOCK.findall(text)
    ]


ALL_BLOCKS = [
    pytest.param(block, id=f"{path.name}-{i}")
    for path in DOC_FILES
    for i, block in enumerate(python_blocks(path))
]


@pytest.fixture
def myapp() -> Iterator[None]:
    """The samples import ``myapp.models``: let that be the test app."""
    package = types.ModuleType("myapp")
    package.models = testapp_models  # type: ignore[attr-defined]
    sys.modules["myapp"] = package
    sys.modules["myapp.models"] = testapp_models
    yield
    del sys.modules["myapp"], sys.modules["myapp.models"]


def run_block(block: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "docs_sample"}
    exec(compile(block, "<docs sample>", "exec"), namespace)
    for value in namespace.values():
        if isinstance(value, DBExecutor):
            value.shutdown()
    return namespace


def test_there_are_samples() -> None:
    assert len(ALL_BLOCKS) >= 8


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_every_sample_compiles(block: str) -> None:
    compile(block, "<docs sample>", "exec")


@pytest.mark.usefixtures("myapp")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_every_sample_runs(block: str) -> None:
    run_block(block)


def test_readme_quick_start_is_the_docs_quick_start() -> None:
    snippet = (ROOT / "docs/snippets/quickstart.py").read_text().rstrip("\n")
    assert python_blocks(ROOT / "README.md")[0] == snippet
    assert snippet in python_blocks(ROOT / "docs/index.md")


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


@pytest.mark.usefixtures("myapp")
@pytest.mark.django_db(transaction=True)
def test_readme_executor_sample_updates_rows() -> None:
    items = [Item.objects.create(name=f"i{n}") for n in range(3)]
    namespace = run_block(python_blocks(ROOT / "README.md")[1])
    assert namespace["updated"] == 3
    assert sorted(Item.objects.values_list("value", flat=True)) == [1, 1, 1]
    assert len(items) == 3


@pytest.mark.usefixtures("myapp")
@pytest.mark.django_db(transaction=True)
def test_connections_transfer_sample_moves_the_amount() -> None:
    source = Item.objects.create(name="src", value=50)
    target = Item.objects.create(name="dst", value=0)
    block = next(b for b in python_blocks(ROOT / "docs/connections.md") if "def transfer" in b)
    namespace = run_block(block)
    asyncio.run(namespace["db_call"](namespace["transfer"], source.pk, target.pk, 10))
    source.refresh_from_db()
    target.refresh_from_db()
    assert (source.value, target.value) == (40, 10)


@pytest.mark.usefixtures("myapp")
@pytest.mark.django_db(transaction=True)
def test_testing_page_sample_passes() -> None:
    block = python_blocks(ROOT / "docs/testing.md")[0]
    namespace = run_block(block)
    namespace["test_export_job_leaves_no_sessions"](settings=None)
