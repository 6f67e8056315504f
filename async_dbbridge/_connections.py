"""What "clean up this thread's Django connections" means.

This module is the mechanism shared by every place that owns a thread: executor
workers, request threads and the thread helpers. It knows nothing about threads
or pools; every function acts on the calling thread's connections, because
Django only lets the thread that opened a connection close it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from django.db import Error as DjangoDatabaseError
from django.db import connections
from django.db.backends.signals import connection_created

from . import _observers
from ._validation import is_number

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = (
    "Policy",
    "TransactionLeftOpenWarning",
    "initialized_connections",
)

logger = logging.getLogger("async_dbbridge")

PolicyKind = Literal["request", "close", "max_age"]
_POLICY_KINDS: Final = ("request", "close", "max_age")


class TransactionLeftOpenWarning(RuntimeWarning):
    """A call returned with an atomic block open or autocommit turned off.

    Its work was rolled back and the connection closed, so that the next call on
    the same thread does not run inside somebody else's transaction.
    """


@dataclass(frozen=True, slots=True)
class Policy:
    """When a bridge thread closes its connections after a call.

    * `Policy.request()` (the default) — exactly what Django does around an
      HTTP request: honour each alias's `CONN_MAX_AGE` and
      `CONN_HEALTH_CHECKS`. With `CONN_MAX_AGE=0` the connection is closed
      after every call; with `CONN_MAX_AGE=60` it is reused for 60 seconds.
    * `Policy.always_close()` — close after every call, whatever the settings.
    * `Policy.max_age(seconds)` — give the bridge's own threads long-lived
      connections with a lifetime of their own (`None`: until the thread
      retires), ignoring `CONN_MAX_AGE`. Health checks still follow
      `CONN_HEALTH_CHECKS`.

    Wherever a policy is accepted, the names `"request"` and `"close"` are too.
    In settings, `ASYNC_DBBRIDGE["POLICY"]` (with `"MAX_AGE"`) picks the
    bridge's policy.

    Attributes:
        kind: `"request"`, `"close"` or `"max_age"`.
        seconds: The connection lifetime of a `"max_age"` policy; `None` otherwise.
    """

    kind: PolicyKind = "request"
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _POLICY_KINDS:
            raise ValueError(
                f"unknown policy kind {self.kind!r}; expected one of {', '.join(_POLICY_KINDS)}"
            )
        if self.kind == "max_age":
            if self.seconds is not None and not (is_number(self.seconds) and self.seconds >= 0):
                raise ValueError(
                    f"Policy.max_age() takes a number of seconds >= 0 or None, not {self.seconds!r}"
                )
        elif self.seconds is not None:
            raise ValueError(f"policy {self.kind!r} takes no seconds")

    @classmethod
    def request(cls) -> Policy:
        """Honour each alias's `CONN_MAX_AGE` and `CONN_HEALTH_CHECKS`, as a request does."""
        return cls("request")

    @classmethod
    def always_close(cls) -> Policy:
        """Close every connection after every call, whatever the settings say."""
        return cls("close")

    @classmethod
    def max_age(cls, seconds: float | None) -> Policy:
        """Keep each thread's connections for `seconds`, whatever `CONN_MAX_AGE` says.

        Args:
            seconds: The lifetime of a connection, from when it was opened;
                `None` keeps it until its thread retires.

        Raises:
            ValueError: `seconds` is negative or not a number.
        """
        return cls("max_age", seconds)

    @classmethod
    def coerce(cls, value: Policy | str) -> Policy:
        """Accept a `Policy` or the name of one that takes no argument.

        Raises:
            ValueError: `value` is neither a `Policy` nor `"request"` / `"close"`.
        """
        if isinstance(value, Policy):
            return value
        if value == "request":
            return cls.request()
        if value == "close":
            return cls.always_close()
        raise ValueError(
            f"policy must be a Policy, 'request' or 'close', not {value!r} "
            "(use Policy.max_age(seconds) for per-worker lifetimes)"
        )

    def connection_deadline(self, now: float) -> float | None:
        """The `close_at` a new connection gets under a `max_age` policy."""
        return None if self.seconds is None else now + self.seconds


