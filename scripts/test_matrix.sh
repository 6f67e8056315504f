#!/usr/bin/env bash
# Run the pytest matrix: {Django 5.2 / .venv, Django 6.1 / .venv-dj61} x {sqlite, postgresql, mysql}.
#
# Usage: scripts/test_matrix.sh [extra pytest args...]
# Env:
#   BACKENDS="sqlite postgresql mysql"   narrow the backends (space or comma separated)
#   DJANGO_SERIES="52 61"                narrow the Django series
#   VENV_DIR / VENV_DJ61_DIR             venv locations (default .venv / .venv-dj61)
#   PYTEST_RUN_TIMEOUT=900               seconds before one pytest run is killed
#   MATRIX_SUMMARY=FILE                  also write the summary table to FILE
#   MATRIX_JOBS=2                        the Django series at the same time (1: in turn)
#   DBBRIDGE_SERVERS=all                 the whole ASGI server matrix (default: a fast subset,
#                                        PostgreSQL, Django 5.2; 0: none)
#
# Each run gets DB_BACKEND=<backend> in its environment; tests/settings.py picks the
# database from it. Every run must pass AND run at least one test: exit code 5 (no
# tests collected), or a run where nothing passed, is a failure. All runs are
# executed even when one fails; the script exits 1 if any failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

VENV_DIR="${VENV_DIR:-.venv}"
VENV_DJ61_DIR="${VENV_DJ61_DIR:-.venv-dj61}"
BACKENDS="${BACKENDS:-sqlite postgresql mysql}"
DJANGO_SERIES="${DJANGO_SERIES:-52 61}"
PYTEST_RUN_TIMEOUT="${PYTEST_RUN_TIMEOUT:-900}"
BACKENDS="${BACKENDS//,/ }"
DJANGO_SERIES="${DJANGO_SERIES//,/ }"

# shellcheck disable=SC2016 # expanded later, by the person who runs it
PG_START='pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'
MY_START='start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd'
# same variables (and defaults) as tests/settings.py
PG_HOST="${PGHOST:-127.0.0.1}" PG_PORT="${PGPORT:-5432}"
MY_HOST="${MYSQL_HOST:-127.0.0.1}" MY_PORT="${MYSQL_PORT:-3306}"

# shellcheck source=scripts/_lib.sh
. "$ROOT/scripts/_lib.sh"

check_choices test_matrix backend BACKENDS sqlite postgresql mysql
check_choices test_matrix "Django series" DJANGO_SERIES 52 61

logdir="$(mktemp -d "${TMPDIR:-/tmp}/dbbridge-matrix.XXXXXX")"
trap 'rm -rf "$logdir"' EXIT

# ---------------------------------------------------------------- DB servers
# A python connect is used as a fallback when the client tools are missing.
any_py() {
    local v
    for v in "$VENV_DIR" "$VENV_DJ61_DIR"; do
        [ -x "$v/bin/python" ] && { echo "$v/bin/python"; return 0; }
    done
    echo python3
}

pg_up() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 5
    else
        "$(any_py)" -c 'import sys, psycopg; psycopg.connect(host=sys.argv[1], port=sys.argv[2], user=sys.argv[3], dbname="test", connect_timeout=5).close()' \
            "$PG_HOST" "$PG_PORT" "${PGUSER:-postgres}" >/dev/null 2>&1
    fi
}

mysql_up() {
    if command -v mysqladmin >/dev/null 2>&1; then
        MYSQL_PWD="${MYSQL_PASSWORD:-}" mysqladmin -h"$MY_HOST" -P"$MY_PORT" -u"${MYSQL_USER:-root}" \
            --connect-timeout=5 ping >/dev/null 2>&1
    else
        "$(any_py)" -c 'import sys, MySQLdb; MySQLdb.connect(host=sys.argv[1], port=int(sys.argv[2]), user=sys.argv[3], passwd=sys.argv[4], db="test", connect_timeout=5).close()' \
            "$MY_HOST" "$MY_PORT" "${MYSQL_USER:-root}" "${MYSQL_PASSWORD:-}" >/dev/null 2>&1
    fi
}

declare -A server_err=()
for b in $BACKENDS; do
    case "$b" in
    postgresql)
        pg_up || server_err[postgresql]="PostgreSQL is NOT reachable on $PG_HOST:$PG_PORT. Start it with: $PG_START"
        ;;
    mysql)
        mysql_up || server_err[mysql]="MariaDB/MySQL is NOT reachable on $MY_HOST:$MY_PORT. Start it with: $MY_START"
        ;;
    esac
done
for b in "${!server_err[@]}"; do
    loud "${server_err[$b]}" "All $b runs are counted as FAILED (they are never skipped)."
