#!/usr/bin/env bash
# Run the demo ASGI project on a fresh machine: make sure the dev venv exists,
# create the database if it is a missing local PostgreSQL/MariaDB one, migrate,
# seed, then serve it with uvicorn on http://127.0.0.1:8000/, and the same project under
# stock Django on PORT+1 (the dashboard runs the same burst against both).
#
# Usage: scripts/run_demo.sh [extra uvicorn args, e.g. --no-access-log]
# Env:   PORT          port on 127.0.0.1 (default 8000)
#        DATABASE_URL  default: SQLite file demo_asgi/db.sqlite3; e.g.
#                      postgres://postgres@127.0.0.1:5432/dbbridge_demo
#                      mysql://root@127.0.0.1:3306/dbbridge_demo
#        VENV_DIR      the venv (default .venv), passed on to scripts/bootstrap.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PORT="${PORT:-8000}"
case "$PORT" in
'' | *[!0-9]*)
    echo "run_demo: PORT must be a number, not '$PORT'" >&2
    exit 2
    ;;
esac

# Idempotent and fast when the venv is up to date (see the script).
scripts/bootstrap.sh dev
VENV="$(cd "${VENV_DIR:-.venv}" && pwd)"
PY="$VENV/bin/python"

# manage.py and uvicorn import the project (demo_asgi.settings, shop) from here.
cd demo_asgi
echo "[demo] database"
"$PY" manage.py create_demo_database
"$PY" manage.py migrate --noinput
"$PY" manage.py seed_demo
STOCK_PORT=$((PORT + 1))
# The same project under stock Django's ASGI handler, for the dashboard's side-by-side
# burst: started first, stopped with the demo.
echo "[demo] stock Django (for comparison) on http://127.0.0.1:$STOCK_PORT/"
DJANGO_SETTINGS_MODULE=demo_asgi.settings "$VENV/bin/uvicorn" --factory \
    django.core.asgi:get_asgi_application --host 127.0.0.1 --port "$STOCK_PORT" \
    --no-access-log --log-level warning &
stock_pid=$!
trap 'kill "$stock_pid" 2>/dev/null; wait "$stock_pid" 2>/dev/null' EXIT
echo "[demo] serving on http://127.0.0.1:$PORT/ (Ctrl-C to stop)"
# Always 127.0.0.1: POST /orders writes to the database without any authentication.
DEMO_STOCK_URL="http://127.0.0.1:$STOCK_PORT" \
    "$VENV/bin/uvicorn" demo_asgi.asgi:application --host 127.0.0.1 --port "$PORT" "$@"
