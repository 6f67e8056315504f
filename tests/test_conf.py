"""ASYNC_DBBRIDGE settings: defaults, validation messages and the system check."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from async_dbbridge import Policy, conf
from async_dbbridge.checks import check_settings
from async_dbbridge.conf import DEFAULT_MAX_WORKERS, SettingsError, parse_settings


def test_defaults_work_with_nothing_configured() -> None:
    parsed = parse_settings(None)
    assert parsed.max_workers == DEFAULT_MAX_WORKERS
    assert parsed.policy == Policy.request()
    assert parsed.idle_timeout == 60.0
    assert parsed.databases is None


def test_max_age_policy() -> None:
    assert parse_settings({"POLICY": "max_age", "MAX_AGE": 300}).policy == Policy.max_age(300)
    assert parse_settings({"POLICY": "max_age"}).policy == Policy.max_age(None)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ([], "must be a dict"),
        ({"WORKERS": 3}, "no key 'WORKERS'; did you mean 'MAX_WORKERS'"),
        ({"MAX_WORKERS": 0}, r"\['MAX_WORKERS'\] is 0; expected a positive integer"),
        ({"MAX_WORKERS": "8"}, r"\['MAX_WORKERS'\]"),
        ({"POLICY": "never"}, r"\['POLICY'\] is 'never'; expected 'request', 'close' or 'max_age'"),
        ({"POLICY": "max_age", "MAX_AGE": -1}, r"\['MAX_AGE'\]"),
        ({"MAX_AGE": 30}, r"\['MAX_AGE'\] is 30; expected None unless POLICY is 'max_age'"),
        ({"IDLE_TIMEOUT": 0}, r"\['IDLE_TIMEOUT'\]"),
        ({"DATABASES": "default"}, r"\['DATABASES'\]"),
        ({"DATABASES": ["nope"]}, r"\['DATABASES'\] is \['nope'\].*\(default, other\)"),
        ({"THREAD_NAME_PREFIX": ""}, r"\['THREAD_NAME_PREFIX'\]"),
        ({"CLOSE_STRANDED": 1}, r"\['CLOSE_STRANDED'\] is 1; expected True or False"),
        ({"STRANDED_STACKS": "yes"}, r"\['STRANDED_STACKS'\] is 'yes'; expected True or False"),
        ({"SYNC_REQUESTS": -1}, r"\['SYNC_REQUESTS'\] is -1; expected an integer >= 0"),
        ({"SYNC_REQUESTS": True}, r"\['SYNC_REQUESTS'\] is True; expected an integer >= 0"),
        ({"SYNC_REQUESTS": "8"}, r"\['SYNC_REQUESTS'\] is '8'; expected an integer >= 0"),
    ],
)
def test_invalid_settings_name_the_key_and_the_accepted_values(raw: Any, match: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=match):
        parse_settings(raw)


# Django 6.1 runs its model checks against every alias, and on MySQL they ask
# the server for its version: `check` needs the (test) database there.
def test_pool_settings_defaults_and_hold_choices() -> None:
    parsed = parse_settings({"MAX_WORKERS": 3})
    assert (parsed.pool_size, parsed.effective_pool_size) == (3, 3)
    assert parsed.pool_timeout == 5.0
    assert parsed.hold == "transaction"
    assert parse_settings({"HOLD": "request"}).hold == "request"
    with pytest.raises(ImproperlyConfigured, match=r"\['HOLD'\] is 'session'"):
        parse_settings({"HOLD": "session"})


def test_sync_requests_follows_pool_size_unless_set() -> None:
    assert parse_settings({"POOL_SIZE": 6}).effective_sync_requests == 6
    assert parse_settings({"MAX_WORKERS": 3}).effective_sync_requests == 3
    assert parse_settings({"POOL_SIZE": 6, "SYNC_REQUESTS": 20}).effective_sync_requests == 20
    assert parse_settings({"SYNC_REQUESTS": 0}).effective_sync_requests == 0
    assert parse_settings({"POOL_SIZE": 6, "SYNC_REQUESTS": None}).effective_sync_requests == 6


@pytest.mark.django_db(databases=["default", "other"])
def test_system_check_reports_invalid_settings() -> None:
    with override_settings(ASYNC_DBBRIDGE={"POLICY": "never"}):
        errors = check_settings()
        assert [e.id for e in errors] == ["async_dbbridge.E001"]
        with pytest.raises(SystemCheckError, match=r"async_dbbridge\.E001"):
            call_command("check")
    assert check_settings() == []


def test_in_memory_sqlite_is_warned_about() -> None:
    from async_dbbridge.checks import check_in_memory_sqlite, in_memory_sqlite_aliases

    sqlite = "django.db.backends.sqlite3"
    databases = {
        "memory": {"ENGINE": sqlite, "NAME": ":memory:"},
        "shared_memory": {"ENGINE": sqlite, "NAME": "file:x?mode=memory&cache=shared"},
        "file": {"ENGINE": sqlite, "NAME": "/tmp/x.sqlite3"},
        "pg": {"ENGINE": "django.db.backends.postgresql", "NAME": ""},
    }
    assert in_memory_sqlite_aliases(databases) == ["memory", "shared_memory"]
    # The suite's own databases are files (or servers): nothing to report.
    assert check_in_memory_sqlite() == []


# -- every problem at once ---------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_close_matches() -> None:
    raw = {"POOL_SIZ": 4, "pool_timeout": 2, "LANES": 8, "MAX_WORKERS": 0, "HOLD": "x"}
    with pytest.raises(SettingsError) as caught:
        parse_settings(raw)
    problems = caught.value.problems
    assert problems == (
        "ASYNC_DBBRIDGE has no key 'POOL_SIZ'; did you mean 'POOL_SIZE'?",
        "ASYNC_DBBRIDGE has no key 'pool_timeout'; did you mean 'POOL_TIMEOUT'?",
        f"ASYNC_DBBRIDGE has no key 'LANES'; accepted keys are {', '.join(sorted(conf._KEYS))}.",
        "ASYNC_DBBRIDGE['MAX_WORKERS'] is 0; expected a positive integer.",
        "ASYNC_DBBRIDGE['HOLD'] is 'x'; expected 'transaction' or 'request'.",
    )
    # The exception's message (what a failed start prints) lists them all.
    message = str(caught.value)
    assert message.startswith("ASYNC_DBBRIDGE has 5 problems:\n- ")
    assert all(problem in message for problem in problems)


@pytest.mark.django_db(databases=["default", "other"])
def test_e001_is_one_error_per_problem() -> None:
    with override_settings(ASYNC_DBBRIDGE={"LANES": 4, "POOL_SIZE": 0, "POOL_TIMEOUT": "1"}):
        errors = check_settings()
    assert [e.id for e in errors] == ["async_dbbridge.E001"] * 3
    assert "'LANES'" in errors[0].msg
    assert "['POOL_SIZE'] is 0" in errors[1].msg
    assert "['POOL_TIMEOUT'] is '1'" in errors[2].msg


# Every key whose value is a number of seconds: NaN passes `< 0` and infinity
# overflows the waits and timestamps it reaches, far from the key.
NUMERIC_KEYS = {
    "IDLE_TIMEOUT": {},
    "SHUTDOWN_TIMEOUT": {},
    "POOL_TIMEOUT": {},
    "MAX_AGE": {"POLICY": "max_age"},
}


@pytest.mark.parametrize("key", sorted(NUMERIC_KEYS))
@pytest.mark.parametrize(
    ("value", "words"),
    [
        (math.nan, "NaN is not a number of seconds"),
        (math.inf, "a finite number of seconds"),
        (-math.inf, "a finite number of seconds"),
        (10**400, "a finite number of seconds"),
        (threading.TIMEOUT_MAX * 2, "a finite number of seconds"),
    ],
    ids=["nan", "inf", "-inf", "huge-int", "beyond-TIMEOUT_MAX"],
)
def test_nan_and_infinity_are_refused_naming_the_key(key: str, value: float, words: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_settings({**NUMERIC_KEYS[key], key: value})
    (problem,) = caught.value.problems
    assert problem.startswith(f"ASYNC_DBBRIDGE[{key!r}] is ")
    assert words in problem


@pytest.mark.parametrize(
    "key", ["MAX_WORKERS", "POOL_SIZE", "MAX_WAITING", "SYNC_REQUESTS", "CPU_AFFINITY"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, 2.0])
def test_integer_keys_refuse_any_float(key: str, value: float) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_settings({key: value})
    (problem,) = caught.value.problems
    assert problem.startswith(f"ASYNC_DBBRIDGE[{key!r}] is ")


def test_largest_finite_values_are_accepted() -> None:
    parsed = parse_settings(
        {"POOL_TIMEOUT": threading.TIMEOUT_MAX, "IDLE_TIMEOUT": None, "SHUTDOWN_TIMEOUT": 0}
    )
    assert parsed.pool_timeout == threading.TIMEOUT_MAX
    assert (parsed.idle_timeout, parsed.shutdown_timeout) == (None, 0.0)
