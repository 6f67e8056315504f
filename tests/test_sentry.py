"""The fused middleware under Sentry's DjangoIntegration (tests/sentry_cases.py), alone.

`sentry_sdk.init()` patches Django for good; running those tests here would put
Sentry's wrapper around every middleware of every later test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fusing_through_sentrys_middleware_wrapper() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/sentry_cases.py", "-q", "-p", "no:randomly"],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    passed = re.search(r"(\d+) passed", output)
    assert passed is not None, output
    assert int(passed.group(1)) >= 48, output
    assert "skipped" not in output, output
    assert "deselected" not in output, output
