"""The `ASYNC_DBBRIDGE` setting: validated once, with errors that name the key.

```python
# settings.py
ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, "POOL_SIZE": 8}
```

Every key, with its type, default and effect, is in docs/settings.md; a test
(tests/test_docs.py) checks that page against `parse_settings()`, so the
defaults are written once, here.
"""

from __future__ import annotations

import difflib
import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from ._affinity import Affinity
from ._affinity import validate as validate_affinity
from ._connections import Policy
from ._validation import is_non_negative_int, is_number, is_positive_int

__all__ = ("BridgeSettings", "SettingsError", "get_settings", "parse_settings")

SETTING_NAME: Final = "ASYNC_DBBRIDGE"

#: Threads per process by default: the standard library's executor default,
#: which is also a sane number of connections per process for most servers.
DEFAULT_MAX_WORKERS: Final = min(32, (os.cpu_count() or 1) + 4)

_KEYS: Final = frozenset(
    {
        "MAX_WORKERS",
        "POLICY",
        "MAX_AGE",
        "IDLE_TIMEOUT",
        "DATABASES",
        "THREAD_NAME_PREFIX",
        "SHUTDOWN_TIMEOUT",
        "POOL_SIZE",
        "POOL_TIMEOUT",
        "HOLD",
        "CPU_AFFINITY",
        "FUSE_MIDDLEWARE",
        "MAX_WAITING",
        "ONE_HOP",
        "SYNC_REQUESTS",
        "PROCESSES",
        "WORKER_PROCESSES",
        "POOLERS",
        "CLOSE_STRANDED",
        "STRANDED_STACKS",
    }
)

DEFAULT_SHUTDOWN_TIMEOUT: Final = 10.0

#: How long a thread waits for one of its alias's pooled connections before
#: `PoolTimeout`: long enough to ride out a burst, short enough that a client
#: gets a 503 rather than a hung request when the pool is exhausted for good.
DEFAULT_POOL_TIMEOUT: Final = 5.0
#: Threads that may wait for one alias's pooled connection at once, per pooled
#: connection, by default: MAX_WAITING defaults to this many times POOL_SIZE.
#: Enough that a burst of many clients per connection queues instead of
#: failing (the project benchmark's overload runs 200 clients on POOL_SIZE 8);
#: few enough that a database stall parks a bounded number of request threads
#: rather than one more for every client retry.
MAX_WAITING_PER_CONNECTION: Final = 32
#: When a request thread gives a pooled connection back: "transaction" (after
#: each sync call, when it is idle) or "request" (at the request's end).
Hold = Literal["transaction", "request"]
HOLD_CHOICES: Final[tuple[Hold, ...]] = ("transaction", "request")
#: What stands between an alias and its server, as `POOLERS` says it: PgBouncer
#: in transaction or session pooling mode (None: nothing, the server itself).
Pooler = Literal["pgbouncer-transaction", "pgbouncer-session"]
POOLER_CHOICES: Final[tuple[Pooler, ...]] = ("pgbouncer-transaction", "pgbouncer-session")


