"""Fused middleware under Sentry's DjangoIntegration: run by tests/test_sentry.py, alone.

`sentry_sdk.init()` patches Django for the rest of the process (every middleware
class loaded afterwards is wrapped), so these tests run in a pytest process of
their own; the name keeps the main run from collecting them.

Nothing is sent anywhere: the DSN points at port 9 (discard) on this machine and
no event is captured while nothing fails (`before_send` drops any that would be).
"""

from __future__ import annotations

from typing import Any

import pytest
import sentry_sdk
from django.core.handlers.asgi import ASGIHandler
from pytest_django.fixtures import Settings as SettingsWrapper
from sentry_sdk.integrations.django import DjangoIntegration

from async_dbbridge import _compat
from async_dbbridge._middleware import fuse, fuse_middleware
from tests.test_middleware import (
    CHAINS,
    FUSED_LAYERS,
    SCENARIOS,
    SCRIPT,
    chain_settings,  # noqa: F401  (the fixture)
    count_phases,
    handler_pair,
    run,
)

sentry_sdk.init(
    dsn="http://public@127.0.0.1:9/1",
    integrations=[DjangoIntegration()],
    before_send=lambda event, hint: None,
)


@pytest.fixture
def integration() -> Any:
    found = sentry_sdk.get_client().get_integration(DjangoIntegration)
    assert found is not None
    saved = found.middleware_spans
    yield found
    found.middleware_spans = saved


def test_the_installed_sentry_is_the_code_it_was_checked_against() -> None:
    assert _compat.sentry_wrapper_mismatch() is None


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_fused_through_sentrys_wrapper_behaves_as_djangos(
    chain_settings: SettingsWrapper,  # noqa: F811
    integration: Any,
    chain: str,
    scenario: str,
) -> None:
    assert not integration.middleware_spans  # sentry-sdk 3's default
    chain_settings.MIDDLEWARE = CHAINS[chain]
    url, script = SCENARIOS[scenario]
    SCRIPT.update(script)
    django_built, fused_handler, fused = handler_pair()
    assert fused is not None
    # Every layer Django holds is Sentry's wrapper; the fused ones are what it holds.
    assert all(_compat.is_sentry_wrapper(layer) is False for layer in fused.layers)
    assert [type(layer).__name__ for layer in fused.layers] == FUSED_LAYERS[chain]
    assert fused.guard is _compat.sentry_middleware_spans_off
    expected = await run(django_built, url)
    got = await run(fused_handler, url)
    assert got == expected
    assert expected[2], "the scenario logged nothing: it proves nothing"


async def test_middleware_spans_turned_on_later_send_requests_down_djangos_chain(
    chain_settings: SettingsWrapper,  # noqa: F811
    integration: Any,
) -> None:
    django_built, fused_handler, fused = handler_pair()
    assert fused is not None
    phases = count_phases(fused)
    assert await run(fused_handler, "/sync/") == await run(django_built, "/sync/")
    assert phases == ["request", "response"]
    integration.middleware_spans = True
    assert await run(fused_handler, "/sync/") == await run(django_built, "/sync/")
    assert phases == ["request", "response"], "a request was fused while Sentry wanted its spans"


def test_with_middleware_spans_on_nothing_is_fused_and_the_line_says_why(
    chain_settings: SettingsWrapper,  # noqa: F811
    integration: Any,
) -> None:
    integration.middleware_spans = True
    handler = ASGIHandler()
    top = _compat.middleware_chain(handler)
    fused, verdict = fuse(handler)
    assert fused is None
    assert not verdict.applied
    assert "middleware_spans on" in verdict.reason
    assert _compat.middleware_chain(handler) is top


def test_another_sentry_wrapper_is_not_seen_through(
    chain_settings: SettingsWrapper,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _compat.sentry_wrapper_mismatch.cache_clear()
    wrap = next(iter(_compat.SENTRY_FINGERPRINTS))
    monkeypatch.setitem(_compat.SENTRY_FINGERPRINTS, wrap, "0" * 16)
    try:
        fused, verdict = fuse(ASGIHandler())
        assert fused is None
        assert (
            "middleware._wrap_middleware differs from the code it was checked against"
            in verdict.reason
        )
        assert f"sentry-sdk {sentry_sdk.VERSION}" in verdict.reason
    finally:
        monkeypatch.undo()
        _compat.sentry_wrapper_mismatch.cache_clear()
    assert fuse_middleware(ASGIHandler()) is not None
