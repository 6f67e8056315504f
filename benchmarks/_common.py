"""What the end-to-end benchmarks share: wrk, a uvicorn server process, counting and CPU.

``bench_asgi.py`` and ``bench_project.py`` both serve a Django project with
one uvicorn worker in a subprocess, drive it with ``wrk``, and count the
server's sessions from outside while it runs. The scripts are run directly
(``benchmarks/`` is then ``sys.path[0]``), so they put the repository root on
``sys.path`` themselves and import this module as ``benchmarks._common``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent


class HarnessError(RuntimeError):
    """The benchmark itself failed (as opposed to a configuration doing badly)."""


def split_option(value: str, choices: Sequence[str], option: str) -> tuple[str, ...]:
    """A comma-separated option's items, each one of ``choices``; a clear error otherwise."""
    items = tuple(item.strip() for item in value.split(",") if item.strip())
    unknown = [item for item in items if item not in choices]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"{option}: choose from {', '.join(choices)} (comma-separated), not {value!r}"
        )
    return items


# -- counting sessions ----------------------------------------------------------------


def open_files(pid: int, path: str) -> int:
    """Descriptors of process ``pid`` on ``path``: SQLite's open connections (0 once it exited)."""
    target = os.path.realpath(path)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return 0
    count = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                count += 1
        except OSError:
            continue
    return count


def settle(count: Callable[[], int], timeout: float, stable: float) -> int:
    """The count once it is 0, or has not changed for ``stable`` s (bounded by ``timeout``).

    A server drops a closed session a moment after the client closed it; a
    held one never goes, so waiting for 0 would only burn the timeout.
    """
    deadline = time.monotonic() + timeout
    last = count()
    since = time.monotonic()
    while last:
        now = time.monotonic()
        if now >= deadline or now - since >= stable:
            break
        time.sleep(0.02)
        current = count()
        if current != last:
            last, since = current, time.monotonic()
    return last


class Sampler:
    """Calls ``count`` from a thread of its own every ``interval`` s while the load runs."""

    def __init__(self, count: Callable[[], int], interval: float) -> None:
        self._count = count
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self.samples: list[int] = []
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while True:
                self.samples.append(self._count())
                if self._stop.wait(self._interval):
                    return
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise HarnessError(f"counting sessions failed: {self.error!r}") from self.error


# -- wrk ------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    requests_per_s: float
    non_2xx: int
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    #: Responses by HTTP status, when the run's Lua script counted them (see STATUS_MARKER).
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def ok_per_s(self) -> float:
        """Responses below 400 per second: what the server really served."""
        return (self.requests - self.non_2xx) / self.seconds if self.seconds else 0.0


_UNITS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

#: The line a wrk Lua script prints in ``done()`` with a JSON object of status -> count.
STATUS_MARKER: Final = "BENCH_STATUSES "