@dataclass(frozen=True)
class BridgeSettings:
    max_workers: int
    policy: Policy
    idle_timeout: float | None
    databases: tuple[str, ...] | None
    thread_name_prefix: str
    # The ASGI wrapper's settings; defaults so that code building this by hand
    # keeps working.
    shutdown_timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT
    # The connection pool (one per alias per process). pool_size None: the
    # same as max_workers (parse_settings() always fills it in).
    pool_size: int | None = None
    pool_timeout: float = DEFAULT_POOL_TIMEOUT
    hold: Hold = "transaction"
    # The CPU the ASGI wrapper pins its event loop's thread (and so the threads
    # that loop starts) to: None (the OS decides), "auto", or a CPU number.
    cpu_affinity: Affinity = None
    # Whether the ASGI wrapper runs the outermost run of Django's
    # MiddlewareMixin layers in two thread hops per request (_middleware.py).
    fuse_middleware: bool = True
    # Threads that may wait for a pooled connection of one alias at once;
    # None: MAX_WAITING_PER_CONNECTION x the pool size (parse_settings()
    # leaves it None unless set, so the default follows POOL_SIZE).
    max_waiting: int | None = None
    # Whether the ASGI wrapper serves a request for a sync view in one call on
    # its thread (_one_hop.py).
    one_hop: bool = True
    # Requests for sync views whose sync part runs at once per event loop on the
    # one-hop path (_gate.py); None: POOL_SIZE (parse_settings() leaves it None
    # unless set, so the default follows POOL_SIZE); 0: no limit.
    sync_requests: int | None = None
    # The deployment, for the connection budget checks (checks.py, _deployment.py):
    # processes serving requests with these settings, on every host together
    # (None: unknown; WEB_CONCURRENCY is read instead), task-worker processes,
    # and the pooler in front of each alias that has one.
    processes: int | None = None
    worker_processes: int = 0
    poolers: Mapping[str, Pooler] = field(default_factory=dict)
    # Whether connections that Django opened on threads the library does not
    # own are closed once their thread has ended (_stranded.py), and whether
    # the stack that opened each is kept for the log line.
    close_stranded: bool = True
    stranded_stacks: bool = False

    @property
    def effective_pool_size(self) -> int:
        return self.max_workers if self.pool_size is None else self.pool_size

    @property
    def effective_max_waiting(self) -> int:
        if self.max_waiting is not None:
            return self.max_waiting
        return MAX_WAITING_PER_CONNECTION * self.effective_pool_size

    @property
    def effective_sync_requests(self) -> int:
        """`SYNC_REQUESTS` as set, or `POOL_SIZE` (0: no limit)."""
        if self.sync_requests is not None:
            return self.sync_requests
        return self.effective_pool_size

    def executor_kwargs(self) -> dict[str, Any]:
        return {
            "max_workers": self.max_workers,
            "policy": self.policy,
            "idle_timeout": self.idle_timeout,
            "databases": self.databases,
            "thread_name_prefix": self.thread_name_prefix,
        }


