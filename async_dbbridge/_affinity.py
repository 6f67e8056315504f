"""`CPU_AFFINITY`: keep an event loop and the threads it hands work to on one CPU.

Every thread-sensitive call of a request is a hand-off of the GIL between the
loop's thread and the request's thread, and back: six per request to a sync
view with Django's default middleware fused (_middleware.py), sixteen unfused.
When the two threads sit on different CPUs, each hand-off wakes a thread on
the other CPU (an inter-processor interrupt, dearer still in a virtual machine)
while the first one still holds the GIL, so the woken thread goes back to sleep
until the GIL is released, and wakes again.
On one CPU a hand-off is a plain context switch when the holder blocks. The
process cannot run Python on two CPUs at once anyway; what it loses is running
C code that releases the GIL (a driver parsing a result) beside Python code.

Measured on the project-shaped benchmark (2 CPUs, one uvicorn worker, one-query
views, 32 clients): about 1.4x the requests per second with the loop and its
threads on one CPU (see docs/bench-project.md).

`pin_loop_thread()` runs on the loop's thread at lifespan startup (or the first
request without lifespan) and pins that thread alone (Linux's
`sched_setaffinity(0, ...)` applies to the calling thread); the request threads
and the bridge's workers it starts afterwards inherit the mask from it, as
every Linux thread inherits its creator's.

With `"auto"`, each process picks a CPU of its own: it takes an exclusive,
non-blocking `flock()` on one lock file per CPU in a directory of the user's
in the temporary directory and keeps the first it gets for the rest of its life
(the kernel drops the lock when the process ends, however it ends), so the
workers of one server — and of every server of the same user on the host —
spread over the CPUs the process may use. With more processes than CPUs the
rest share CPUs, chosen by process id.

Where pinning cannot help, the setting stands aside with one log line rather
than fail: on a platform without `sched_setaffinity` (not Linux), on a
free-threaded build (no GIL to hand over), and — for `"auto"` — in a container
whose CPU quota is smaller than the CPUs it may run on (Kubernetes limits,
`docker --cpus`: every container sees all the host's CPUs and only its own lock
directory, so each one's first worker would pin to the same CPU). A process
forked from a pinned thread gets the process's whole CPU set back; one started
with `subprocess` (fork and exec, no Python in between) keeps the pin of the
thread that started it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Final, Literal

from django.core.exceptions import ImproperlyConfigured

__all__ = ("Affinity", "allowed_cpus", "pin_loop_thread", "supported", "validate")

logger = logging.getLogger("async_dbbridge")

#: The setting's values: None (leave scheduling to the OS), "auto", or a CPU number.
Affinity = None | Literal["auto"] | int

_KEY: Final = "CPU_AFFINITY"

_lock = threading.Lock()
# The CPU this process chose (and the lock file that keeps it), once chosen.
_chosen: int | None = None
_held: IO[bytes] | None = None
_process_cpus: list[int] | None = None
# Whether this process pinned a thread (a forked child then restores its mask).
_pinned = False
# Reasons already logged: one line per reason per process, not per event loop.
_said: set[str] = set()


def supported() -> bool:
    """Whether this platform can pin threads (`os.sched_setaffinity`: Linux)."""
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def gil_enabled() -> bool:
    """False on a free-threaded build running without the GIL (Python 3.13+)."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


def cpu_quota() -> float | None:
    """The CPUs' worth of time this process's cgroup may use (cgroup v2 `cpu.max`,
    or v1 `cpu.cfs_quota_us`), or None when there is no quota or it cannot be read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            for base in (Path("/sys/fs/cgroup") / relative, Path("/sys/fs/cgroup")):
                try:
                    quota, period = (base / "cpu.max").read_text().split()[:2]
                except (OSError, ValueError):
                    continue
                return None if quota == "max" else int(quota) / int(period)
        elif "cpu" in controllers.split(","):  # cgroup v1
            for base in (Path("/sys/fs/cgroup/cpu") / relative, Path("/sys/fs/cgroup/cpu")):
                try:
                    quota_us = int((base / "cpu.cfs_quota_us").read_text())
                    period_us = int((base / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                return None if quota_us <= 0 else quota_us / period_us
    return None


def _say_once(reason: str, level: int = logging.WARNING) -> None:
    if reason not in _said:
        _said.add(reason)
        logger.log(level, "async_dbbridge: CPU_AFFINITY: %s; not pinning", reason)


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset).

    Read once, before the library pins anything, and kept: a pinned thread's
    own mask is its one CPU, and so is that of a process it forks, which must
    still choose among all of them.
    """
    global _process_cpus
    if _process_cpus is None:
        _process_cpus = sorted(os.sched_getaffinity(0))
    return _process_cpus


