"""Leak-free Django database connections for ASGI, executors and threads.

The public surface; the code lives in the private modules next to this one.
"""

from __future__ import annotations

from ._call import db_call, db_sync_to_async
from ._connections import Policy, TransactionLeftOpenWarning
from ._executor import DBExecutor, ExecutorStats
from ._install import get_bridge_executor, install_default_executor, reset_bridge_executor
from .threads import ConnectionScope, DBThread, db_connection_scope

__version__ = "0.1.0.dev0"

__all__ = (
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
