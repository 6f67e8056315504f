"""The task workers' tests import their frameworks (optional extras).

A series of the matrix that does not run them (``DBBRIDGE_WORKERS=0``: see
``tests/conftest.py``) may not have every framework installed, so their
modules are not even collected there.
"""

from __future__ import annotations

import os

collect_ignore_glob = ["test_*.py"] if os.environ.get("DBBRIDGE_WORKERS", "1") == "0" else []
