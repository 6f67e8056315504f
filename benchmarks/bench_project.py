"""A project-shaped app: stock Django, Django's pool, the wrapper, WSGI and a2wsgi, one run.

One server process (one worker) serves ``benchmarks/project`` — the settings
``django-admin startproject`` generates (its seven middleware, admin, auth,
contenttypes, sessions, messages, staticfiles; sessions and auth migrated)
plus one app — and ``wrk`` drives it. Every request carries the session
cookie of a user logged in at setup (64 users, one session each, taken in
turn), so the views that look at ``request.user`` load a session row and a
user row through the middleware before running their own queries. Variants:

* ``stock`` — Django's ASGI handler under uvicorn, ``CONN_MAX_AGE=0``;
* ``djpool`` — Django's handler with psycopg's pool (``min_size = max_size =
  --pool-size``), ``CONN_MAX_AGE=0`` (PostgreSQL only);
* ``wrapper`` — ``async_dbbridge.asgi.get_asgi_application``, ``CONN_MAX_AGE=60``,
  ``ASYNC_DBBRIDGE`` from ``wrapper_settings()`` below (plus ``--wrapper-settings``),
  passed to the server as JSON; uvicorn with its standard extras (uvloop and
  httptools, which ``uvicorn[standard]`` installs and ``auto`` picks);
* ``wrapper-asyncio`` — the same under ``--loop asyncio --http h11``;
* ``wrapper-metrics`` (only with ``--variants``) — ``wrapper`` with the OpenTelemetry
  and Prometheus integrations recording (``BENCH_METRICS=1``, benchmarks/project/asgi.py);
* ``wsgi`` — the same project as WSGI (Django's ``get_wsgi_application``) under
  gunicorn: 1 worker, ``gthread``, ``--threads`` = ``--pool-size``,
  ``CONN_MAX_AGE=60``;
* ``a2wsgi`` — uvicorn + ``a2wsgi.WSGIMiddleware(get_wsgi_application(),
  workers=--pool-size)``, ``CONN_MAX_AGE=60``.

Every uvicorn but ``wrapper-asyncio``'s runs with ``--loop auto --http auto``:
uvloop and httptools, which the harness requires (``scripts/bootstrap.sh dev
--bench`` installs them with the other servers: the ``bench`` extra).

``--stack real`` serves every variant with what real projects put around
startproject's chain (``benchmarks/project/settings.py``): django-cors-headers
first (the requests carry an allowed ``Origin``), WhiteNoise right after
``SecurityMiddleware`` (serving ``collectstatic``'s output) and Sentry's
``DjangoIntegration`` with a local DSN nothing is sent to while nothing fails
(the report says if anything was).

Workloads (``--only``), each with the issue's target for the wrapper:

* ``a`` — async view awaiting 200 ms of I/O, no database, 64 clients:
  ≥ 0.95x stock req/s and p99 ≤ 1.1x stock's;
* ``b`` — async view: a query, 100 ms of I/O, a query, 64 clients:
  ≥ 2x Django's pool req/s (PostgreSQL) on ≤ pool-size server sessions;
* ``c`` — a one-query sync view and a one-query async-ORM view, 32 clients:
  ≥ 1.3x Django's pool (PostgreSQL), ≥ 2x stock (MariaDB); and for the sync
  view (``c-sync``, issue #18), the wrapper (either loop) ≥ 1.0x a2wsgi and
  ≥ 0.9x WSGI;
* ``d`` — sync view with a 50 ms query (``pg_sleep`` / ``SLEEP``), 200 clients:
  sessions never above the pool size, no "too many connections", every
  response a 2xx or a 503 (PostgreSQL and MariaDB only).

Every (variant, workload) pair gets its own server per round: started,
checked (a request with a session cookie must be logged in, one without must
not), warmed up, measured while another connection samples the server's
sessions on the benchmark database (``pg_stat_activity`` / ``PROCESSLIST``; on
SQLite the server's descriptors on the file), left idle until its session
count settles, stopped with SIGTERM, and its sessions counted again once it
has exited. Rounds interleave the pairs (orders rotated each round); figures
are medians, ratios medians of per-round ratios.

Run from the repository root (docs/bench-project.md says more):

```console
.venv/bin/python benchmarks/bench_project.py [--backend postgresql|mysql|sqlite]
    [--quick] [--rounds N] [--duration S]
    [--variants stock,djpool,wrapper,wrapper-asyncio,wsgi,a2wsgi,wrapper-metrics]
    [--stack startproject|real] [--only a,b,c,d] [--pool-size N] [--wrapper-settings JSON]
    [--wrapper-src DIR] [--json FILE] [--chart PNG | --no-chart]
.venv/bin/python benchmarks/bench_project.py --replot FILE.json [--chart PNG]
```

It creates its database, ``dbbridge_bench_project``, and a role of that name
the servers connect as, capped by the database server at ``--session-cap``
sessions (70) so that stock Django at 200 clients cannot take every slot of a
shared server; it drops whatever a crashed run left first, and drops both at
the end. One run per machine at a time (a lock file; a second run waits).
The exit status is 0 when the run completed, whatever the targets say; 2 if
the harness itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

# Run as a script, benchmarks/ is sys.path[0]: the repository root makes the
# shared helpers (and the served project) importable as the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common
from benchmarks._common import (
    ROOT,
    CpuSnapshot,
    GunicornServer,
    HarnessError,
    Sampler,
    ServerProcess,
    UvicornServer,
    WrkResult,
    clean_exit,
    cpu_per_request,
    error_summary,
    interleaved,
    run_harness,
    settle,
    split_option,
)

#: The benchmark's database and role; BENCH_PROJECT_DB_NAME picks another, so that two runs
#: on one machine (two checkouts) do not drop each other's database.
DB_NAME: Final = os.environ.get("BENCH_PROJECT_DB_NAME", "dbbridge_bench_project")
SETTINGS_MODULE: Final = "benchmarks.project.settings"
APPLICATION: Final = "benchmarks.project.asgi:application"
WSGI_APPLICATION: Final = "benchmarks.project.wsgi:application"
WRK_SCRIPT: Final = ROOT / "benchmarks" / "project" / "wrk_statuses.lua"

VARIANTS: Final = (
    "stock",
    "djpool",
    "wrapper",
    "wrapper-asyncio",
    "wsgi",
    "a2wsgi",
    "wrapper-metrics",
)
#: Only when asked for (``--variants``): the wrapper with both metrics integrations
#: recording (``BENCH_METRICS=1``), against ``wrapper`` in the same rounds.
OPT_IN_VARIANTS: Final = ("wrapper-metrics",)
#: With ``--baseline-src``: the wrapper served from another checkout, in the same rounds.
BASELINE: Final = "baseline"
#: The variants that serve the wrapper (``BENCH_VARIANT=wrapper`` in the settings).
WRAPPERS: Final = ("wrapper", "wrapper-asyncio", "wrapper-metrics", BASELINE)
BACKENDS: Final = ("postgresql", "mysql", "sqlite")
STACKS: Final = ("startproject", "real")
#: The ``Origin`` of the requests on ``--stack real`` (the settings' CORS_ALLOWED_ORIGINS).
CORS_ORIGIN: Final = "http://app.bench.test"
#: A file of ``collectstatic``'s output WhiteNoise must serve on ``--stack real``.
STATIC_PROBE: Final = "/static/admin/css/base.css"

#: What a variant or stack needs installed: (module, distribution).
_NEEDS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "wrapper": (("uvloop", "uvloop"), ("httptools", "httptools")),
    "wsgi": (("gunicorn", "gunicorn"),),
    "a2wsgi": (("a2wsgi", "a2wsgi"),),
    "real": (
        ("corsheaders", "django-cors-headers"),
        ("whitenoise", "whitenoise"),
        ("sentry_sdk", "sentry-sdk"),
    ),
}


def wrapper_settings(pool_size: int) -> dict[str, Any]:
    """The wrapper variant's ``ASYNC_DBBRIDGE``: the one place to change when the library's do.

    The library's defaults but for the size: one pool of ``POOL_SIZE``
    connections per alias bounds the process's sessions (request threads and
    the bridge's workers share it), and the bridge gets as many threads.
    ``CPU_AFFINITY`` is not set (the library's default, what issue #18's
    targets are measured on); ``--wrapper-settings '{"CPU_AFFINITY": "auto"}'``
    pins the loop and its request threads to one CPU, as the runs before
    issue #18 did (``--pin-others`` then pins the other variants with
    ``taskset`` for the like-for-like comparison). Whatever this returns
    (merged with ``--wrapper-settings``) reaches the server as JSON, unchanged.
    """
    return {"MAX_WORKERS": pool_size, "POOL_SIZE": pool_size}


@dataclass(frozen=True)
class Workload:
    key: str
    #: The letter ``--only`` selects and the targets are named by.
    group: str
    path: str
    connections: int
    title: str


WORKLOADS: Final = (
    Workload("a", "a", "/io/", 64, "async view, 200 ms of I/O, no database"),
    Workload("b", "b", "/query-io-query/", 64, "async ORM: query, 100 ms of I/O, query"),
    Workload("c-sync", "c", "/one-query/sync/", 32, "sync view, one query"),
    Workload("c-async", "c", "/one-query/async/", 32, "async view, one async-ORM query"),
    Workload("d", "d", "/slow-query/", 200, "sync view, one 50 ms query"),
)
WORKLOAD_BY_KEY: Final = {w.key: w for w in WORKLOADS}
GROUPS: Final = ("a", "b", "c", "d")

# The issue's targets for the wrapper (acceptance 1 of #10).
A_RATE: Final = 0.95
A_P99: Final = 1.1
B_VS_POOL: Final = 2.0
C_VS_POOL: Final = 1.3
C_VS_STOCK: Final = 2.0
# Issue #18: the sync view against the same project served as WSGI.
C_SYNC_VS_A2WSGI: Final = 1.0
C_SYNC_VS_WSGI: Final = 0.9

#: A server refusing a session, as drivers word it (PostgreSQL: past max_connections or
#: the role's limit; MariaDB: past max_connections or MAX_USER_CONNECTIONS).
TOO_MANY: Final = re.compile(
    r"too many (clients|connections)|remaining connection slots|max_user_connections",
    re.IGNORECASE,
)


# -- configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    backend: str
    variants: tuple[str, ...]
    workloads: tuple[str, ...]
    rounds: int
    #: Seconds of each measured wrk run, and of the warm-up burst before it.
    duration: float
    warmup: float
    pool_size: int
    #: ASYNC_DBBRIDGE for the wrapper variant, as passed to the server.
    wrapper_settings: dict[str, Any]
    #: A checkout whose async_dbbridge the servers import first (None: this repository's).
    wrapper_src: str | None
    #: Another checkout served as the "baseline" variant, interleaved with the others,
    #: so that a change is compared with what it changes in one run (None: no baseline).
    baseline_src: str | None
    #: ASYNC_DBBRIDGE for the baseline variant (default: the wrapper's).
    baseline_settings: dict[str, Any] | None
    #: A CPU the stock and Django-pool servers are pinned to with taskset (None: not pinned).
    pin_others: int | None
    #: Logged-in users (one session each) whose cookies the requests carry in turn.
    sessions: int
    #: The most sessions the servers' role may hold (0: no cap).
    session_cap: int
    wrk_threads: int
    #: CONN_HEALTH_CHECKS on the served alias, in every variant alike.
    health_checks: bool = False
    #: The middleware around the app: startproject's, or a real project's (see settings.py).
    stack: str = "startproject"
    #: wrk's per-request timeout: longer than any queue the slow workloads build.
    wrk_timeout: float = 10.0
    start_timeout: float = 60.0
    stop_timeout: float = 30.0
    settle_stable: float = 0.3
    idle_timeout: float = 2.0
    after_timeout: float = 5.0
    sample_interval: float = 0.05

    @property
    def session_bound(self) -> int:
        """The server sessions the wrapper may hold: its pool, once it has one."""
        return int(self.wrapper_settings.get("POOL_SIZE", self.pool_size))


# -- the database ---------------------------------------------------------------------


def _setup_django(database: Database, stack: str) -> None:
    # The harness reads the servers' settings module as the stock variant:
    # alias "default" is the servers' role (it migrates, so the role owns the
    # tables), "admin" creates the database and counts sessions. The stack's
    # apps and STATIC_ROOT as the servers', without Sentry (BENCH_ROLE).
    os.environ.update(
        {
            **database.server_env(),
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "BENCH_VARIANT": "stock",
            "BENCH_STACK": stack,
            "BENCH_STATIC_ROOT": database.static_root,
            "BENCH_ROLE": "harness",
        }
    )
    import django

    django.setup()


@dataclass
class Database(_common.BenchDatabase):
    """The benchmark database, the role the servers connect as, and the logged-in sessions."""

    session_keys: list[str] = field(default_factory=list)
    #: ``--stack real``: where collectstatic put the files WhiteNoise serves ("" otherwise).
    static_root: str = ""

    def create(self, sessions: int) -> None:
        """Drop what a crashed run left, then create, migrate, seed and log users in."""
        from django.core.management import call_command

        self._create_objects()
        call_command("migrate", database="default", interactive=False, verbosity=0)
        self._seed(sessions)
        if self.static_root:
            call_command("collectstatic", interactive=False, verbosity=0)
        self._created()

    def _seed(self, sessions: int) -> None:
        from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
        from django.contrib.auth.hashers import make_password
        from django.contrib.auth.models import User
        from django.contrib.sessions.backends.db import SessionStore

        from benchmarks.project.benchapp.models import Item

        Item.objects.bulk_create(Item(pk=n, name=f"item {n}", value=n) for n in range(1, 11))
        # Unusable passwords: hashing 64 real ones would take longer than the
        # run, and a session's auth hash only needs the stored value.
        User.objects.bulk_create(
            User(username=f"bench-{n}", password=make_password(None)) for n in range(sessions)
        )
        # What django.contrib.auth.login() leaves in the session store, without
        # a request (MariaDB's bulk_create does not set primary keys: read back).
        self.session_keys = []
        for user in User.objects.filter(username__startswith="bench-").order_by("pk"):
            store = SessionStore()
            store[SESSION_KEY] = user._meta.pk.value_to_string(user)
            store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
            store[HASH_SESSION_KEY] = user.get_session_auth_hash()
            store.create()
            assert store.session_key is not None
            self.session_keys.append(store.session_key)


# -- one measurement ------------------------------------------------------------------


def start_server(variant: str, config: Config, database: Database, log: IO[bytes]) -> ServerProcess:
    """One server process serving the project as ``variant`` (not yet ready)."""
    env = {
        **database.server_env(),
        "BENCH_VARIANT": variant,
        "BENCH_STACK": config.stack,
        "BENCH_STATIC_ROOT": database.static_root,
        "BENCH_POOL_SIZE": str(config.pool_size),
        "BENCH_HEALTH_CHECKS": "1" if config.health_checks else "0",
        "BENCH_ASYNC_DBBRIDGE": json.dumps(
            config.baseline_settings
            if variant == BASELINE and config.baseline_settings is not None
            else config.wrapper_settings
        ),
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
    }
    wrapper = variant in WRAPPERS
    if wrapper:
        env["BENCH_VARIANT"] = "wrapper"  # the settings know the library, not its source
    if variant == "wrapper-metrics":
        env["BENCH_METRICS"] = "1"
    # Only the harness's settings leave Sentry out.
    unset = ("BENCH_ROLE",)
    if variant == "wsgi":
        return GunicornServer(
            variant,
            WSGI_APPLICATION,
            threads=config.pool_size,
            env=env,
            log=log,
            cpu=config.pin_others,
            unset=unset,
        )
    src = config.baseline_src if variant == BASELINE else config.wrapper_src
    asyncio_h11 = variant == "wrapper-asyncio"
    return UvicornServer(
        variant,
        APPLICATION,
        env=env,
        # Django's own handler raises on the lifespan protocol, which
        # uvicorn's "on" turns into a failed startup (a2wsgi has none
        # either); the wrapper needs it.
        lifespan="on" if wrapper else "off",
        log=log,
        library_src=src if wrapper else None,
        cpu=None if wrapper else config.pin_others,
        unset=unset,
        loop="asyncio" if asyncio_h11 else "auto",
        http="h11" if asyncio_h11 else "auto",
    )


def check_server(server: ServerProcess, config: Config, session_key: str) -> dict[str, Any]:
    """Is the server what the variant and stack say? Else nothing is measured. Returns /stats/."""
    label = server.label
    stats = server.get_json("/stats/")
    if label in WRAPPERS:
        # A wrapper server must run the checkout it was given, not whichever comes first.
        src = config.baseline_src if label == BASELINE else config.wrapper_src
        expected = Path(src or ROOT, "async_dbbridge", "__init__.py").resolve()
        served = Path(stats["library"]["file"]).resolve()
        if served != expected:
            raise HarnessError(f"{label}: the server imported {served}, not {expected}")
        if stats["bridge"] is None:
            raise HarnessError(f"{label}: async_dbbridge is not in the server's INSTALLED_APPS")
    if label != "wsgi" and label != "a2wsgi":
        # The stats view is async: under an ASGI handler it runs on uvicorn's loop.
        loop = "asyncio" if label == "wrapper-asyncio" else "uvloop"
        if stats["loop"] != loop:
            raise HarnessError(f"{label}: the server runs on {stats['loop']}'s loop, not {loop}'s")
    conn_max_age = 0 if label in ("stock", "djpool") else 60
    if stats["conn_max_age"] != conn_max_age:
        raise HarnessError(
            f"{label}: the server runs CONN_MAX_AGE={stats['conn_max_age']}, not {conn_max_age}"
        )
    if stats["stack"] != config.stack:
        raise HarnessError(f"{label}: the server's stack is {stats['stack']}, not {config.stack}")
    cookie = {"Cookie": f"sessionid={session_key}"}
    if config.stack == "real":
        cookie["Origin"] = CORS_ORIGIN
        sentry = stats["sentry"] or {}
        if not sentry.get("active") or "django" not in sentry.get("integrations", ()):
            raise HarnessError(f"{label}: Sentry's DjangoIntegration is not active: {sentry}")
    status, headers, body = _common.http_request(server.port, "/whoami/", 10.0, cookie)
    if status != 200 or not body.startswith(b"bench-"):
        raise HarnessError(f"{label}: a logged-in request got {status}: {body[:200]!r}")
    if config.stack == "real":
        allowed = headers.get("access-control-allow-origin")
        if allowed != CORS_ORIGIN:
            raise HarnessError(
                f"{label}: django-cors-headers answered Access-Control-Allow-Origin {allowed!r}"
            )
        status, _, body = _common.http_request(server.port, STATIC_PROBE, 10.0)
        if status != 200 or not body:
            raise HarnessError(f"{label}: WhiteNoise did not serve {STATIC_PROBE} ({status})")
    status, body = _common.http_get(server.port, "/whoami/", timeout=10.0)
    if status != 403:
        raise HarnessError(f"{label}: an anonymous request got {status}, not 403")
    return stats


@dataclass
class Sample:
    """One (variant, workload) server in one round."""

    variant: str
    workload: str
    round: int
    ok_per_s: float
    requests: int
    seconds: float
    #: Responses by HTTP status (the wrk script's count).
    statuses: dict[str, int]
    non_2xx: int
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    sessions_before: int
    sessions_peak: int
    sessions_mean: float
    sessions_idle: int
    sessions_after: int
    #: Server log lines, during the measured run, saying the database refused a session.
    too_many: int
    exit_code: int | None
    stop_seconds: float
    stats: dict[str, Any]
    errors: dict[str, int]
    cpu: dict[str, float]
    #: ``--stack real``: events Sentry was handed in the server's life (0: nothing sent).
    sentry_events: int = 0
    #: The wrapper's startup line ("async_dbbridge started ..."; "" for the others).
    startup: str = ""


def _startup_line(log: str) -> str:
    for line in log.splitlines():
        if "async_dbbridge started" in line:
            return line.split("async_dbbridge started", 1)[1].strip()
    return ""


def _wrk(
    url: str, seconds: float, workload: Workload, config: Config, database: Database
) -> WrkResult:
    return _common.run_wrk(
        url,
        seconds,
        connections=workload.connections,
        threads=config.wrk_threads,
        timeout=config.wrk_timeout,
        script=WRK_SCRIPT,
        script_args=[
            ",".join(database.session_keys),
            *([CORS_ORIGIN] if config.stack == "real" else []),
        ],
    )


def measure(
    variant: str, workload: Workload, round_no: int, config: Config, database: Database
) -> Sample:
    def count() -> int:
        return database.count_sessions(server.pid)

    with tempfile.TemporaryFile() as log:
        server = start_server(variant, config, database, log)
        try:
            server.wait_ready(config.start_timeout)
            check_server(server, config, database.session_keys[0])
            before = settle(count, config.idle_timeout, config.settle_stable)
            url = server.url(workload.path)
            # Threads, connections and pools start during the burst; the
            # measured run sees a server in its steady state.
            _wrk(url, config.warmup, workload, config, database)
            # wrk closes its connections, but the server finishes the requests
            # it had in flight: let them drain (bounded), so that their errors
            # are not counted against the measured run.
            settle(count, config.idle_timeout, config.settle_stable)
            # The server's log from here on is the measured run's (and after).
            measured_from = os.fstat(log.fileno()).st_size
            with Sampler(count, config.sample_interval) as sampler:
                cpu_start = CpuSnapshot.take(server.pid)
                result = _wrk(url, config.duration, workload, config, database)
                cpu_end = CpuSnapshot.take(server.pid)
            measured_to = os.fstat(log.fileno()).st_size
            idle = settle(count, config.idle_timeout, config.settle_stable)
            stats = server.get_json("/stats/")
        finally:
            exit_code, stop_seconds = server.stop(config.stop_timeout)
        after = settle(count, config.after_timeout, config.settle_stable)
        text = server.log_text()
        log.seek(measured_from)
        measured_log = log.read(measured_to - measured_from).decode(errors="replace")
    if not result.statuses and result.requests:
        raise HarnessError(f"{variant}/{workload.key}: the wrk script counted no statuses")
    ok = sum(n for status, n in result.statuses.items() if status.startswith("2"))
    samples = sampler.samples or [0]
    return Sample(
        variant=variant,
        workload=workload.key,
        round=round_no,
        ok_per_s=ok / result.seconds if result.seconds else 0.0,
        requests=result.requests,
        seconds=result.seconds,
        statuses=result.statuses,
        non_2xx=sum(result.statuses.values()) - ok,
        socket_errors=result.socket_errors,
        latency_ms=result.latency_ms,
        sessions_before=before,
        sessions_peak=max(samples),
        sessions_mean=statistics.fmean(samples),
        sessions_idle=idle,
        sessions_after=after,
        too_many=sum(1 for line in measured_log.splitlines() if TOO_MANY.search(line)),
        exit_code=exit_code,
        stop_seconds=stop_seconds,
        stats=stats,
        errors=dict(list(error_summary(text).items())[:5]),
        cpu=cpu_per_request(cpu_start, cpu_end, result.requests),
        sentry_events=int((stats.get("sentry") or {}).get("events", 0)),
        startup=_startup_line(text),
    )


# -- results --------------------------------------------------------------------------


@dataclass
class Summary:
    variant: str
    workload: str
    ok_per_s: float
    ok_per_s_min: float
    ok_per_s_max: float
    p50_ms: float
    p99_ms: float
    vs_stock: float | None
    vs_djpool: float | None
    p99_vs_stock: float | None
    vs_baseline: float | None
    requests: int
    #: Non-2xx responses by status, summed over the rounds.
    non_2xx: dict[str, int]
    socket_errors: int
    too_many: int
    sessions_peak: int
    sessions_idle: int
    sessions_after: int
    connects_per_request: float
    unclean_exits: int
    cpu: dict[str, float]
    vs_wsgi: float | None = None
    vs_a2wsgi: float | None = None
    #: ``--stack real``: Sentry events over the rounds (0: nothing was sent).
    sentry_events: int = 0


@dataclass
class Check:
    workload: str
    #: PASS, FAIL, or INFO (not measurable here).
    status: str
    text: str
    #: The row the check is about.
    variant: str = "wrapper"

    @property
    def mark(self) -> str:
        return {"PASS": "✅", "FAIL": "❌"}.get(self.status, "—")


@dataclass
class Report:
    environment: dict[str, Any]
    config: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    summary: list[Summary] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def _paired(
    samples: Sequence[Sample],
    variant: str,
    base: str,
    workload: str,
    value: Callable[[Sample], float],
) -> float | None:
    """Median over rounds of value(variant) / value(base), each pair from the same round."""
    by_round: dict[int, dict[str, Sample]] = {}
    for s in samples:
        if s.workload == workload:
            by_round.setdefault(s.round, {})[s.variant] = s
    ratios = [
        value(row[variant]) / value(row[base])
        for row in by_round.values()
        if variant in row and base in row and value(row[base]) > 0
    ]
    return statistics.median(ratios) if ratios else None


def _rate(s: Sample) -> float:
    return s.ok_per_s


def _p99(s: Sample) -> float:
    return s.latency_ms.get("p99", 0.0)


def summarize(samples: Sequence[Sample], config: Config) -> list[Summary]:
    summaries = []
    for key in config.workloads:
        for variant in config.variants:
            mine = [s for s in samples if s.variant == variant and s.workload == key]
            if not mine:
                continue
            rates = [s.ok_per_s for s in mine]
            non_2xx: dict[str, int] = {}
            for s in mine:
                for status, n in s.statuses.items():
                    if not status.startswith("2"):
                        non_2xx[status] = non_2xx.get(status, 0) + n
            requests = sum(s.requests for s in mine)
            connects = sum(int(s.stats.get("connects", 0)) for s in mine)
            summaries.append(
                Summary(
                    variant=variant,
                    workload=key,
                    ok_per_s=statistics.median(rates),
                    ok_per_s_min=min(rates),
                    ok_per_s_max=max(rates),
                    p50_ms=statistics.median(s.latency_ms.get("p50", 0.0) for s in mine),
                    p99_ms=statistics.median(_p99(s) for s in mine),
                    vs_stock=_paired(samples, variant, "stock", key, _rate),
                    vs_djpool=_paired(samples, variant, "djpool", key, _rate),
                    p99_vs_stock=_paired(samples, variant, "stock", key, _p99),
                    vs_baseline=_paired(samples, variant, BASELINE, key, _rate),
                    requests=requests,
                    non_2xx=dict(sorted(non_2xx.items())),
                    socket_errors=sum(sum(s.socket_errors.values()) for s in mine),
                    too_many=sum(s.too_many for s in mine),
                    sessions_peak=max(s.sessions_peak for s in mine),
                    sessions_idle=max(s.sessions_idle for s in mine),
                    sessions_after=max(s.sessions_after for s in mine),
                    # Warm-ups included in the connects, not in the requests:
                    # an upper bound, good enough to tell 1 per request from 0.
                    connects_per_request=connects / requests if requests else 0.0,
                    unclean_exits=sum(not clean_exit(s.exit_code) for s in mine),
                    cpu={
                        k: statistics.median(s.cpu[k] for s in mine)
                        for k in mine[0].cpu
                        if all(k in s.cpu for s in mine)
                    },
                    vs_wsgi=_paired(samples, variant, "wsgi", key, _rate),
                    vs_a2wsgi=_paired(samples, variant, "a2wsgi", key, _rate),
                    sentry_events=sum(s.sentry_events for s in mine),
                )
            )
    return summaries


def check_targets(summary: Sequence[Summary], config: Config) -> list[Check]:
    """The issue's targets, for the wrapper's rows: PASS, FAIL, or INFO when not measurable."""
    by_key = {(s.variant, s.workload): s for s in summary}
    checks: list[Check] = []
    server = config.backend != "sqlite"

    def ratio(
        key: str, value: float | None, op: str, bound: float, what: str, variant: str = "wrapper"
    ) -> None:
        if value is None:
            checks.append(
                Check(key, "INFO", f"{what} {op} {bound:g}x: not measured in this run", variant)
            )
            return
        ok = value >= bound if op == ">=" else value <= bound
        checks.append(
            Check(key, "PASS" if ok else "FAIL", f"{what} {op} {bound:g}x: {value:.2f}x", variant)
        )

    def sessions(key: str, wrapper: Summary) -> None:
        bound = config.session_bound
        ok = wrapper.sessions_peak <= bound
        checks.append(
            Check(
                key,
                "PASS" if ok else "FAIL",
                f"server sessions <= {bound}: peak {wrapper.sessions_peak}",
            )
        )

    for key in config.workloads:
        if key == "c-sync":
            # Issue #18: the wrapper's sync view against the project served as WSGI,
            # on either loop (wrapper-asyncio: asyncio + h11; a2wsgi runs uvloop).
            for variant in ("wrapper", "wrapper-asyncio"):
                row = by_key.get((variant, key))
                if row is None:
                    continue
                if "a2wsgi" in config.variants:
                    ratio(key, row.vs_a2wsgi, ">=", C_SYNC_VS_A2WSGI, "req/s vs a2wsgi", variant)
                if "wsgi" in config.variants:
                    ratio(key, row.vs_wsgi, ">=", C_SYNC_VS_WSGI, "req/s vs WSGI gthread", variant)
        wrapper = by_key.get(("wrapper", key))
        if wrapper is None:
            continue
        if key == "a":
            ratio(key, wrapper.vs_stock, ">=", A_RATE, "req/s vs stock")
            ratio(key, wrapper.p99_vs_stock, "<=", A_P99, "p99 vs stock")
        elif key == "b":
            if config.backend == "postgresql":
                ratio(key, wrapper.vs_djpool, ">=", B_VS_POOL, "req/s vs Django's pool")
            if server:
                sessions(key, wrapper)
        elif key in ("c-sync", "c-async"):
            if config.backend == "postgresql":
                ratio(key, wrapper.vs_djpool, ">=", C_VS_POOL, "req/s vs Django's pool")
            elif config.backend == "mysql":
                ratio(key, wrapper.vs_stock, ">=", C_VS_STOCK, "req/s vs stock")
        elif key == "d":
            sessions(key, wrapper)
            checks.append(
                Check(
                    key,
                    "PASS" if wrapper.too_many == 0 else "FAIL",
                    f"'too many connections': {wrapper.too_many}",
                )
            )
            # A socket error (timeout, reset) is a request that got no response at all.
            bad = sum(n for status, n in wrapper.non_2xx.items() if status != "503")
            bad += wrapper.socket_errors
            checks.append(
                Check(
                    key,
                    "PASS" if bad == 0 else "FAIL",
                    f"responses other than 2xx/503 (socket errors included): {bad}",
                )
            )
    return checks


# -- the report -----------------------------------------------------------------------


def _variant_label(variant: str, config: Config) -> str:
    pinned = "" if config.pin_others is None else f", taskset -c {config.pin_others}"
    if variant == "stock":
        return f"stock, CONN_MAX_AGE=0{pinned}"
    if variant == "djpool":
        return f"Django pool ({config.pool_size}), CONN_MAX_AGE=0{pinned}"
    if variant == "wsgi":
        return (
            f"WSGI: gunicorn gthread, 1 worker, {config.pool_size} threads, CONN_MAX_AGE=60{pinned}"
        )
    if variant == "a2wsgi":
        return f"a2wsgi ({config.pool_size} workers), CONN_MAX_AGE=60{pinned}"
    if variant == BASELINE:
        settings = (
            config.wrapper_settings
            if config.baseline_settings is None
            else config.baseline_settings
        )
        affinity = settings.get("CPU_AFFINITY")
        where = "" if affinity is None else f", CPU_AFFINITY={affinity!r}"
        return f"baseline wrapper ({config.baseline_src}), CONN_MAX_AGE=60{where}"
    affinity = config.wrapper_settings.get("CPU_AFFINITY")
    loop = "asyncio + h11" if variant == "wrapper-asyncio" else "uvloop + httptools"
    if variant == "wrapper-metrics":
        loop += ", OpenTelemetry and Prometheus recording"
    return f"wrapper ({loop}), CONN_MAX_AGE=60" + (
        "" if affinity is None else f", CPU_AFFINITY={affinity!r}"
    )


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _non_2xx(s: Summary) -> str:
    parts = [f"{n:,} x {status}" for status, n in s.non_2xx.items()]
    if s.socket_errors:
        parts.append(f"{s.socket_errors:,} socket")
    return ", ".join(parts) if parts else "0"


def markdown_table(report: Report, config: Config) -> str:
    checks: dict[str, list[Check]] = {}
    for check in report.checks:
        checks.setdefault(check.workload, []).append(check)
    baseline = config.baseline_src is not None
    wsgi = "wsgi" in config.variants
    a2wsgi = "a2wsgi" in config.variants
    extra = int(baseline) + int(wsgi) + int(a2wsgi)
    lines = [
        "| workload | variant | req/s (2xx) | p99 ms | non-2xx | too many conns "
        "| peak sessions | vs stock | vs Django pool | p99 vs stock "
        + ("| vs WSGI " if wsgi else "")
        + ("| vs a2wsgi " if a2wsgi else "")
        + ("| vs baseline " if baseline else "")
        + "| targets |",
        "|---|---|" + "---:|" * (8 + extra) + "---|",
    ]
    for s in report.summary:
        targets = "<br>".join(
            f"{c.mark} {c.text}" for c in checks.get(s.workload, []) if c.variant == s.variant
        )
        lines.append(
            f"| {s.workload} | {_variant_label(s.variant, config)} | {s.ok_per_s:,.0f} "
            f"| {s.p99_ms:,.0f} | {_non_2xx(s)} | {s.too_many:,} | {s.sessions_peak} "
            f"| {_ratio(s.vs_stock)} | {_ratio(s.vs_djpool)} | {_ratio(s.p99_vs_stock)} "
            + (f"| {_ratio(s.vs_wsgi)} " if wsgi else "")
            + (f"| {_ratio(s.vs_a2wsgi)} " if a2wsgi else "")
            + (f"| {_ratio(s.vs_baseline)} " if baseline else "")
            + f"| {targets} |"
        )
    return "\n".join(lines)


def print_report(report: Report, config: Config) -> None:
    env = report.environment
    print(
        f"## bench_project: {env['server']}, Python {env['python']}, Django {env['django']}, "
        f"asgiref {env['asgiref']}, uvicorn {env['uvicorn']}, async_dbbridge "
        f"{env['async_dbbridge']}, {env['cpus']} CPUs"
    )
    print()
    cap = f"{config.session_cap}" if config.session_cap else "none"
    servers = [f"uvloop {env.get('uvloop')}, httptools {env.get('httptools')}"]
    if "wsgi" in config.variants:
        servers.append(f"gunicorn {env.get('gunicorn')}")
    if "a2wsgi" in config.variants:
        servers.append(f"a2wsgi {env.get('a2wsgi')}")
    if config.stack == "real":
        servers.append(
            f"django-cors-headers {env.get('django-cors-headers')}, whitenoise "
            f"{env.get('whitenoise')}, sentry-sdk {env.get('sentry-sdk')}"
        )
    stack = (
        "startproject's middleware"
        if config.stack == "startproject"
        else "real stack: CorsMiddleware first, WhiteNoise after SecurityMiddleware, "
        "Sentry's DjangoIntegration"
    )
    print(f"Stack: {stack}. {'; '.join(servers)}.")
    print()
    print(
        f"One server process, 1 worker (uvicorn --loop auto --http auto but "
        f"wrapper-asyncio: asyncio + h11); wrk -t{config.wrk_threads}, "
        f"{config.duration:g} s per run after a "
        f"{config.warmup:g} s warm-up; {config.rounds} interleaved round(s), medians. "
        f"Django pool: {config.pool_size}. CONN_HEALTH_CHECKS={config.health_checks}. "
        f"Wrapper ASYNC_DBBRIDGE="
        f"{json.dumps(config.wrapper_settings)}"
        + (f" (library from {config.wrapper_src})" if config.wrapper_src else "")
        + f". Session cap on the servers' role: {cap} (the server's max_connections: "
        f"{env.get('max_connections') or '-'}). "
        f"Load average before/after: {env['loadavg_before']} / {env['loadavg_after']}."
    )
    print()
    for key in config.workloads:
        w = WORKLOAD_BY_KEY[key]
        print(f"- {key}: {w.title}, {w.connections} clients (`{w.path}`)")
    print()
    print(markdown_table(report, config))
    print()
    print(
        "req/s counts 2xx responses only; non-2xx by status, plus requests that got no "
        "response (socket errors). Ratios are medians of per-round ratios. too many conns: "
        "server log lines where the database refused a session. peak sessions: the most "
        "sampled on the benchmark database during the measured run."
    )
    errors: dict[str, dict[str, int]] = {}
    for sample in report.samples:
        for line, n in sample.errors.items():
            per = errors.setdefault(f"{sample.variant}/{sample.workload}", {})
            per[line] = per.get(line, 0) + n
    if errors:
        print()
        print("Server log lines (most frequent):")
        for where, lines in errors.items():
            for line, n in sorted(lines.items(), key=lambda item: -item[1])[:2]:
                print(f"- {where}: {n:,} x `{line}`")
    startups = {s.variant: s.startup for s in report.samples if s.startup}
    if startups:
        print()
        for variant, line in startups.items():
            hop = re.search(r"one thread hop \(ONE_HOP\): ([^;]*)", line)
            fused = re.search(r"\(FUSE_MIDDLEWARE\): ([^;]*)", line)
            print(
                f"- {variant} started with ONE_HOP: {hop.group(1) if hop else '?'}; "
                f"FUSE_MIDDLEWARE: {fused.group(1) if fused else '?'}"
            )
    sent = [s for s in report.summary if s.sentry_events]
    if sent:
        print()
        for s in sent:
            print(f"- {s.variant}/{s.workload}: {s.sentry_events:,} Sentry event(s)")
    left = [s for s in report.summary if s.sessions_after or s.unclean_exits]
    if left:
        print()
        for s in left:
            print(
                f"- {s.variant}/{s.workload}: {s.sessions_after} session(s) after exit, "
                f"{s.unclean_exits} unclean exit(s)"
            )
    print()
    for check in report.checks:
        where = check.workload
        if check.variant != "wrapper":
            where += f" ({check.variant})"
        print(f"{check.status} {where}: {check.text}")


# -- the chart ------------------------------------------------------------------------

_COLORS: Final = {
    "stock": "#9e9e9e",
    "djpool": "#5b8fd9",
    "wrapper": "#3aa675",
    "wrapper-asyncio": "#7cc8a0",
    "wrapper-metrics": "#1b5e20",
    "wsgi": "#e08a3c",
    "a2wsgi": "#c9a227",
    BASELINE: "#a5d6a7",
}


def write_chart(report: Report, config: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report.summary
    keys = [k for k in config.workloads if any(s.workload == k for s in summary)]
    if not keys:
        return
    by_key = {(s.variant, s.workload): s for s in summary}
    width = max(3.0, 0.6 * len(config.variants))
    fig, axes = plt.subplots(
        2, len(keys), figsize=(width * len(keys) + 1, 6), squeeze=False, height_ratios=(3, 2)
    )
    for col, key in enumerate(keys):
        rate_ax, session_ax = axes[0][col], axes[1][col]
        rows = [by_key[(v, key)] for v in config.variants if (v, key) in by_key]
        xs = list(range(len(rows)))
        colors = [_COLORS[s.variant] for s in rows]
        rate_ax.bar(
            xs,
            [s.ok_per_s for s in rows],
            color=colors,
            yerr=[
                [s.ok_per_s - s.ok_per_s_min for s in rows],
                [s.ok_per_s_max - s.ok_per_s for s in rows],
            ],
            capsize=3,
        )
        for x, s in zip(xs, rows, strict=True):
            text = f"{s.ok_per_s:,.0f}\np99 {s.p99_ms / 1e3:.2f} s"
            bad = sum(s.non_2xx.values()) + s.socket_errors
            if bad:
                text += f"\n{bad:,} err"
            rate_ax.annotate(
                text,
                (x, s.ok_per_s_max),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
        w = WORKLOAD_BY_KEY[key]
        rate_ax.set_title(f"{key}: {w.connections} clients", fontsize=9)
        rate_ax.margins(y=0.35)
        session_ax.bar(xs, [s.sessions_peak for s in rows], color=colors)
        if config.backend != "sqlite":
            session_ax.axhline(config.session_bound, color="#c0392b", linestyle="--", linewidth=1)
        for ax in (rate_ax, session_ax):
            ax.set_xticks(xs, [s.variant for s in rows], fontsize=8, rotation=30, ha="right")
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
    axes[0][0].set_ylabel("requests/s (2xx), median")
    axes[1][0].set_ylabel(f"peak server sessions\n(dashed: {config.session_bound})")
    env = report.environment
    fig.suptitle(
        f"bench_project — {env['server']}, {config.stack} stack, 1 worker, "
        f"wrk {config.duration:g} s x {config.rounds} round(s), {env['cpus']} CPUs",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------


def _wrapper_settings_option(value: str, pool_size: int) -> dict[str, Any]:
    try:
        extra = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--wrapper-settings is not JSON: {exc}") from exc
    if not isinstance(extra, dict):
        raise argparse.ArgumentTypeError("--wrapper-settings must be a JSON object")
    merged = {**wrapper_settings(pool_size), **extra}
    # null removes a key: a setting the library under test no longer has.
    return {key: v for key, v in merged.items() if v is not None}


def parse_args(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="postgresql")
    parser.add_argument(
        "--stack",
        choices=STACKS,
        default="startproject",
        help="the middleware, every variant alike: startproject's, or a real project's "
        "(django-cors-headers first, WhiteNoise, Sentry's DjangoIntegration)",
    )
    parser.add_argument(
        "--variants",
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all; djpool on "
        "PostgreSQL only)",
    )
    parser.add_argument(
        "--only",
        help="workloads, comma-separated, from a,b,c,d (default: all; d not on SQLite)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (3; --quick: 1)")
    parser.add_argument("--duration", type=float, help="seconds per measured run (5; --quick: 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (1)")
    parser.add_argument(
        "--pool-size",
        type=int,
        default=8,
        help="Django's pool min_size = max_size, and the wrapper's default settings' size (8)",
    )
    parser.add_argument(
        "--wrapper-settings",
        metavar="JSON",
        default="{}",
        help="ASYNC_DBBRIDGE keys merged over the defaults (MAX_WORKERS = POOL_SIZE = "
        "--pool-size, the library's defaults otherwise: no CPU_AFFINITY); null removes a key, "
        'e.g. \'{"CPU_AFFINITY": "auto"}\' or \'{"HOLD": "request", "POOL_TIMEOUT": null}\'',
    )
    parser.add_argument(
        "--wrapper-src",
        metavar="DIR",
        help="a checkout whose async_dbbridge the wrapper variant imports (default: this one)",
    )
    parser.add_argument(
        "--baseline-src",
        metavar="DIR",
        help="also serve the wrapper from this checkout (variant 'baseline'), interleaved "
        "with the others: a change measured against what it changes, in one run",
    )
    parser.add_argument(
        "--pin-others",
        type=int,
        metavar="CPU",
        help="run every server but the wrapper's under 'taskset -c CPU', as the "
        "wrapper's CPU_AFFINITY pins its event loop: the like-for-like comparison",
    )
    parser.add_argument(
        "--health-checks",
        action="store_true",
        help="CONN_HEALTH_CHECKS=True on the served alias, for every variant alike",
    )
    parser.add_argument(
        "--baseline-settings",
        metavar="JSON",
        help="ASYNC_DBBRIDGE keys for the baseline, merged over the defaults as "
        "--wrapper-settings are (default: the wrapper's)",
    )
    parser.add_argument(
        "--sessions", type=int, default=64, help="logged-in users whose cookies requests carry"
    )
    parser.add_argument(
        "--session-cap",
        type=int,
        default=70,
        help="most sessions the servers' role may hold (70; 0: no cap)",
    )
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s runs (CI smoke)")
    parser.add_argument(
        "--json", metavar="FILE", help="raw results (default: bench_project_<backend>.json)"
    )
    parser.add_argument(
        "--chart",
        metavar="PNG",
        help="where to write the chart (default: docs/img/bench_project_<backend>.png)",
    )
    parser.add_argument("--no-chart", action="store_true", help="write no chart")
    parser.add_argument(
        "--replot", metavar="JSON", help="only redraw the chart from an earlier run's JSON"
    )
    args = parser.parse_args(argv)
    backend = args.backend
    try:
        if args.variants is None:
            variants = tuple(
                v
                for v in VARIANTS
                if (v != "djpool" or backend == "postgresql") and v not in OPT_IN_VARIANTS
            )
        else:
            variants = split_option(args.variants, VARIANTS, "--variants")
        groups = split_option(args.only or ",".join(GROUPS), GROUPS, "--only")
        wrapper = _wrapper_settings_option(args.wrapper_settings, args.pool_size)
        baseline_settings = (
            None
            if args.baseline_settings is None
            else _wrapper_settings_option(args.baseline_settings, args.pool_size)
        )
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if "djpool" in variants and backend != "postgresql":
        parser.error("--variants: djpool (psycopg's pool) needs --backend postgresql")
    missing = _missing_packages((*variants, args.stack))
    if missing:
        parser.error(
            f"not installed: {', '.join(missing)} (scripts/bootstrap.sh dev --bench installs "
            "the bench extra)"
        )
    if backend == "sqlite":
        if args.only is not None and "d" in groups:
            parser.error("--only: workload d needs a database server (pg_sleep / SLEEP)")
        groups = tuple(g for g in groups if g != "d")
    workloads = tuple(w.key for w in WORKLOADS if w.group in groups)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 5.0)
    if rounds < 1 or duration < 1 or args.warmup < 1:
        parser.error("--rounds, --duration and --warmup must be at least 1")
    if args.pool_size < 1 or args.sessions < 1 or args.wrk_threads < 1:
        parser.error("--pool-size, --sessions and --wrk-threads must be at least 1")
    if args.pin_others is not None and args.pin_others not in os.sched_getaffinity(0):
        parser.error(f"--pin-others: CPU {args.pin_others} is not one this process may use")
    if args.session_cap < 0:
        parser.error("--session-cap must be 0 or more")
    src = None
    if args.wrapper_src is not None:
        src = str(Path(args.wrapper_src).resolve())
        if not (Path(src) / "async_dbbridge" / "__init__.py").is_file():
            parser.error(f"--wrapper-src: no async_dbbridge package in {src}")
    baseline = None
    if args.baseline_src is not None:
        baseline = str(Path(args.baseline_src).resolve())
        if not (Path(baseline) / "async_dbbridge" / "__init__.py").is_file():
            parser.error(f"--baseline-src: no async_dbbridge package in {baseline}")
        variants = (*variants, BASELINE)
    config = Config(
        backend=backend,
        variants=variants,
        workloads=workloads,
        rounds=rounds,
        duration=duration,
        warmup=args.warmup,
        pool_size=args.pool_size,
        wrapper_settings=wrapper,
        wrapper_src=src,
        baseline_src=baseline,
        baseline_settings=baseline_settings,
        pin_others=args.pin_others,
        health_checks=args.health_checks,
        sessions=args.sessions,
        session_cap=args.session_cap,
        wrk_threads=args.wrk_threads,
        stack=args.stack,
    )
    return config, args


def _missing_packages(needs: Sequence[str]) -> list[str]:
    """The distributions the variants and stack in ``needs`` want and this venv lacks."""
    import importlib.util

    missing: list[str] = []
    for need in needs:
        for module, dist in _NEEDS.get(need, ()):
            if importlib.util.find_spec(module) is None and dist not in missing:
                missing.append(dist)
    return missing


def schedule(config: Config) -> Iterator[tuple[int, str, str]]:
    """(round, variant, workload): workload by workload, variants rotated each round."""
    return interleaved(config.rounds, config.workloads, config.variants)


def _environment(database: Database, config: Config) -> dict[str, Any]:
    return {
        **_common.software_versions(database.version),
        "wrapper_src": config.wrapper_src or str(ROOT),
        "cpus": os.cpu_count(),
        # Shared with whatever else uses the server: the cap only helps below it.
        "max_connections": _common.max_connections() if database.backend != "sqlite" else None,
        "loadavg_before": _common.loadavg(),
    }


def _progress(s: Sample) -> str:
    statuses = ",".join(f"{k}:{v}" for k, v in sorted(s.statuses.items()))
    sockets = sum(s.socket_errors.values())
    return (
        f"[round {s.round + 1}] {s.variant:15} {s.workload:8} {s.ok_per_s:8,.0f} req/s  "
        f"p99 {s.latency_ms.get('p99', 0):6,.0f} ms  [{statuses}] socket {sockets}  "
        f"too-many {s.too_many}  sessions peak {s.sessions_peak} after {s.sessions_after}"
    )


def _default_chart(backend: str) -> Path:
    return ROOT / "docs" / "img" / f"bench_project_{backend}.png"


def _config_from_json(data: dict[str, Any]) -> Config:
    fields: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value for key, value in data.items()
    }
    fields.setdefault("baseline_src", None)  # JSON written before --baseline-src
    fields.setdefault("baseline_settings", None)
    fields.setdefault("pin_others", None)
    return Config(**fields)


def replot(source: Path, chart: Path | None) -> Path:
    """Redraw the chart of an earlier run from its JSON: no servers, no database."""
    data = json.loads(source.read_text())
    config = _config_from_json(data["config"])
    report = Report(
        environment=data["environment"],
        config=data["config"],
        summary=[Summary(**item) for item in data["summary"]],
    )
    path = chart or _default_chart(config.backend)
    write_chart(report, config, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_args(argv)
    if args.replot:
        print(f"chart: {replot(Path(args.replot), Path(args.chart) if args.chart else None)}")
        return 0
    if shutil.which("wrk") is None:
        print("bench_project: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    database = Database.for_run(config.backend, DB_NAME, config.session_cap)
    static = tempfile.TemporaryDirectory(prefix="bench_project_static-")
    if config.stack == "real":
        database.static_root = static.name
    _setup_django(database, config.stack)
    started = time.monotonic()

    def run() -> Report:
        database.create(config.sessions)
        report = Report(environment=_environment(database, config), config=asdict(config))
        for round_no, variant, key in schedule(config):
            sample = measure(variant, WORKLOAD_BY_KEY[key], round_no, config, database)
            print(_progress(sample), file=sys.stderr)
            report.samples.append(sample)
        return report

    with static, _common.machine_lock(DB_NAME, "bench_project"):
        report = run_harness("bench_project", database, run)
    if report is None:
        return 2
    report.environment["loadavg_after"] = _common.loadavg()
    report.environment["seconds"] = round(time.monotonic() - started, 1)
    report.summary = summarize(report.samples, config)
    report.checks = check_targets(report.summary, config)
    print_report(report, config)
    out = Path(args.json or f"bench_project_{config.backend}.json")
    out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"raw results: {out}")
    if not args.no_chart:
        chart = Path(args.chart) if args.chart else _default_chart(config.backend)
        try:
            write_chart(report, config, chart)
            print(f"\nchart: {chart}")
        except ImportError as exc:
            # The results are in the JSON: --replot draws the chart where matplotlib is.
            print(f"\nno chart ({exc}): use --replot with the JSON where matplotlib is installed")
    print(f"({report.environment['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