# Every wrapper that has connected in this process, on any thread, weakly: the
# only way to reach other threads' thread-local connections (for fork, and for
# process-wide counts). A wrapper that is garbage has had its connection freed.
_connected: weakref.WeakSet[BaseDatabaseWrapper] = weakref.WeakSet()
_connected_lock = threading.Lock()


#: What the library does when one of Django's wrappers connects, by concern
#: (the executor's workers, connection scopes, stranded connections): each
#: module registers its hook at import with `on_connect()`.
ConnectHook = Callable[["BaseDatabaseWrapper", threading.Thread], None]
_connect_hooks: tuple[ConnectHook, ...] = ()


def on_connect(hook: ConnectHook) -> None:
    """Run `hook(wrapper, thread)` on the connecting thread after every Django `connect()`.

    A hook must be cheap and must not raise: a pooled checkout is a `connect()`
    to Django, once per request and per job.
    """
    global _connect_hooks
    if hook not in _connect_hooks:
        _connect_hooks = (*_connect_hooks, hook)


def _on_connection_created(
    sender: object, connection: BaseDatabaseWrapper, **kwargs: object
) -> None:
    """The library's one receiver of `connection_created`.

    One, not one per concern: every receiver is a dispatch on each pooled
    checkout — and under Sentry's DjangoIntegration, whose `signals_spans` is
    on by default, a wrapper made and a span started per receiver per send
    (about 20 us each, measured on the project benchmark's real stack). The
    thread is looked up once for every hook.
    """
    with _connected_lock:
        _connected.add(connection)
    thread = threading.current_thread()
    for hook in _connect_hooks:
        hook(connection, thread)


connection_created.connect(_on_connection_created, dispatch_uid="async_dbbridge.connected")


def open_wrappers() -> list[BaseDatabaseWrapper]:
    """Every wrapper in the process, on any thread, that holds an open connection."""
    with _connected_lock:
        return [conn for conn in _connected if conn.connection is not None]


def forget_wrappers() -> None:
    """In a forked child: start tracking afresh (another thread may have held the lock)."""
    global _connected, _connected_lock
    _connected_lock = threading.Lock()
    _connected = weakref.WeakSet()


def initialized_connections(aliases: Iterable[str] | None = None) -> Iterator[BaseDatabaseWrapper]:
    """The calling thread's connection wrappers that exist (opened or not).

    Only initialized ones: touching ``connections[alias]`` would create a wrapper
    for every alias on every thread just to find out that there is nothing to do.
    """
    conns = connections.all(initialized_only=True)
    if aliases is None:
        return iter(conns)
    wanted = set(aliases)
    return (conn for conn in conns if conn.alias in wanted)


def in_transaction(conn: BaseDatabaseWrapper) -> bool:
    """True if ``conn`` is inside an atomic block or has autocommit turned off.

    ``get_autocommit()`` would connect to find out; the attribute does not.
    """
    if conn.in_atomic_block:
        return True
    return conn.connection is not None and conn.autocommit != conn.settings_dict["AUTOCOMMIT"]


def prepare_connections(
    aliases: Iterable[str] | None = None, *, conns: Iterable[BaseDatabaseWrapper] | None = None
) -> None:
    """Before a call: what ``request_started`` does.

    Closes connections past their lifetime or broken by an earlier error, and
    re-arms the health check so the call's first query verifies the connection
    when ``CONN_HEALTH_CHECKS`` is on. ``conns``: the calling thread's own
    wrappers, when its owner already knows them (skips Django's lookups).
    """
    for conn in initialized_connections(aliases) if conns is None else conns:
        if conn.connection is not None and not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()


