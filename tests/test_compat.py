"""Every private internal in async_dbbridge._compat has the shape it relies on.

Run under each supported Django series (the two venvs): a failure here names
the internal that a new version changed, before anything subtler breaks.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

from async_dbbridge import _compat

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

BACKEND_MODULES = (
    "django.db.backends.sqlite3.base",
    "django.db.backends.postgresql.base",
    "django.db.backends.mysql.base",
)


def backend_class(module: str) -> type[BaseDatabaseWrapper]:
    wrapper_class: type[BaseDatabaseWrapper] = importlib.import_module(module).DatabaseWrapper
    return wrapper_class


@pytest.fixture
def fresh_wrapper() -> Iterator[BaseDatabaseWrapper]:
    """A wrapper of the running backend of its own, closed at the end."""
    conn = connections["default"].copy()
    yield conn
    conn.close()


@pytest.mark.parametrize("module", BACKEND_MODULES)
def test_every_backend_has_the_pool_hooks(module: str) -> None:
    _compat.check_wrapper_class(backend_class(module))


def test_a_missing_hook_is_named() -> None:
    class Broken(backend_class("django.db.backends.sqlite3.base")):  # type: ignore[misc]
        chunked_cursor = None

    with pytest.raises(_compat.IncompatibleVersionError, match="missing chunked_cursor"):
        _compat.check_wrapper_class(Broken)


def test_a_wrapper_has_the_state_the_pool_reads(fresh_wrapper: BaseDatabaseWrapper) -> None:
    _compat.check_wrapper_state(fresh_wrapper)  # before connecting
    fresh_wrapper.ensure_connection()
    _compat.check_wrapper_state(fresh_wrapper)
    del fresh_wrapper.close_at
    with pytest.raises(_compat.IncompatibleVersionError, match="close_at"):
        _compat.check_wrapper_state(fresh_wrapper)


def test_connect_sets_close_at_before_get_new_connection(
    fresh_wrapper: BaseDatabaseWrapper,
) -> None:
    """The pooled wrapper sets close_at in get_new_connection(); connect() must not undo it."""
    sentinel = 12345.0

    class Probe(type(fresh_wrapper)):  # type: ignore[misc]
        def get_new_connection(self, conn_params: Any) -> Any:
            raw = super().get_new_connection(conn_params)
            self.close_at = sentinel
            self.health_check_done = False
            return raw

    _compat.swap_class(fresh_wrapper, Probe)
    fresh_wrapper.ensure_connection()
    assert fresh_wrapper.close_at == sentinel


def test_close_calls_the_private_close_hook_then_forgets_the_connection(
    fresh_wrapper: BaseDatabaseWrapper,
) -> None:
    calls: list[object] = []

    class Probe(type(fresh_wrapper)):  # type: ignore[misc]
        def _close(self) -> None:
            calls.append(self.connection)
            super()._close()

    _compat.swap_class(fresh_wrapper, Probe)
    fresh_wrapper.ensure_connection()
    raw = fresh_wrapper.connection
    fresh_wrapper.close()
    assert calls == [raw]
    assert fresh_wrapper.connection is None


def test_swap_class_needs_a_subclass(fresh_wrapper: BaseDatabaseWrapper) -> None:
    with pytest.raises(TypeError, match="not a subclass"):
        _compat.swap_class(fresh_wrapper, BaseDatabaseWrapper)

    class Slotted(type(fresh_wrapper)):  # type: ignore[misc]
        __slots__ = ("extra",)

    with pytest.raises(_compat.IncompatibleVersionError, match="swapping"):
        _compat.swap_class(fresh_wrapper, Slotted)


def test_ping_raw_checks_another_connection_and_restores_the_wrapper(
    fresh_wrapper: BaseDatabaseWrapper,
) -> None:
    other = connections["default"].copy()
    other.ensure_connection()
    raw = other.connection
    other.connection = None  # the test owns the raw connection now
    try:
        assert fresh_wrapper.connection is None
        assert _compat.ping_raw(fresh_wrapper, raw) is True
        assert fresh_wrapper.connection is None
    finally:
        raw.close()
    if fresh_wrapper.vendor != "sqlite":  # SQLite's is_usable() is always True
        assert _compat.ping_raw(fresh_wrapper, raw) is False
        assert fresh_wrapper.connection is None


def test_new_connection_side_effects(fresh_wrapper: BaseDatabaseWrapper) -> None:
    fresh_wrapper.ensure_connection()
    effects = _compat.new_connection_side_effects(fresh_wrapper)
    if fresh_wrapper.vendor == "postgresql":
        assert effects == {"isolation_level": getattr(fresh_wrapper, "isolation_level")}  # noqa: B009
    assert set(effects) <= set(_compat.NEW_CONNECTION_SIDE_EFFECTS)


def test_on_cursor_close_sees_every_close_of_a_chunked_cursor(
    fresh_wrapper: BaseDatabaseWrapper,
) -> None:
    closed: list[str] = []
    cursor = fresh_wrapper.chunked_cursor()
    _compat.on_cursor_close(cursor, lambda: closed.append("closed"))
    cursor.execute("SELECT 1")
    assert closed == []
    with cursor:  # __exit__ closes through the instance attribute
        pass
    assert closed == ["closed"]
    cursor.close()  # closing again: the callback does not run twice
    assert closed == ["closed"]


def test_on_cursor_close_names_a_cursor_without_close() -> None:
    with pytest.raises(_compat.IncompatibleVersionError, match="close"):
        _compat.on_cursor_close(object(), lambda: None)


async def test_context_has_own_thread_follows_asgirefs_per_context_executors() -> None:
    from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async

    # The private map the per-request fallback reads (asgiref < 3.13 path).
    assert hasattr(SyncToAsync, "context_to_thread_executor")
    context = ThreadSensitiveContext()
    async with context:
        # No thread-sensitive call yet: asgiref made no thread for the context.
        assert not _compat.context_has_own_thread(context)
        await sync_to_async(lambda: None)()
        assert _compat.context_has_own_thread(context)


def test_context_has_own_thread_fails_loudly_without_the_map(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asgiref.sync import SyncToAsync, ThreadSensitiveContext

    monkeypatch.delattr(SyncToAsync, "context_to_thread_executor")
    with pytest.raises(_compat.IncompatibleVersionError, match="context_to_thread_executor"):
        _compat.context_has_own_thread(ThreadSensitiveContext())


async def test_the_process_thread_is_asgirefs_last_resort_only() -> None:
    import asyncio

    from asgiref.sync import SyncToAsync, ThreadSensitiveContext, async_to_sync

    loop = asyncio.get_running_loop()
    would_use = _compat.thread_sensitive_call_would_use_the_process_thread
    # Nothing encloses this code: asgiref would use its single thread.
    assert would_use(loop)
    async with ThreadSensitiveContext():
        assert not would_use(loop)

    async def nested() -> bool:
        return would_use(asyncio.get_running_loop())

    def sync_frame() -> bool:
        # A sync function waiting on async code: that code's thread-sensitive
        # calls come back to this thread.
        return async_to_sync(nested)()

    assert await SyncToAsync(sync_frame, thread_sensitive=False)() is False


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        ("AsyncToSync", "executors"),
        ("SyncToAsync", "thread_sensitive_context"),
        ("AsyncToSync", "loop_thread_executors"),
    ],
)
def test_the_process_thread_check_fails_loudly_without_asgirefs_internals(
    monkeypatch: pytest.MonkeyPatch, owner: str, name: str
) -> None:
    import asgiref.sync

    monkeypatch.delattr(getattr(asgiref.sync, owner), name)
    with pytest.raises(_compat.IncompatibleVersionError, match=name):
        _compat.thread_sensitive_call_would_use_the_process_thread(None)


def test_request_threads_supported_matches_the_installed_asgiref() -> None:
    import inspect

    from asgiref.sync import ThreadSensitiveContext

    takes_executor = "executor" in inspect.signature(ThreadSensitiveContext.__init__).parameters
    assert takes_executor == _compat.REQUEST_THREADS_SUPPORTED


# -- fingerprints of Django's request machinery --------------------------------------------------


def test_the_request_machinery_is_the_code_the_rewrites_were_checked_against() -> None:
    """Fails when a Django release in the matrix changes a function the fused middleware or
    the one-hop path rewrites: check the new code, then record its fingerprint."""
    import django

    series = django.VERSION[:2]
    assert series in _compat.FINGERPRINTS, f"Django {django.get_version()}: no fingerprints"
    expected = _compat.FINGERPRINTS[series]
    functions = _compat.MIDDLEWARE_FUNCTIONS + _compat.REQUEST_FUNCTIONS
    assert set(expected) == set(functions)
    actual = {name: _compat.fingerprint(name) for name in functions}
    assert actual == expected
    assert _compat.middleware_machinery_mismatch() is None
    assert _compat.request_machinery_mismatch() is None


def test_a_patched_function_is_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.utils.deprecation import MiddlewareMixin

    def patched(self: object, request: object) -> object:  # another library's patch
        return None

    monkeypatch.setattr(MiddlewareMixin, "__call__", patched)
    reason = _compat.middleware_machinery_mismatch()
    assert reason is not None
    assert "MiddlewareMixin.__call__ differ" in reason
    assert _compat.fingerprint("no.such.module.function") is None


def test_asgirefs_async_to_sync_is_the_code_the_fusion_was_checked_against() -> None:
    """The fused middleware below a sync-only layer replaces what Django's AsyncToSync runs."""
    actual = {name: _compat.fingerprint(name) for name in _compat.ASGIREF_FINGERPRINTS}
    assert actual == _compat.ASGIREF_FINGERPRINTS
    assert _compat.async_adapter_mismatch() is None


