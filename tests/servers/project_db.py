"""Create or drop the served project's database, in a process of its own.

The served project is ``benchmarks.project`` (``startproject``'s settings,
middleware, admin, sessions and auth, plus one app), whose settings the
test process cannot load beside ``tests.settings``: so this runs as
``python -m tests.servers.project_db create|drop BACKEND NAME [PASSWORD]``.
``create`` drops what a crashed run left, creates a role and a database named
``NAME``, migrates, seeds a few rows and logged-in sessions, and prints a JSON
object: the role's password and the session keys. ``drop`` drops both
(PostgreSQL: ``WITH (FORCE)``).
"""

from __future__ import annotations

import json
import os
import sys

from benchmarks import bench_project

#: Logged-in users, one session each, whose cookies the load carries.
SESSIONS = 8


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4) or argv[0] not in ("create", "drop"):
        print(__doc__, file=sys.stderr)
        return 2
    action, backend, name = argv[:3]
    database = bench_project.Database.for_run(backend, name, session_cap=0)
    if len(argv) == 4:
        database.password = argv[3]
    # The harness's view of the project: alias "default" is the servers' role
    # (it migrates, so the role owns the tables), "admin" creates and drops.
    bench_project._setup_django(database, "startproject")
    if action == "create":
        database.create(SESSIONS)
        json.dump(
            {"password": database.password, "session_keys": database.session_keys}, sys.stdout
        )
    else:
        database.drop()
    return 0


if __name__ == "__main__":
    os.environ.pop("DJANGO_SETTINGS_MODULE", None)
    sys.exit(main(sys.argv[1:]))
