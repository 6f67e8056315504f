"""Checks for values that come from users, whatever their annotations promise."""

from __future__ import annotations


def is_number(value: object) -> bool:
    """An int or float, and not a bool (``True`` is an int, but never a duration)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_non_negative_int(value: object) -> bool:
    """A positive int (not a bool), or the plain int 0 (where 0 means "none" or "no limit")."""
    return is_positive_int(value) or (type(value) is int and value == 0)
