"""The demo dashboard in a headless Chromium: the page loads, the burst runs, the charts move.

Two uvicorn processes serve the demo project on one SQLite file, as `make demo` does: through
async_dbbridge's ASGI wrapper, and under stock Django's ASGI handler. Selenium drives Debian's
`chromium` through its `chromium-driver` (scripts/bootstrap.sh installs both): it opens the
dashboard, starts the burst with the page's own form, and waits for the page to say it is done.
The charts must then hold a line per server, and the figures the page shows must be the
servers' own: the wrapper's database sessions never above its pool, stock Django's above it.

The screenshot is kept in `$DBBRIDGE_ARTIFACTS` (default `artifacts/` in the checkout) as
`demo.png`: CI's artifact, and the source of docs/img/demo.png. SQLite runs of the Django 5.2
series only (`slow`): the demo's default database, and about 25 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo_asgi"
POOL_SIZE = 4  # demo_asgi/settings.py
ARTIFACTS = Path(os.environ.get("DBBRIDGE_ARTIFACTS", ROOT / "artifacts"))

pytestmark = [pytest.mark.vendor("sqlite"), pytest.mark.slow]


def demo_env(database: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DJANGO_SETTINGS_MODULE"}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["DATABASE_URL"] = f"sqlite:///{database}"
    env.update(extra)
    return env


class Uvicorn:
    """A demo server in a process of its own, on a port uvicorn picks."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *args, "--port", "0", "--no-access-log"],
            cwd=DEMO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output: list[str] = []
        self.ready = threading.Event()
        self.url = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(60) or not self.url:
            self.stop()
            pytest.fail("uvicorn did not start:\n" + "".join(self.output))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.output.append(line)
            if match := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
                self.url = match.group(1)
                self.ready.set()
        self.ready.set()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(the wrapper's URL, stock Django's URL), both serving the seeded demo database."""
    database = tmp_path / "demo.sqlite3"
    env = demo_env(database)
    for command in (["migrate", "--noinput", "-v0"], ["seed_demo"]):
        subprocess.run(
            [sys.executable, "manage.py", *command], cwd=DEMO, env=env, check=True, timeout=120
        )
    stock = Uvicorn(
        ["--factory", "django.core.asgi:get_asgi_application"],
        demo_env(database, DJANGO_SETTINGS_MODULE="demo_asgi.settings"),
    )
    try:
        library = Uvicorn(
            ["demo_asgi.asgi:application"], demo_env(database, DEMO_STOCK_URL=stock.url)
        )
        try:
            yield library.url, stock.url
        finally:
            library.stop()
    finally:
        stock.stop()


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(
            "chromium / chromedriver missing: run scripts/bootstrap.sh, which installs them"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1700")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_dashboard_runs_the_burst_and_charts_both_servers(
    servers: tuple[str, str], browser: object
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(browser, WebDriver)
    library, stock = servers
    assert httpx.get(f"{library}/favicon.ico").headers["content-type"] == "image/svg+xml"

    browser.get(library + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.2)
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("updated"))
    # The pool row is there before any query: nothing in use, of the configured size.
    row = browser.find_element(By.CSS_SELECTOR, "#aliases tr")
    assert row.find_elements(By.TAG_NAME, "td")[2].text == f"0 / {POOL_SIZE}"
    explanation = browser.find_element(By.ID, "explain").text
    assert "What you are looking at." in explanation
    assert stock in explanation

    for field, value in (("burst-clients", "32"), ("burst-seconds", "3")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "burst-run").click()
    # Running, then each server in turn, then done: the charts grow meanwhile.
    WebDriverWait(browser, 90, poll_frequency=0.25).until(
        lambda d: d.find_element(By.ID, "burst-phase").get_attribute("data-phase") == "done"
    )

    for chart in ("chart-ok", "chart-waiting", "chart-sessions"):
        lines = {
            path.get_attribute("data-series"): int(path.get_attribute("data-points") or 0)
            for path in browser.find_elements(By.CSS_SELECTOR, f"#{chart} path")
        }
        assert set(lines) == {"async_dbbridge", "stock Django"}, (chart, lines)
        assert min(lines.values()) >= 4, (chart, lines)
    # The pool's own figures over time (what the metrics integrations export): stock
    # Django has no pool, so only the bridge draws a line.
    for chart in ("chart-pool-used", "chart-pool-waiting"):
        lines = {
            path.get_attribute("data-series"): int(path.get_attribute("data-points") or 0)
            for path in browser.find_elements(By.CSS_SELECTOR, f"#{chart} path")
        }
        assert set(lines) == {"async_dbbridge"}, (chart, lines)
        assert lines["async_dbbridge"] >= 4, (chart, lines)

    summary = {
        row.get_attribute("data-server"): [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        for row in browser.find_elements(By.CSS_SELECTOR, "#burst-summary tbody tr")
    }
    assert set(summary) == {"async_dbbridge", "stock Django"}
    _, ok, unavailable, errors, peak, _after = summary["async_dbbridge"]
    assert int(ok) > 0
    assert int(errors) == 0  # a 503 is counted apart, as the answer it is
    # What the page shows is what the server counted: never above the pool.
    assert 1 <= int(peak) <= POOL_SIZE
    _, stock_ok, _, _, stock_peak, _ = summary["stock Django"]
    assert int(stock_ok) > 0
    assert int(stock_peak) > POOL_SIZE  # a connection per request thread, stranded
    assert int(unavailable) >= 0

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "demo.png"
    # The explanation, the form and the charts: the top of the page.
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
