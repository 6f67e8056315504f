"""A small soak for CI: ``benchmarks/soak.py``'s checks on 2,000 mixed operations.

Successful calls, exceptions, database errors, cancellations, transactions left
open and (on a server) sessions killed from a side connection, with sessions
sampled against the bound, data verified by marker and traced memory checked.
The full run is ``benchmarks/soak.py`` (100,000 operations by default).
"""

from __future__ import annotations

import pytest
from django.db import connections

from benchmarks.soak import SoakConfig, run_soak
from tests.conftest import SetSetting

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]


@pytest.mark.parametrize("health_checks", [True, False])
def test_soak_two_thousand_mixed_operations(db_settings: SetSetting, health_checks: bool) -> None:
    db_settings(aliases=("default",), CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=health_checks)
    config = SoakConfig(
        ops=2_000,
        seconds=90,
        workers=4,
        concurrency=16,
        seed=7,
        warmup=500,
        # Small runs: a per-operation leak of any real size (a task, a frame, an
        # exception kept alive) still shows; the drivers' per-connection state
        # does not add up to this.
        max_growth_bytes=2 * 1024 * 1024,
        max_growth_per_op=512,
    )
    report = run_soak(config)
    assert report.ok, report.format()
    assert report.ops_done == 2_000
    # Every kind of operation really happened, and connections really opened.
    assert report.outcomes["ok"] > 0
    assert report.outcomes["expected error"] > 0
    assert report.outcomes["cancelled"] > 0
    assert report.leftover_warnings > 0
    assert report.connections_opened > 0
    if connections["default"].vendor != "sqlite":
        assert report.kills > 0
