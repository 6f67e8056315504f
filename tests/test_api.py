"""The public surface is small and stable: these tests pin it."""

from __future__ import annotations

import async_dbbridge
import async_dbbridge.testing


def test_package_exports() -> None:
    assert async_dbbridge.__all__ == (
        "ConnectionScope",
        "DBExecutor",
        "DBThread",
        "ExecutorStats",
        "Policy",
        "TransactionLeftOpenWarning",
        "__version__",
        "db_call",
        "db_connection_scope",
        "db_sync_to_async",
        "get_bridge_executor",
        "install_default_executor",
        "reset_bridge_executor",
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


def test_dbexecutor_is_a_thread_pool_executor() -> None:
    """asyncio's set_default_executor() accepts only ThreadPoolExecutor instances."""
    from concurrent.futures import ThreadPoolExecutor

    assert issubclass(async_dbbridge.DBExecutor, ThreadPoolExecutor)
