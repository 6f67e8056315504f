"""CPU_AFFINITY: the event loop's thread, and the threads it starts, on one CPU.

Pinning is per thread on Linux, so every test pins a thread of its own (never
the test runner's main thread) or a child process of its own; "auto" runs in
child processes whose lock directory is the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from pytest_django.fixtures import Settings as SettingsWrapper

from async_dbbridge import _affinity
from async_dbbridge._compat import REQUEST_THREADS_SUPPORTED
from async_dbbridge.asgi import DBBridgeASGIApp
from async_dbbridge.conf import parse_settings
from tests.e2e_project.driver import Lifespan, call_http

_T = TypeVar("_T")

CPUS = sorted(os.sched_getaffinity(0))
ROOT = Path(__file__).resolve().parent.parent


# -- the setting ---------------------------------------------------------------------------


def test_default_leaves_scheduling_to_the_os() -> None:
    assert parse_settings({}).cpu_affinity is None
    assert _affinity.pin_loop_thread(None) is None


def test_auto_and_an_allowed_cpu_are_accepted() -> None:
    assert parse_settings({"CPU_AFFINITY": "auto"}).cpu_affinity == "auto"
    assert parse_settings({"CPU_AFFINITY": CPUS[-1]}).cpu_affinity == CPUS[-1]


@pytest.mark.parametrize("value", [True, -1, 1.0, "0", "all", [0]])
def test_invalid_values_name_the_key_and_what_is_accepted(value: object) -> None:
    with pytest.raises(
        ImproperlyConfigured,
        match=r"ASYNC_DBBRIDGE\['CPU_AFFINITY'\] is .*expected None, 'auto' or a CPU number",
    ):
        parse_settings({"CPU_AFFINITY": value})


def test_a_cpu_the_process_may_not_use_names_the_ones_it_may() -> None:
    outside = max(CPUS) + 1000
    allowed = ", ".join(map(str, CPUS))
    with pytest.raises(ImproperlyConfigured, match=rf"is {outside}, but .* CPU\(s\) {allowed}\."):
        parse_settings({"CPU_AFFINITY": outside})


def test_a_platform_without_affinity_warns_once_and_serves_unpinned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(os, "sched_setaffinity")
    monkeypatch.setattr(_affinity, "_said", set())
    # A settings file shared with a macOS laptop still loads...
    assert parse_settings({"CPU_AFFINITY": "auto"}).cpu_affinity == "auto"
    assert parse_settings({"CPU_AFFINITY": 0}).cpu_affinity == 0
    # ... and pinning says once why it does nothing.
    assert _affinity.pin_loop_thread("auto") is None
    assert _affinity.pin_loop_thread(0) is None
    warnings = [r.getMessage() for r in caplog.records if "CPU_AFFINITY" in r.getMessage()]
    assert warnings == [
        "async_dbbridge: CPU_AFFINITY: this platform cannot pin threads "
        "(os.sched_setaffinity is Linux-only); not pinning"
    ]


def test_a_free_threaded_build_does_not_pin(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="async_dbbridge")
    monkeypatch.setattr(_affinity, "gil_enabled", lambda: False)
    monkeypatch.setattr(_affinity, "_said", set())
    before = os.sched_getaffinity(0)
    assert _in_thread(lambda: (_affinity.pin_loop_thread(CPUS[0]), os.sched_getaffinity(0))) == (
        None,
        before,
    )
    assert "a free-threaded build runs without the GIL; not pinning" in caplog.text


def test_auto_refuses_in_a_container_whose_quota_is_below_its_cpus(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Kubernetes limits and docker --cpus: every container sees all the host's CPUs and
    its own lock directory, so every pod's first worker would take the same CPU."""
    monkeypatch.setattr(_affinity, "cpu_quota", lambda: len(CPUS) - 0.5)
    monkeypatch.setattr(_affinity, "_said", set())
    before = os.sched_getaffinity(0)
    assert _in_thread(lambda: (_affinity.pin_loop_thread("auto"), os.sched_getaffinity(0))) == (
        None,
        before,
    )
    assert "'auto' cannot know its CPUs: a CPU quota of" in caplog.text
    # A CPU number is the operator's choice: still honoured.
    assert _in_thread(lambda: _affinity.pin_loop_thread(CPUS[0])) == CPUS[0]


def test_the_cgroup_quota_is_read_from_this_machine() -> None:
    quota = _affinity.cpu_quota()
    assert quota is None or quota > 0


def test_a_lock_directory_that_is_not_private_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / f"async_dbbridge-cpus-{os.getuid()}").symlink_to(elsewhere)
    assert _affinity._lock_directory() is None
    assert "is not a private directory of this user" in caplog.text
    # A lock file that is a symlink is refused too, not followed.
    (tmp_path / "cpu-0.lock").symlink_to(elsewhere / "target")
    assert _affinity._try_lock(tmp_path / "cpu-0.lock") is None
    assert not (elsewhere / "target").exists()


# -- pinning -----------------------------------------------------------------------------


def _in_thread(fn: Callable[[], _T]) -> _T:
    """Run fn on a fresh thread of its own (a pin must not outlive the test); its result."""
    with ThreadPoolExecutor(max_workers=1) as fresh:
        return fresh.submit(fn).result(30)


