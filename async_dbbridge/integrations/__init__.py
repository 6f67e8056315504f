"""Integrations with task frameworks and servers: one module each, an optional extra each."""

from __future__ import annotations