def expire_connections(conns: Iterable[BaseDatabaseWrapper], now: float) -> None:
    """Before a call on a thread whose every call is followed by cleanup_after_call().

    That cleanup already did the rest of ``request_started``'s work (errors,
    autocommit, re-arming the health check); only time has passed since, so
    the one thing left to check is the lifetime. This keeps the per-call cost
    of the bridge below a raw ``run_in_executor`` round trip.
    """
    for conn in conns:
        close_at = conn.close_at
        if close_at is not None and now >= close_at and conn.connection is not None:
            conn.close()


def _forget(conn: BaseDatabaseWrapper) -> None:
    conn.connection = None
    conn.closed_in_transaction = False
    conn.in_atomic_block = False
    conn.savepoint_ids = []
    conn.atomic_blocks = []
    conn.needs_rollback = False


def discard_transaction(conn: BaseDatabaseWrapper) -> None:
    """Roll back and close a connection that was left inside a transaction.

    ``rollback()`` and ``close()`` both refuse or misbehave inside an atomic
    block, so this works on the raw DB-API connection and then resets Django's
    transaction bookkeeping, as ``connect()`` would.
    """
    raw = conn.connection
    try:
        if raw is not None and not conn.closed_in_transaction:
            try:
                raw.rollback()
            finally:
                raw.close()
    except Exception:
        # The server discards uncommitted work when the session ends; a failed
        # rollback on a broken connection changes nothing about that.
        logger.debug("rollback of a leftover transaction failed", exc_info=True)
    finally:
        conn.run_on_commit = []
        _forget(conn)


def _nothing_to_do(conn: BaseDatabaseWrapper, now: float) -> bool:
    """Django's close_if_unusable_or_obsolete() would only re-arm the health check.

    The same three conditions it tests (Django 4.1 to 6.1), read from the
    attributes it reads; any doubt goes to Django's own method.
    """
    close_at = conn.close_at
    return (
        conn.autocommit == conn.settings_dict["AUTOCOMMIT"]
        and not conn.errors_occurred
        and (close_at is None or now < close_at)
    )


def is_database_error(exc: BaseException, conns: Iterable[BaseDatabaseWrapper]) -> bool:
    """Django's wrapped errors, or a driver error raised through a raw connection."""
    if isinstance(exc, DjangoDatabaseError):
        return True
    return any(isinstance(exc, getattr(conn, "Database").Error) for conn in conns)  # noqa: B009


def describe(fn: Callable[..., object]) -> str:
    """``module.qualname`` of a callable, for messages that must name it."""
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}.{name}" if module else name


def cleanup_after_call(
    policy: Policy,
    *,
    error: BaseException | None,
    fn: Callable[..., object],
    aliases: Iterable[str] | None = None,
    conns: Iterable[BaseDatabaseWrapper] | None = None,
) -> None:
    """After a call on a thread the bridge owns: apply ``policy``.

    Order matters: first rescue connections left in a transaction (roll back,
    close, warn), then close everything after a database error (Django's own
    ``close_if_unusable_or_obsolete`` misses connections killed server-side, so
    it is not trusted after an error), then apply the policy.

    ``conns`` (the thread's wrappers, when the caller tracks them) saves the
    lookups through Django's thread-local storage; by default ``aliases``'
    initialized connections are used.
    """
    conns = list(initialized_connections(aliases) if conns is None else conns)
    if not conns:
        return
    database_error = error is not None and is_database_error(error, conns)
    leftovers: list[str] = []
    for conn in conns:
        if not in_transaction(conn):
            continue
        # After a database error with only autocommit off, the likeliest story
        # is that the connection died between COMMIT and Django turning
        # autocommit back on: the work may well be committed, and the caller
        # already has the error. Discard the connection without claiming a
        # rollback. An atomic block still open is the caller's doing either way.
        if conn.in_atomic_block or not database_error:
            leftovers.append(conn.alias)
        for observer in _observers.active:
            observer.rolled_back(conn.alias)
        discard_transaction(conn)
    cleanup_error: BaseException | None = None
    now = time.monotonic()
    for conn in conns:
        if conn.connection is None:
            continue
        try:
            if database_error or policy.kind == "close":
                conn.close()
            elif _nothing_to_do(conn, now):
                # What close_if_unusable_or_obsolete() does when nothing is
                # wrong, without its two async-safety checks: this is the
                # common case, on every call, so it must cost next to nothing.
                conn.health_check_done = False  # type: ignore[attr-defined]  # not in the stubs
            else:
                conn.close_if_unusable_or_obsolete()
        except Exception as exc:
            _forget(conn)
            cleanup_error = cleanup_error or exc
    if leftovers:
        warn_left_open(fn, leftovers, "and the connection closed")
    if cleanup_error is not None:
        raise cleanup_error


