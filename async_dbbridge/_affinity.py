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
"""

from __future__ import annotations

import errno
import logging
import os
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


def supported() -> bool:
    """Whether this platform can pin threads (`os.sched_setaffinity`: Linux)."""
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


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
    if not supported():
        raise ImproperlyConfigured(
            f"{setting}[{_KEY!r}] is {value!r}, but this platform cannot pin threads to a "
            "CPU (os.sched_setaffinity is Linux-only); remove the key."
        )
    if isinstance(value, int):
        cpus = allowed_cpus()
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
    if affinity is None:
        return None
    try:
        cpu = affinity if isinstance(affinity, int) else _auto_cpu()
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        logger.warning(
            "async_dbbridge: CPU_AFFINITY=%r: could not pin the event loop: %s", affinity, exc
        )
        return None
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
    directory = Path(tempfile.gettempdir()) / f"async_dbbridge-cpus-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        logger.info("async_dbbridge: CPU_AFFINITY='auto' without lock files (%s): by pid", exc)
        return None
    return directory


def _try_lock(path: Path) -> IO[bytes] | None:
    import fcntl

    try:
        handle = open(path, "ab")  # noqa: SIM115  # kept open: the lock lives as long as it
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
    global _chosen, _held, _lock
    _lock = threading.Lock()
    if _held is not None:
        try:
            _held.close()
        except OSError:
            pass
    _chosen = None
    _held = None