class SettingsError(ImproperlyConfigured):
    """`ASYNC_DBBRIDGE` is invalid: every problem found, each naming its key.

    The message lists them all, so one run of `manage.py check` (or one failed
    start) shows every mistake; `problems` holds them one by one (system check
    `async_dbbridge.E001` reports each as an error of its own).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        if len(problems) == 1:
            message = problems[0]
        else:
            message = f"{SETTING_NAME} has {len(problems)} problems:\n" + "\n".join(
                f"- {problem}" for problem in problems
            )
        super().__init__(message)


def _problem(key: str, value: object, expected: str) -> str:
    return f"{SETTING_NAME}[{key!r}] is {value!r}; expected {expected}."


def _unknown_key(key: object) -> str:
    """An unknown key, with the accepted key it most looks like (case aside), if any."""
    close = difflib.get_close_matches(str(key).upper(), sorted(_KEYS), n=1, cutoff=0.6)
    if close:
        return f"{SETTING_NAME} has no key {key!r}; did you mean {close[0]!r}?"
    return f"{SETTING_NAME} has no key {key!r}; accepted keys are {', '.join(sorted(_KEYS))}."


class _Checker:
    """Collects every problem of one `ASYNC_DBBRIDGE` value instead of stopping at the first.

    Each check returns a usable value either way (the default when the given
    one is invalid), so later checks that depend on it still run and report.
    """

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, key: str, value: object, expected: str) -> None:
        self.problems.append(_problem(key, value, expected))

    def flag(self, raw: Mapping[str, Any], key: str, default: bool) -> bool:
        """A switch: `True` or `False` (not 0/1 or "yes": a typo must not pass as a value)."""
        value = raw.get(key, default)
        if isinstance(value, bool):
            return value
        self.add(key, value, "True or False")
        return default

    def seconds(
        self, key: str, value: object, default: float | None, *, allow_none: bool, positive: bool
    ) -> float | None:
        """A duration: a finite number of seconds (within what a thread can wait), or None.

        NaN passes every comparison (`nan < 0` is false) and infinity overflows
        every wait and timestamp it reaches, each far from this key: both are
        refused here, by name. `None` is the way to say "no limit".
        """
        if value is None and allow_none:
            return None
        bound = "> 0" if positive else ">= 0"
        expected = f"a number of seconds {bound}" + (" or None (no limit)" if allow_none else "")
        if not is_number(value):
            self.add(key, value, expected)
            return default
        assert isinstance(value, int | float)  # is_number() checked it
        if isinstance(value, float) and math.isnan(value):
            self.add(key, value, expected + "; NaN is not a number of seconds")
            return default
        if value > threading.TIMEOUT_MAX or (isinstance(value, float) and math.isinf(value)):
            self.add(
                key,
                value,
                f"a finite number of seconds, at most threading.TIMEOUT_MAX "
                f"({threading.TIMEOUT_MAX:g})" + ("; None means no limit" if allow_none else ""),
            )
            return default
        number = float(value)
        if number < 0 or (positive and number == 0):
            self.add(key, value, expected)
            return default
        return number

    def positive_int(self, key: str, value: object, default: int, expected: str) -> int:
        if is_positive_int(value):
            assert isinstance(value, int)
            return value
        self.add(key, value, expected)
        return default


def parse_settings(raw: object) -> BridgeSettings:
    """Validate a raw `ASYNC_DBBRIDGE` value; raise `SettingsError` naming every problem.

    `SettingsError` is an `ImproperlyConfigured`.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SettingsError([f"{SETTING_NAME} must be a dict, not {type(raw).__name__}."])
    check = _Checker()
    check.problems.extend(_unknown_key(key) for key in raw if key not in _KEYS)

    max_workers = check.positive_int(
        "MAX_WORKERS",
        raw.get("MAX_WORKERS", DEFAULT_MAX_WORKERS),
        DEFAULT_MAX_WORKERS,
        "a positive integer",
    )

    policy_name = raw.get("POLICY", "request")
    max_age = raw.get("MAX_AGE")
    policy = Policy.request()
    if policy_name == "close":
        policy = Policy.always_close()
    elif policy_name == "max_age":
        policy = Policy.max_age(
            check.seconds("MAX_AGE", max_age, None, allow_none=True, positive=False)
        )
    elif policy_name != "request":
        check.add("POLICY", policy_name, "'request', 'close' or 'max_age'")
    if policy_name != "max_age" and max_age is not None:
        check.add("MAX_AGE", max_age, "None unless POLICY is 'max_age'")

    idle_timeout = check.seconds(
        "IDLE_TIMEOUT", raw.get("IDLE_TIMEOUT", 60.0), 60.0, allow_none=True, positive=True
    )

    databases = raw.get("DATABASES")
    if databases is not None:
        if (
            isinstance(databases, str)
            or not isinstance(databases, Iterable)
            or not all(isinstance(a, str) for a in databases)
        ):
            check.add("DATABASES", databases, "a list of database aliases or None")
            databases = None
        else:
            unknown_aliases = [a for a in databases if a not in settings.DATABASES]
            if unknown_aliases:
                check.add(
                    "DATABASES",
                    databases,
                    "aliases defined in settings.DATABASES "
                    f"({', '.join(sorted(settings.DATABASES))})",
                )
            databases = tuple(databases)

    prefix = raw.get("THREAD_NAME_PREFIX", "dbbridge")
    if not isinstance(prefix, str) or not prefix:
        check.add("THREAD_NAME_PREFIX", prefix, "a non-empty string")
        prefix = "dbbridge"

    shutdown_timeout = check.seconds(
        "SHUTDOWN_TIMEOUT",
        raw.get("SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT),
        DEFAULT_SHUTDOWN_TIMEOUT,
        allow_none=True,
        positive=False,
    )

    # A pooled connection serves one thread at a time, and the bridge's workers
    # are the threads that use it most: the same budget sizes both by default.
    pool_size = check.positive_int(
        "POOL_SIZE",
        raw.get("POOL_SIZE", max_workers),
        max_workers,
        "a positive integer (connections per alias)",
    )
    pool_timeout = check.seconds(
        "POOL_TIMEOUT",
        raw.get("POOL_TIMEOUT", DEFAULT_POOL_TIMEOUT),
        DEFAULT_POOL_TIMEOUT,
        allow_none=False,
        positive=True,
    )
    assert pool_timeout is not None  # allow_none=False
    max_waiting = raw.get("MAX_WAITING")
    if max_waiting is not None and not is_positive_int(max_waiting):
        check.add(
            "MAX_WAITING",
            max_waiting,
            "a positive integer (threads waiting for one alias's connection) or None "
            f"({MAX_WAITING_PER_CONNECTION} x POOL_SIZE)",
        )
        max_waiting = None
    hold = raw.get("HOLD", "transaction")
    if hold not in HOLD_CHOICES:
        check.add("HOLD", hold, "'transaction' or 'request'")
        hold = "transaction"
    cpu_affinity: Affinity = None
    try:
        cpu_affinity = validate_affinity(raw.get("CPU_AFFINITY"), SETTING_NAME)
    except ImproperlyConfigured as exc:
        check.problems.append(str(exc))
    fuse_middleware = check.flag(raw, "FUSE_MIDDLEWARE", True)
    one_hop = check.flag(raw, "ONE_HOP", True)
    sync_requests = raw.get("SYNC_REQUESTS")
    if sync_requests is not None and not is_non_negative_int(sync_requests):
        check.add(
            "SYNC_REQUESTS",
            sync_requests,
            "an integer >= 0 (sync-view requests running at once; 0: no limit) or None (POOL_SIZE)",
        )
        sync_requests = None

    processes = raw.get("PROCESSES")
    if processes is not None and not is_positive_int(processes):
        check.add(
            "PROCESSES",
            processes,
            "a positive integer (the processes serving requests, on every host together) "
            "or None (unknown: the WEB_CONCURRENCY environment variable, if set)",
        )
        processes = None
    worker_processes = raw.get("WORKER_PROCESSES", 0)
    if not is_non_negative_int(worker_processes):
        check.add(
            "WORKER_PROCESSES",
            worker_processes,
            "an integer >= 0 (task-worker processes: Celery, Dramatiq, Huey, RQ)",
        )
        worker_processes = 0
    poolers = _poolers(check, raw.get("POOLERS", {}))
    close_stranded = check.flag(raw, "CLOSE_STRANDED", True)
    stranded_stacks = check.flag(raw, "STRANDED_STACKS", False)

    if check.problems:
        raise SettingsError(check.problems)
    return BridgeSettings(
        max_workers=max_workers,
        policy=policy,
        idle_timeout=idle_timeout,
        databases=databases,
        thread_name_prefix=prefix,
        shutdown_timeout=shutdown_timeout,
        pool_size=pool_size,
        pool_timeout=pool_timeout,
        hold=hold,
        cpu_affinity=cpu_affinity,
        fuse_middleware=fuse_middleware,
        max_waiting=max_waiting,
        one_hop=one_hop,
        sync_requests=sync_requests,
        processes=processes,
        worker_processes=worker_processes,
        poolers=poolers,
        close_stranded=close_stranded,
        stranded_stacks=stranded_stacks,
    )


def _poolers(check: _Checker, value: object) -> dict[str, Pooler]:
    """`POOLERS`: alias -> the pooler in front of it; aliases mapped to None are left out."""
    expected = (
        "a dict of database aliases to "
        + ", ".join(repr(choice) for choice in POOLER_CHOICES)
        + " or None"
    )
    if not isinstance(value, Mapping):
        check.add("POOLERS", value, expected)
        return {}
    poolers: dict[str, Pooler] = {}
    for alias, pooler in value.items():
        if alias not in settings.DATABASES:
            check.add(
                "POOLERS",
                value,
                f"aliases defined in settings.DATABASES ({', '.join(sorted(settings.DATABASES))}); "
                f"{alias!r} is not one",
            )
        elif pooler is not None and pooler not in POOLER_CHOICES:
            check.add("POOLERS", value, f"{expected}; {alias!r} maps to {pooler!r}")
        elif pooler is not None:
            poolers[alias] = pooler
    return poolers


def get_settings() -> BridgeSettings:
    """The current `ASYNC_DBBRIDGE` setting, validated."""
    return parse_settings(getattr(settings, SETTING_NAME, None))
