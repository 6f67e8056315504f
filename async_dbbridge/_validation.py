"""Checks for values that come from users, whatever their annotations promise."""

from __future__ import annotations


def is_number(value: object) -> bool:
    """An int or float, and not a bool (``True`` is an int, but never a duration)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
