"""Adapters from task frameworks and consumers to the library's connection handling.

One module per framework (`async_dbbridge.integrations.celery`, ...), each an
optional extra that imports its own framework and no other. Nothing is imported
here: importing one integration must not import another's framework.
"""

from __future__ import annotations