def validate(value: object, setting: str) -> Affinity:
    """The `CPU_AFFINITY` value, or `ImproperlyConfigured` naming what is wrong."""
    if value is None:
        return None
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ImproperlyConfigured(
            f"{setting}[{_KEY!r}] is {value!r}; expected None, 'auto' or a CPU number (>= 0)."
        )
    if isinstance(value, int):
        # Without affinity support (not Linux) pinning stands aside at startup,
        # with a warning: a settings file shared with a laptop still loads.
        cpus = allowed_cpus() if supported() else [value]
        if value not in cpus:
            raise ImproperlyConfigured(
                f"{setting}[{_KEY!r}] is {value}, but this process may only run on CPU(s) "
                f"{', '.join(map(str, cpus))}."
            )
        return value
    return "auto"


def pin_loop_thread(affinity: Affinity) -> int | None:
    """Pin the calling thread (the event loop's) as `affinity` says; the CPU, or None.

    Threads started by this thread afterwards inherit the pin. Failing to pin
    (a mask the kernel refuses, say after the container's cpuset changed) is
    logged as a warning, once per event loop started, and the thread runs
    unpinned: the setting is an optimisation, never a reason to refuse requests.
    """
    global _pinned
    if affinity is None:
        return None
    if not supported():
        _say_once("this platform cannot pin threads (os.sched_setaffinity is Linux-only)")
        return None
    if not gil_enabled():
        # The pin saves GIL hand-offs between CPUs; without a GIL it only costs.
        _say_once("a free-threaded build runs without the GIL", logging.INFO)
        return None
    # Read before the first pin: what a child forked from a pinned thread gets back.
    cpus = allowed_cpus()
    if affinity == "auto":
        quota = cpu_quota()
        if quota is not None and quota < len(cpus):
            _say_once(
                f"'auto' cannot know its CPUs: a CPU quota of {quota:g} CPU(s) but "
                f"{len(cpus)} CPUs to run on (a container limit without a cpuset); "
                "give each worker a CPU number, or a cpuset"
            )
            return None
    try:
        cpu = affinity if isinstance(affinity, int) else _auto_cpu()
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        logger.warning(
            "async_dbbridge: CPU_AFFINITY=%r: could not pin the event loop: %s", affinity, exc
        )
        return None
    _pinned = True
    return cpu


def _auto_cpu() -> int:
    """This process's CPU: the first whose lock file it could lock (kept), else by pid."""
    global _chosen, _held
    with _lock:
        if _chosen is not None:
            return _chosen
        cpus = allowed_cpus()
        directory = _lock_directory()
        if directory is not None:
            for cpu in cpus:
                handle = _try_lock(directory / f"cpu-{cpu}.lock")
                if handle is not None:
                    _chosen, _held = cpu, handle
                    return cpu
        # More processes than CPUs (or no lock directory): share, spread by pid.
        _chosen = cpus[os.getpid() % len(cpus)]
        return _chosen


def _lock_directory() -> Path | None:
    """The user's lock directory, if it is safe to use: ours, a real directory, private.

    In a shared temporary directory another user could create the path first
    (or a symlink there) to steer or block our choice.
    """
    directory = Path(tempfile.gettempdir()) / f"async_dbbridge-cpus-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as exc:
        logger.info("async_dbbridge: CPU_AFFINITY='auto' without lock files (%s): by pid", exc)
        return None
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        logger.warning(
            "async_dbbridge: CPU_AFFINITY='auto': %s is not a private directory of this "
            "user (a symlink, another owner, or writable by others): CPUs chosen by pid",
            directory,
        )
        return None
    return directory


def _try_lock(path: Path) -> IO[bytes] | None:
    import fcntl

    try:
        # O_NOFOLLOW: a lock file that is a symlink is refused, not followed.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        handle = os.fdopen(fd, "ab")  # kept open: the lock lives as long as it
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            logger.debug("flock(%s) failed", path, exc_info=True)
        return None
    return handle


def _reset_after_fork() -> None:
    """In a forked child: choose again. The parent's lock stays the parent's.

    The child shares the parent's open lock file (the same open file
    description, so the same `flock`): closing its copy of the descriptor
    leaves the parent's lock in place, where `LOCK_UN` would release it.
    """
    global _chosen, _held, _lock, _pinned
    _lock = threading.Lock()
    if _pinned and supported():
        # Forked from a pinned thread, the child has its one CPU; a worker
        # process forked by a server must choose among all of them again.
        try:
            os.sched_setaffinity(0, allowed_cpus())
        except OSError:
            pass
        _pinned = False
    if _held is not None:
        try:
            _held.close()
        except OSError:
            pass
    _chosen = None
    _held = None
