"""Leak-free Django database connections for ASGI, executors and threads.

The public surface; the code lives in the private modules next to this one.
"""

from __future__ import annotations

from ._call import db_call, db_sync_to_async
from ._connections import Policy, TransactionLeftOpenWarning
from ._executor import DBExecutor, ExecutorStats
from ._install import get_bridge_executor, install_default_executor, reset_bridge_executor
from ._lending import PoolTimeout
from ._pool import PoolStats
from ._request_threads import RequestThreadStats
from ._stats import BridgeStats, stats
from .threads import ConnectionScope, DBThread, db_connection_scope

__version__ = "0.1.0.dev0"

__all__ = (
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

# Objects defined in a private module say they live here, where users import them from (as
# anyio and httpx do): reprs, tracebacks and pickles name `async_dbbridge.DBExecutor`,
# not `async_dbbridge._executor.DBExecutor`, so the private layout can change without breaking
# anyone's pickles or log searches. Pickle still finds each object: it is an attribute of this
# module under its own name. The `threads` module is public, so its objects keep that path.
# The price, the same as in anyio and httpx: what looks a class up through its `__module__`
# now looks in this file, so inspect.getsource() finds no class source, typing.get_type_hints()
# cannot resolve a class annotation that names more than builtins (Policy's `PolicyKind`), and
# typing.get_overloads() loses db_sync_to_async's overloads. Functions keep their source and
# hints (both come from the function's own code and globals).
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith(f"{__name__}._"):
        _obj.__module__ = __name__
del _name, _obj