done

# ---------------------------------------------------------------- runs
declare -a rows=()
failed=0
tot_passed=0 tot_failed=0 tot_skipped=0 tot_errors=0

# sum "N word" counts from pytest's closing line into the totals
count() { # $1 = logfile, sets c_passed c_failed c_skipped c_errors
    local line
    c_passed=0 c_failed=0 c_skipped=0 c_errors=0
    line="$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)' "$1" |
        grep -E ' in [0-9.]+s' | tail -n1)"
    [ -n "$line" ] || return 0
    c_passed=$(grep -Eo '[0-9]+ passed' <<<"$line" | grep -Eo '[0-9]+' || echo 0)
    c_failed=$(grep -Eo '[0-9]+ failed' <<<"$line" | grep -Eo '[0-9]+' || echo 0)
    c_skipped=$(grep -Eo '[0-9]+ skipped' <<<"$line" | grep -Eo '[0-9]+' || echo 0)
    c_errors=$(grep -Eo '[0-9]+ errors?' <<<"$line" | grep -Eo '[0-9]+' || echo 0)
}

timeout_cmd=(timeout --kill-after=30 "$PYTEST_RUN_TIMEOUT")
[ -t 0 ] && timeout_cmd=(timeout --foreground --kill-after=30 "$PYTEST_RUN_TIMEOUT")

# The test files that drive the ASGI wrapper, db_call and the loops: the uvloop pass.
UVLOOP_TESTS=(tests/test_asgi.py tests/test_asgi_pool.py tests/test_e2e.py tests/test_one_hop.py
    tests/test_middleware.py tests/test_loops.py tests/test_call.py tests/test_binding.py
    tests/test_pool_trust.py)

# run_one NAME BACKEND LOOP [PYTEST_ARGS...]: one pytest run, counted into the summary.
run_one() {
    local name="$1" backend="$2" loop="$3" log rc result
    shift 3
    echo
    echo "== $name =="
    t0=$(date +%s)
    result="" c_passed=0 c_failed=0 c_skipped=0 c_errors=0
    if [ ! -x "$py" ]; then
        loud "$venv/bin/python does not exist: run $boot"
        result="FAIL (no venv)"
    elif [ -n "${server_err[$backend]:-}" ]; then
        loud "${server_err[$backend]}"
        result="FAIL (server down)"
    else
        log="$logdir/run-$series-$backend-$loop.log"
        echo "+ DB_BACKEND=$backend DBBRIDGE_WORKERS=$workers DBBRIDGE_SLOW=$workers DBBRIDGE_SERVERS=$servers DBBRIDGE_LOOP=$loop $py -m pytest ${pytest_args[*]} $*"
        DB_BACKEND="$backend" DBBRIDGE_WORKERS="$workers" DBBRIDGE_SLOW="$workers" DBBRIDGE_SERVERS="$servers" DBBRIDGE_LOOP="$loop" "${timeout_cmd[@]}" "$py" -m pytest "${pytest_args[@]}" "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        count "$log"
        case "$rc" in
        0)
            if [ "$c_passed" -gt 0 ]; then
                result="ok"
            else
                result="FAIL (nothing passed)"
            fi
            ;;
        1) result="FAIL (tests failed)" ;;
        2) result="FAIL (interrupted/collection error)" ;;
        3) result="FAIL (internal error)" ;;
        4) result="FAIL (usage error)" ;;
        5) result="FAIL (no tests collected)" ;;
        124 | 137) result="FAIL (timeout ${PYTEST_RUN_TIMEOUT}s)" ;;
        *) result="FAIL (exit $rc)" ;;
        esac
    fi
    [ "$result" = ok ] || failed=1
    tot_passed=$((tot_passed + c_passed))
    tot_failed=$((tot_failed + c_failed))
    tot_skipped=$((tot_skipped + c_skipped))
    tot_errors=$((tot_errors + c_errors))
    rows+=("$(printf '%-49s %-36s %6s %6s %6s %6s %5ss' "$name" "$result" \
        "$c_passed" "$c_failed" "$c_skipped" "$c_errors" "$(($(date +%s) - t0))")")
}

