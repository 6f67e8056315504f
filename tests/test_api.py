"""The public surface is small and stable: these tests pin it."""

from __future__ import annotations

import importlib
import inspect
import pickle
import traceback
import typing
from types import ModuleType

import pytest

import async_dbbridge
import async_dbbridge.asgi
import async_dbbridge.testing
import async_dbbridge.threads

PUBLIC_MODULES = (
    async_dbbridge,
    async_dbbridge.asgi,
    async_dbbridge.testing,
    async_dbbridge.threads,
)


def public_objects(module: ModuleType) -> list[tuple[str, object]]:
    """The classes and functions a public module exports (not its constants)."""
    return [
        (name, obj)
        for name in module.__all__
        if inspect.isclass(obj := getattr(module, name)) or inspect.isfunction(obj)
    ]


ALL_PUBLIC_OBJECTS = [
    pytest.param(obj, id=f"{module.__name__}.{name}")
    for module in PUBLIC_MODULES
    for name, obj in public_objects(module)
]


def test_package_exports() -> None:
    assert async_dbbridge.__all__ == (
        "BridgeStats",
        "ConnectionScope",
        "DBExecutor",
        "DBThread",
        "ExecutorStats",
        "Policy",
        "PoolStats",
        "PoolTimeout",
        "RequestThreadStats",
        "TransactionLeftOpenWarning",
        "__version__",
        "db_call",
        "db_connection_scope",
        "db_sync_to_async",
        "get_bridge_executor",
        "install_default_executor",
        "reset_bridge_executor",
        "stats",
    )
    for name in async_dbbridge.__all__:
        assert hasattr(async_dbbridge, name), name


def test_testing_exports() -> None:
    assert async_dbbridge.testing.__all__ == (
        "open_connection_aliases",
        "process_open_connections",
        "server_session_count",
        "wait_for_server_sessions",
    )


def test_asgi_and_threads_exports() -> None:
    assert async_dbbridge.asgi.__all__ == ("DBBridgeASGIApp", "get_asgi_application")
    assert async_dbbridge.threads.__all__ == ("ConnectionScope", "DBThread", "db_connection_scope")


def test_dbexecutor_is_a_thread_pool_executor() -> None:
    """asyncio's set_default_executor() accepts only ThreadPoolExecutor instances."""
    from concurrent.futures import ThreadPoolExecutor

    assert issubclass(async_dbbridge.DBExecutor, ThreadPoolExecutor)


def test_package_objects_report_the_path_they_are_imported_from() -> None:
    """What the private modules define says `async_dbbridge`; `threads` is public itself."""
    assert {name: obj.__module__ for name, obj in public_objects(async_dbbridge)} == {
        "BridgeStats": "async_dbbridge",
        "ConnectionScope": "async_dbbridge.threads",
        "DBExecutor": "async_dbbridge",
        "DBThread": "async_dbbridge.threads",
        "ExecutorStats": "async_dbbridge",
        "Policy": "async_dbbridge",
        "PoolStats": "async_dbbridge",
        "PoolTimeout": "async_dbbridge",
        "RequestThreadStats": "async_dbbridge",
        "TransactionLeftOpenWarning": "async_dbbridge",
        "db_call": "async_dbbridge",
        "db_connection_scope": "async_dbbridge.threads",
        "db_sync_to_async": "async_dbbridge",
        "get_bridge_executor": "async_dbbridge",
        "install_default_executor": "async_dbbridge",
        "reset_bridge_executor": "async_dbbridge",
        "stats": "async_dbbridge",
    }


@pytest.mark.parametrize("obj", ALL_PUBLIC_OBJECTS)
def test_every_public_object_resolves_from_its_module(obj: typing.Any) -> None:
    """`__module__` + `__qualname__` is how pickle, mkdocstrings and reprs find an object."""
    assert not any(part.startswith("_") for part in obj.__module__.split(".")), obj.__module__
    assert getattr(importlib.import_module(obj.__module__), obj.__qualname__) is obj
    assert pickle.loads(pickle.dumps(obj)) is obj


def test_pickles_and_reprs_name_no_private_module() -> None:
    with async_dbbridge.DBExecutor(max_workers=1) as executor:
        stats = executor.stats()
    values: list[object] = [
        stats,
        async_dbbridge.BridgeStats(
            pools={},
            request_threads=async_dbbridge.RequestThreadStats(
                busy=1, idle=2, started=3, retired=0, closing=False
            ),
            bridge=stats,
        ),
        async_dbbridge.Policy.max_age(30.0),
        async_dbbridge.TransactionLeftOpenWarning("left open"),
        async_dbbridge.DBExecutor,
        async_dbbridge.db_call,
    ]
    for value in values:
        data = pickle.dumps(value)
        assert b"async_dbbridge._" not in data, value
        copy = pickle.loads(data)
        assert type(copy) is type(value)
        assert repr(copy) == repr(value)

    assert repr(async_dbbridge.DBExecutor) == "<class 'async_dbbridge.DBExecutor'>"
    error = async_dbbridge.TransactionLeftOpenWarning("left open")
    assert traceback.format_exception_only(error) == [
        "async_dbbridge.TransactionLeftOpenWarning: left open\n"
    ]


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(obj, id=name)
        for name, obj in public_objects(async_dbbridge)
        if inspect.isfunction(obj)
    ],
)
def test_public_functions_keep_their_hints_and_source(fn: typing.Any) -> None:
    """Runtime type checkers and `inspect` read a function through its own globals."""
    typing.get_type_hints(fn)
    assert f"def {fn.__name__}(" in inspect.getsource(fn)
