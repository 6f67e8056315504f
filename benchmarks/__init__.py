"""Benchmarks for async_dbbridge; run them as scripts (see README.md)."""