def test_pinning_applies_to_the_calling_thread_and_the_threads_it_starts() -> None:
    cpu = CPUS[-1]

    def pinned() -> tuple[int | None, set[int], set[int]]:
        chosen = _affinity.pin_loop_thread(cpu)
        child: dict[str, set[int]] = {}
        started = threading.Thread(target=lambda: child.update(mask=os.sched_getaffinity(0)))
        started.start()
        started.join(10)
        return chosen, os.sched_getaffinity(0), child["mask"]

    before = os.sched_getaffinity(0)
    chosen, own, inherited = _in_thread(pinned)
    assert (chosen, own, inherited) == (cpu, {cpu}, {cpu})
    # Only that thread (and its children): this one is as it was.
    assert os.sched_getaffinity(0) == before


def test_a_refused_pin_is_logged_and_the_thread_runs_unpinned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(pid: int, mask: object) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert _in_thread(lambda: _affinity.pin_loop_thread(CPUS[0])) is None
    assert "could not pin the event loop: [Errno 22] Invalid argument" in caplog.text


@pytest.mark.skipif(not REQUEST_THREADS_SUPPORTED, reason="request threads need asgiref >= 3.13")
def test_the_asgi_wrapper_pins_its_loop_request_threads_and_bridge_workers(
    settings: SettingsWrapper,
) -> None:
    cpu = CPUS[-1]
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 2, "CPU_AFFINITY": cpu}

    def where() -> dict[str, Any]:
        return {"thread": threading.current_thread().name, "cpus": sorted(os.sched_getaffinity(0))}

    async def inner(scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        seen = {
            "loop": where(),
            # Thread-sensitive: the request's thread.
            "request": await sync_to_async(where)(),
            # The loop's default executor: the process-wide bridge.
            "bridge": await loop.run_in_executor(None, where),
        }
        body = repr(seen).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def serve() -> dict[str, Any]:
        app = DBBridgeASGIApp(inner)
        lifespan = Lifespan(app)
        assert await lifespan.startup() == {"type": "lifespan.startup.complete"}
        try:
            response = await call_http(app, "/")
        finally:
            assert await lifespan.shutdown() == {"type": "lifespan.shutdown.complete"}
        seen: dict[str, Any] = eval(response.body)  # our own repr() above
        return seen

    seen = _in_thread(lambda: asyncio.run(serve()))
    assert seen["request"]["thread"].startswith("dbbridge-request-")
    assert seen["bridge"]["thread"].startswith("dbbridge-")
    assert "-request-" not in seen["bridge"]["thread"]
    assert {name: place["cpus"] for name, place in seen.items()} == {
        "loop": [cpu],
        "request": [cpu],
        "bridge": [cpu],
    }


# -- "auto": one CPU per process -----------------------------------------------------------

_CHOOSER = """
import os, sys
from async_dbbridge import _affinity
cpu = _affinity.pin_loop_thread("auto")
print(cpu, sorted(os.sched_getaffinity(0))[0], flush=True)
sys.stdin.readline()  # hold the CPU until told to go
"""


class _Chooser:
    """A process that picks a CPU with "auto" and keeps it until `leave()`."""

    def __init__(self, lock_dir: Path) -> None:
        env = {**os.environ, "TMPDIR": str(lock_dir), "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHOOSER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        assert len(line) == 2, f"the chooser printed {line!r}"
        self.cpu, pinned = int(line[0]), int(line[1])
        assert pinned == self.cpu

    def leave(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(30) == 0


@pytest.fixture
def choosers(tmp_path: Path) -> Iterator[list[_Chooser]]:
    started: list[_Chooser] = []
    yield started
    for chooser in started:
        if chooser.process.poll() is None:
            chooser.process.kill()
            chooser.process.wait(30)
        for pipe in (chooser.process.stdin, chooser.process.stdout):
            if pipe is not None:
                pipe.close()


def test_auto_gives_each_process_its_own_cpu_while_there_are_enough(
    tmp_path: Path, choosers: list[_Chooser]
) -> None:
    for _ in CPUS:
        choosers.append(_Chooser(tmp_path))
    assert sorted(c.cpu for c in choosers) == CPUS
    # One more than CPUs: it shares one (chosen by pid), it is not refused.
    extra = _Chooser(tmp_path)
    choosers.append(extra)
    assert extra.cpu in CPUS
    # A process that ends frees its CPU for the next one, however it ended.
    first = choosers[0]
    first.process.kill()
    first.process.wait(30)
    extra.leave()
    replacement = _Chooser(tmp_path)
    choosers.append(replacement)
    assert replacement.cpu == first.cpu


def test_auto_in_a_forked_child_chooses_again_and_keeps_the_parents_cpu_taken(
    tmp_path: Path,
) -> None:
    script = """
import os, sys
from async_dbbridge import _affinity
parent = _affinity.pin_loop_thread("auto")
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, str(_affinity.pin_loop_thread("auto")).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(parent, os.read(read, 100).decode())
"""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    parent, child = map(int, out.stdout.split())
    if len(CPUS) > 1:
        assert child != parent  # the parent's lock is still held: the child took another
    else:
        assert child == parent


def test_a_child_forked_from_a_pinned_thread_gets_every_cpu_back() -> None:
    script = """
import os
from async_dbbridge import _affinity
cpus = sorted(os.sched_getaffinity(0))
_affinity.pin_loop_thread(cpus[-1])
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, ",".join(map(str, sorted(os.sched_getaffinity(0)))).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(",".join(map(str, sorted(os.sched_getaffinity(0)))), os.read(read, 100).decode())
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    parent, child = out.stdout.split()
    assert parent == str(CPUS[-1])
    assert child == ",".join(map(str, CPUS))