# run_series SERIES [PYTEST_ARGS...]: every backend of one Django series, in order.
run_series() {
    local series="$1"
    shift
    if [ "$series" = 52 ]; then
        venv="$VENV_DIR" label_dj="Django 5.2"
        pytest_args=(-p no:randomly -q)
        workers=1
        # The ASGI servers' fast subset (tests/test_servers.py, PostgreSQL only);
        # DBBRIDGE_SERVERS=all in the environment runs the whole server matrix.
        servers="${DBBRIDGE_SERVERS:-fast}"
        boot="scripts/bootstrap.sh dev"
    else
        venv="$VENV_DJ61_DIR" label_dj="Django 6.1"
        pytest_args=(-q)
        # The task frameworks' real-worker tests run in the 5.2 series only:
        # they cost a worker start per case, and the integrations touch no
        # code that differs between Django series (CI's time budget). So do
        # the `slow` ones: README's quick start in fresh venvs, the demo in a browser.
        workers=0
        # Which server runs the app does not depend on the Django series: 5.2 only
        # (CI's time budget), unless DBBRIDGE_SERVERS=all asks for every series.
        if [ "${DBBRIDGE_SERVERS:-fast}" = all ]; then servers=all; else servers=0; fi
        boot="scripts/bootstrap.sh all"
    fi
    py="$venv/bin/python"
    if [ -x "$py" ]; then
        versions="$("$py" -c 'import sys, django; print("Django %d.%d / Python %d.%d" % (django.VERSION[:2] + sys.version_info[:2]))' 2>/dev/null)" ||
            versions="$label_dj / Python $("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo '?') (django import FAILED)"
    else
        versions="$label_dj / (no $venv)"
    fi

    for backend in $BACKENDS; do
        run_one "$versions / $backend" "$backend" asyncio "$@"
        # The wrapper's tests once more under uvloop + httptools, as uvicorn's
        # standard extras run in production (the library must not lean on
        # asyncio's private loop attributes): one series, one server.
        if [ "$series" = 52 ] && [ "$backend" = postgresql ]; then
            run_one "$versions / $backend / uvloop" "$backend" uvloop "${UVLOOP_TESTS[@]}" "$@"
        fi
    done
}

# The two series run at the same time, each its backends in order (MATRIX_JOBS=1:
# one after the other). They share nothing a test could trip over: each pytest
# process has test databases of its own (tests/settings.py names them by pid), and
# the tests that make databases, roles, servers or PgBouncers of their own name
# them by pid too. Each series' output is kept and printed whole when it ends, so
# the log reads as if they had run in turn; CI's time budget is why.
MATRIX_JOBS="${MATRIX_JOBS:-2}"
check_choices test_matrix "number of jobs" MATRIX_JOBS 1 2
# save_state FILE: this shell's rows and counters, for the parent to add up.
save_state() {
    declare -p rows failed tot_passed tot_failed tot_skipped tot_errors >"$1"
}
declare -a series_pids=()
for series in $DJANGO_SERIES; do
    if [ "$MATRIX_JOBS" -eq 1 ]; then
        run_series "$series" "$@"
        continue
    fi
    (
        rows=() failed=0 tot_passed=0 tot_failed=0 tot_skipped=0 tot_errors=0
        run_series "$series" "$@" >"$logdir/series-$series.out" 2>&1
        save_state "$logdir/series-$series.state"
    ) &
    series_pids+=("$!")
done
if [ "$MATRIX_JOBS" -ne 1 ]; then
    for pid in "${series_pids[@]}"; do
        wait "$pid" || true
    done
    for series in $DJANGO_SERIES; do
        cat "$logdir/series-$series.out" 2>/dev/null
        if [ ! -f "$logdir/series-$series.state" ]; then
            loud "the Django $series series ended without a result"
            failed=1
            continue
        fi
        all_rows=("${rows[@]}") all_failed=$failed
        all_p=$tot_passed all_f=$tot_failed all_s=$tot_skipped all_e=$tot_errors
        # shellcheck disable=SC1090 # written by save_state above
        . "$logdir/series-$series.state"
        rows=("${all_rows[@]}" "${rows[@]}")
        [ "$failed" -eq 0 ] || all_failed=1
        failed=$all_failed
        tot_passed=$((all_p + tot_passed)) tot_failed=$((all_f + tot_failed))
        tot_skipped=$((all_s + tot_skipped)) tot_errors=$((all_e + tot_errors))
    done
fi

summary() {
    echo
    echo "== test matrix summary =="
    printf '%-49s %-36s %6s %6s %6s %6s %6s\n' run result passed failed skip error time
    printf '%s\n' "${rows[@]}"
    if [ "$failed" -eq 0 ]; then
        echo "test matrix: all ${#rows[@]} runs OK"
    else
        echo "test matrix: FAILED (see the rows above)"
    fi
    # plain closing line: total test counts over all runs
    echo "matrix: $tot_passed passed, $((tot_failed + tot_errors)) failed, $tot_skipped skipped"
}
summary
if [ -n "${MATRIX_SUMMARY:-}" ]; then
    summary >"$MATRIX_SUMMARY"
fi
exit "$failed"