def parse_wrk(output: str) -> WrkResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", output)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if total is None or rate is None:
        raise HarnessError(f"cannot read wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if sockets is not None:
        errors = dict(zip(errors, (int(g) for g in sockets.groups()), strict=True))
    latency = {
        f"p{m[1]}": float(m[2]) * _UNITS[m[3]] * 1e3
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    }
    statuses: dict[str, int] = {}
    for line in output.splitlines():
        if line.startswith(STATUS_MARKER):
            statuses = {str(k): int(v) for k, v in json.loads(line[len(STATUS_MARKER) :]).items()}
    return WrkResult(
        requests=int(total[1]),
        seconds=float(total[2]) * _UNITS[total[3]],
        requests_per_s=float(rate[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=errors,
        latency_ms=latency,
        statuses=statuses,
    )


def run_wrk(
    url: str,
    seconds: float,
    *,
    connections: int,
    threads: int,
    timeout: float | None = None,
    script: Path | None = None,
    script_args: Sequence[str] = (),
) -> WrkResult:
    """One wrk run against ``url``: wrk stops after ``seconds``, and is killed 60 s past that.

    ``timeout`` is wrk's per-request socket timeout (its default, 2 s, when None).
    """
    command = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
    ]
    if timeout is not None:
        command.append(f"--timeout={max(1, round(timeout))}s")
    if script is not None:
        command += ["-s", str(script)]
    command.append(url)
    if script_args:
        command += ["--", *script_args]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"wrk did not finish: {' '.join(command[:8])} ...") from exc
    if done.returncode != 0:
        raise HarnessError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# -- the server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(
    port: int, path: str, timeout: float = 5.0, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class UvicornServer:
    """One uvicorn process, 1 worker, no access log, on 127.0.0.1; its output goes to ``log``.

    Its environment is the harness's, plus ``env``, minus ``unset``; ``pythonpath``
    goes before the repository root (to serve another checkout's library).
    """

    def __init__(
        self,
        label: str,
        application: str,
        *,
        env: Mapping[str, str],
        lifespan: str,
        log: IO[bytes],
        pythonpath: Sequence[str] = (),
        unset: Sequence[str] = (),
    ) -> None:
        self.label = label
        self.port = free_port()
        self.log = log
        paths = [*pythonpath, str(ROOT), os.environ.get("PYTHONPATH", "")]
        full_env = {
            **os.environ,
            **env,
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        }
        # Settings the harness did not ask for must not leak in from its own environment.
        for key in unset:
            full_env.pop(key, None)
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            application,
            "--workers",
            "1",
            "--no-access-log",
            "--lifespan",
            lifespan,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float, path: str = "/ping/") -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise HarnessError(
                    f"{self.label}: uvicorn exited ({self.process.returncode}) before serving:\n"
                    f"{self.log_text()}"
                )
            try:
                status, _ = http_get(self.port, path, timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise HarnessError(
                    f"{self.label}: no answer within {timeout} s:\n{self.log_text()}"
                )
            time.sleep(0.05)

    def get_json(self, path: str, timeout: float = 10.0) -> dict[str, Any]:
        status, body = http_get(self.port, path, timeout=timeout)
        if status != 200:
            raise HarnessError(f"{self.label}: {path} answered {status}: {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def stop(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM (uvicorn's graceful shutdown), wait; SIGKILL past ``timeout``.

        Returns the exit status (None: it had to be killed) and the seconds it took.
        """
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            code = None
        return code, time.monotonic() - started

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def clean_exit(code: int | None) -> bool:
    # uvicorn re-raises the signal it shut down on, so a clean stop is -SIGTERM.
    return code in (0, -signal.SIGTERM)


def error_summary(log: str) -> dict[str, int]:
    """The server's error lines, most frequent first, counted (numbers and ids folded)."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if not line.startswith(("ERROR", "WARNING", "CRITICAL")) and "Error" not in line:
            continue
        key = re.sub(r"\d+", "N", " ".join(line.split()))
        if len(key) > 170:
            # The cause ("too many clients") is at the end of a driver's message.
            key = f"{key[:70]} … {key[-90:]}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


# -- CPU accounting -------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds used so far: by the server process, by waited-for children (wrk), by all."""

    server: float
    children: float
    machine: float
    at: float

    @classmethod
    def take(cls, pid: int) -> CpuSnapshot | None:
        try:
            tick = os.sysconf("SC_CLK_TCK")
            with open(f"/proc/{pid}/stat") as f:
                # Fields after the command name, which may hold spaces: state is
                # the first, utime and stime the 12th and 13th.
                fields = f.read().rsplit(")", 1)[1].split()
            with open("/proc/stat") as f:
                cpu = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError, IndexError):
            return None  # not Linux, or the server is gone: no CPU figures
        # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
        busy = sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            server=(int(fields[11]) + int(fields[12])) / tick,
            children=children.ru_utime + children.ru_stime,
            machine=busy / tick,
            at=time.monotonic(),
        )


def cpu_per_request(
    start: CpuSnapshot | None, end: CpuSnapshot | None, requests: int
) -> dict[str, float]:
    """Milliseconds of CPU per request: uvicorn, wrk, the rest (DB server, harness, others)."""
    if start is None or end is None or not requests:
        return {}
    server = end.server - start.server
    wrk = end.children - start.children
    machine = end.machine - start.machine
    return {
        "server_ms": server / requests * 1e3,
        "wrk_ms": wrk / requests * 1e3,
        "rest_ms": max(0.0, machine - server - wrk) / requests * 1e3,
        "machine_busy": machine / ((end.at - start.at) * (os.cpu_count() or 1)),
    }
