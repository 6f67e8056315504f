"""The ASGI server matrix's harness (tests/test_servers.py)."""