def warn_left_open(fn: Callable[..., object], aliases: list[str], what_else: str) -> None:
    """Report that a call returned inside a transaction on `aliases`, which was rolled back."""
    message = (
        f"{describe(fn)} returned inside a transaction on database "
        f"{', '.join(repr(a) for a in aliases)}: its uncommitted work was rolled back "
        f"{what_else}. Use 'with transaction.atomic():' so the transaction ends inside the call."
    )
    # A warning, not a log record as well: one report per event, through the
    # channel users can filter, turn into an error, or route into logging
    # (logging.captureWarnings) — a log line beside it would say the same
    # thing twice. stacklevel: the caller's caller (the executor's call site).
    warnings.warn(message, TransactionLeftOpenWarning, stacklevel=3)


def close_all_for_exit(aliases: Iterable[str] | None = None) -> None:
    """Close every connection of a thread that is about to end.

    Exit is final: transactions still open are rolled back, errors are logged
    and never stop the remaining aliases from being closed.
    """
    for conn in initialized_connections(aliases):
        try:
            if in_transaction(conn):
                discard_transaction(conn)
            else:
                conn.close()
        except Exception:
            logger.warning("closing %r on thread exit failed", conn.alias, exc_info=True)
            _forget(conn)


def end_request_cleanup() -> list[str]:
    """On a request's own thread, which ends with the request, once its sync work is done.

    Used by the ASGI wrapper's per-request mode (asgiref < 3.13, where each
    request has asgiref's own thread). Rolls back and closes connections the
    request left inside a transaction (returning their aliases, so the caller
    can warn on the event loop, where the request ran), then closes everything.
    """
    leftovers: list[str] = []
    for conn in initialized_connections():
        if in_transaction(conn):
            # request_finished may already have closed the raw connection (it
            # refuses to inside an atomic block but still marks it closed); the
            # wrapper's transaction state must be reset either way.
            discard_transaction(conn)
            leftovers.append(conn.alias)
    close_all_for_exit()
    return leftovers


def discard_inherited(conn: BaseDatabaseWrapper) -> None:
    """Make a connection inherited through ``fork()`` unusable without network I/O.

    The socket is shared with the parent: a clean close would send Terminate /
    COM_QUIT and end the *parent's* session. Point the descriptor at /dev/null
    instead, so that whatever the driver writes when it is finally freed goes
    nowhere, and let Django open a fresh connection on next use.
    """
    raw = conn.connection
    if raw is not None:
        fileno = getattr(raw, "fileno", None)
        fd: Any = None
        if callable(fileno):
            try:
                fd = fileno()
            except Exception:
                fd = None
        elif hasattr(raw, "pgconn"):  # psycopg 3 exposes the socket on pgconn
            fd = getattr(raw.pgconn, "socket", None)
        if isinstance(fd, int) and fd >= 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, fd)
            except OSError:
                # Not an open descriptor (the driver had already lost its
                # socket): there is nothing shared left to protect.
                pass
            finally:
                os.close(devnull)
        _INHERITED.append(raw)
    conn.run_on_commit = []
    _forget(conn)


# Raw connections (and Django's psycopg pools) inherited by a forked child are
# kept alive here for good: a driver that does not check the pid says goodbye
# when the object is freed, and while the object lives its descriptor number
# (now /dev/null) cannot be reused by a new socket that the goodbye would hit.
_INHERITED: list[Any] = []