def test_a_changed_async_to_sync_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _compat.async_adapter_mismatch.cache_clear()
    monkeypatch.setitem(_compat.ASGIREF_FINGERPRINTS, "asgiref.sync.AsyncToSync.__call__", "0")
    try:
        reason = _compat.async_adapter_mismatch()
        assert reason is not None
        assert "AsyncToSync.__call__ differs" in reason
    finally:
        monkeypatch.undo()
        _compat.async_adapter_mismatch.cache_clear()
    assert _compat.async_adapter_mismatch() is None


def test_asgirefs_nested_call_machinery_is_the_code_the_hook_was_checked_against() -> None:
    """Request threads give connections back after sync calls nested in AsyncToSync."""
    import asgiref.sync

    actual = {name: _compat.fingerprint(name) for name in _compat.NESTED_CALL_FINGERPRINTS}
    assert actual == _compat.NESTED_CALL_FINGERPRINTS
    import async_dbbridge._request_threads  # noqa: F401  (installs the hook)

    hooked: Any = asgiref.sync.CurrentThreadExecutor  # type: ignore[attr-defined]
    assert hooked._dbbridge_after is not None
    assert _compat.hook_nested_calls(hooked._dbbridge_after) is None  # idempotent
    assert asgiref.sync.CurrentThreadExecutor is hooked  # type: ignore[attr-defined]
