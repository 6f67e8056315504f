"""``manage.py create_demo_database``: create the PostgreSQL/MariaDB database if missing.

Only on this machine: a ``DATABASE_URL`` pointing anywhere but 127.0.0.1 or
localhost is left alone (create that database yourself). SQLite needs nothing:
``migrate`` creates the file.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import DEFAULT_DB_ALIAS, connections

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class Command(BaseCommand):
    help = "Create the default database on a local PostgreSQL or MariaDB server if it is missing."

    def handle(self, *args: Any, **options: Any) -> None:
        conn = connections[DEFAULT_DB_ALIAS]
        if conn.vendor not in ("postgresql", "mysql"):
            return
        name = str(conn.settings_dict["NAME"])
        host = str(conn.settings_dict.get("HOST") or "")
        if host not in LOCAL_HOSTS:
            self.stdout.write(
                f"create_demo_database: host {host or '(socket)'!r} is not local; "
                f"not creating anything, make sure database {name!r} exists"
            )
            return
        if conn.vendor == "postgresql":
            exists_sql = "SELECT 1 FROM pg_database WHERE datname = %s"
            create_sql = f"CREATE DATABASE {conn.ops.quote_name(name)}"
        else:
            exists_sql = "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s"
            create_sql = (
                f"CREATE DATABASE IF NOT EXISTS {conn.ops.quote_name(name)} "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
        # The database may not exist yet, so connect the way Django's test
        # runner does before it creates one: to the server's maintenance
        # database (PostgreSQL) or to no database (MySQL).
        with conn._nodb_cursor() as cursor:
            cursor.execute(exists_sql, [name])
            if cursor.fetchone() is not None:
                self.stdout.write(f"create_demo_database: {name!r} exists")
                return
            cursor.execute(create_sql)
        self.stdout.write(f"create_demo_database: created {name!r} on {host}")
