#!/usr/bin/env bash
# Run our peers' own test suites with the bridge in place (issue #9):
#
#   asgiref   the suite from the sdist of the installed asgiref, with the bridge as
#             default executor of every event loop (mode "executor"), and also with
#             db_sync_to_async for sync_to_async(thread_sensitive=False) (mode
#             "db_sync_to_async"); see tests/peers/asgiref_plugin.py
#   django    Django's tests/runtests.py (sdist of the installed Django) for the
#             packages below, with async_dbbridge.asgi.get_asgi_application in place
#             of Django's, on each backend; see tests/peers/django_runner.py
#   channels  Channels' own tests (the installed Channels' version) with
#             async_dbbridge.integrations.channels' database_sync_to_async and
#             consumers in place of Channels'; see tests/peers/channels_plugin.py.
#             Channels' sdist leaves its tests out (MANIFEST.in), so they come from
#             tests/peers/channels-<version>-tests.tar.gz (`git archive` of the
#             release tag) unless the sdist has them
#
# for each venv: .venv (Django 5.2) and .venv-dj61 (Django 6.1).
# Expected failures: tests/peers/expected_failures.txt. A run fails on any other
# failure, on a listed test that passes, and on a hang (bounded by timeouts).
#
# Usage: scripts/peer_suites.sh
# Env:
#   PEERS_SUITES="asgiref django channels" which suites
#   DJANGO_SERIES="52 61"                  which venvs (as in test_matrix.sh)
#   PEERS_BACKENDS="sqlite postgresql mysql"  Django runs' backends
#   PEERS_ASGIREF_MODES="executor db_sync_to_async"
#   PEERS_PYTEST_ARGS="-k context"         narrow the asgiref runs (extra pytest args)
#   PEERS_DJANGO_LABELS="asgi handlers"    narrow the Django runs (runtests.py labels)
#   PEERS_TEST_TIMEOUT=60                  seconds per test before the run is killed
#   PEERS_RUN_TIMEOUT=600                  seconds per run (a backstop)
#   PEERS_CACHE=DIR                        where downloaded sdists are kept
#   PEERS_SUMMARY=FILE                     also write the summary table to FILE
#   VENV_DIR / VENV_DJ61_DIR               venv locations (default .venv / .venv-dj61)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

VENV_DIR="${VENV_DIR:-.venv}"
VENV_DJ61_DIR="${VENV_DJ61_DIR:-.venv-dj61}"
PEERS_SUITES="${PEERS_SUITES:-asgiref django channels}"
DJANGO_SERIES="${DJANGO_SERIES:-52 61}"
PEERS_BACKENDS="${PEERS_BACKENDS:-sqlite postgresql mysql}"
PEERS_ASGIREF_MODES="${PEERS_ASGIREF_MODES:-executor db_sync_to_async}"
PEERS_PYTEST_ARGS="${PEERS_PYTEST_ARGS:-}"
DJANGO_LABELS_DEFAULT="asgi handlers async transactions signals select_for_update"
PEERS_DJANGO_LABELS="${PEERS_DJANGO_LABELS:-}"
PEERS_TEST_TIMEOUT="${PEERS_TEST_TIMEOUT:-60}"
PEERS_RUN_TIMEOUT="${PEERS_RUN_TIMEOUT:-600}"
PEERS_CACHE="${PEERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/async_dbbridge-peers}"

for v in PEERS_SUITES DJANGO_SERIES PEERS_BACKENDS PEERS_ASGIREF_MODES; do
    printf -v "$v" '%s' "${!v//,/ }"
done
# shellcheck source=scripts/_lib.sh
. "$ROOT/scripts/_lib.sh"

check_choices peer_suites suite PEERS_SUITES asgiref django channels
check_choices peer_suites "Django series" DJANGO_SERIES 52 61
check_choices peer_suites backend PEERS_BACKENDS sqlite postgresql mysql
check_choices peer_suites mode PEERS_ASGIREF_MODES executor db_sync_to_async

# A narrowed run need not contain every listed expected failure.
if [ -n "$PEERS_PYTEST_ARGS$PEERS_DJANGO_LABELS" ]; then
    export PEERS_PARTIAL=1
else
    unset PEERS_PARTIAL
fi
PEERS_DJANGO_LABELS="${PEERS_DJANGO_LABELS:-$DJANGO_LABELS_DEFAULT}"
export PEERS_TEST_TIMEOUT PYTHONDONTWRITEBYTECODE=1
# The checkout's async_dbbridge and tests.peers, whatever the venv has installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

work="$(mktemp -d "${TMPDIR:-/tmp}/dbbridge-peers.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$PEERS_CACHE" || exit 1

timeout_cmd=(timeout --kill-after=10 "$PEERS_RUN_TIMEOUT")
[ -t 0 ] && timeout_cmd=(timeout --foreground --kill-after=10 "$PEERS_RUN_TIMEOUT")

# sdist PY NAME VERSION -> path of the cached sdist (downloaded with PY's pip once)
sdist() {
    local py="$1" name="$2" version="$3" file dl
    file="$(find "$PEERS_CACHE" -maxdepth 1 -iname "$name-$version.tar.gz" -print -quit)"
    if [ -z "$file" ]; then
        dl="$(mktemp -d "$work/dl.XXXXXX")"
        echo "+ $py -m pip download --no-deps --no-binary :all: $name==$version" >&2
        "$py" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
            "$name==$version" -d "$dl" >&2 || return 1
        file="$(find "$dl" -maxdepth 1 -iname "$name-$version.tar.gz" -print -quit)"
        [ -n "$file" ] || return 1
        # Copied under a temporary name, then renamed: an interrupted copy must
        # not leave a truncated sdist that later runs would take as cached.
        cp "$file" "$PEERS_CACHE/.partial.$$" &&
            mv -f "$PEERS_CACHE/.partial.$$" "$PEERS_CACHE/$(basename "$file")" || return 1
        file="$PEERS_CACHE/$(basename "$file")"
    fi
    echo "$file"
}

# extract SDIST DEST MEMBER... -> DEST/<top dir>, only the given members
extract() {
    local tarball="$1" dest="$2" top
    shift 2
    top="$(tar -tzf "$tarball" | head -n1 | cut -d/ -f1)"
    mkdir -p "$dest" || return 1
    tar -xzf "$tarball" -C "$dest" --wildcards "${@/#/$top/}" || return 1
    echo "$dest/$top"
}

declare -a rows=() notes=()
failed=0

# row NAME RESULT PASSED FAILED XFAIL SKIPPED SECONDS
row() {
    rows+=("$(printf '%-34s %-30s %6s %6s %6s %6s %5ss' "$@")")
}

# pytest's closing line -> p f x s (failed includes errors and xpassed)
pytest_counts() {
    local line
    line="$(grep -E '^=* ?[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed)' "$1" | grep -E ' in [0-9.]+s' | tail -n1)"
    c_p=0 c_f=0 c_x=0 c_s=0
    if [ -z "$line" ]; then
        # No closing line (the run was killed): count the verbose per-test lines.
        c_p=$(grep -cE '(PASSED|XPASS) +\[' "$1")
        c_f=$(grep -cE '(FAILED|ERROR) +\[' "$1")
        c_x=$(grep -cE 'XFAIL +\[' "$1")
        c_s=$(grep -cE 'SKIPPED +\[' "$1")
        return 0
    fi
    cnt() { grep -Eo "[0-9]+ $1" <<<"$line" | grep -Eo '^[0-9]+' || echo 0; }
    c_p=$(cnt passed)
    c_f=$(($(cnt failed) + $(cnt 'errors?') + $(cnt xpassed)))
    c_x=$(cnt xfailed)
    c_s=$(cnt skipped)
}

# unittest's "Ran N tests" and "OK (...)" / "FAILED (...)" -> p f x s
django_counts() {
    local ran tail_line k
    c_p=0 c_f=0 c_x=0 c_s=0
    ran="$(grep -Eo '^Ran [0-9]+ tests?' "$1" | tail -n1 | grep -Eo '[0-9]+')"
    [ -n "$ran" ] || return 0
    tail_line="$(grep -E '^(OK|FAILED)( \(|$)' "$1" | tail -n1)"
    k() { grep -Eo "$1=[0-9]+" <<<"$tail_line" | grep -Eo '[0-9]+$' || echo 0; }
    c_f=$(($(k failures) + $(k errors) + $(k 'unexpected successes')))
    c_x=$(k 'expected failures')
    c_s=$(k skipped)
    c_p=$((ran - c_f - c_x - c_s))
}

# verdict RC LOG RUN -> sets result
verdict() {
    local rc="$1" log="$2"
    case "$rc" in
    0) if [ "$c_p" -gt 0 ]; then result="ok"; else result="FAIL (nothing passed)"; fi ;;
    124 | 137) result="FAIL (run timeout ${PEERS_RUN_TIMEOUT}s)" ;;
    *)
        if grep -q -- '+++++* Timeout +++++*' "$log"; then
            result="FAIL (test hung > ${PEERS_TEST_TIMEOUT}s)"
            notes+=("$3 hung in: $(grep -m1 -- '+++++* Timeout +++++*' "$log" | cut -d' ' -f1)")
        elif grep -q '^peers: TIMEOUT: ' "$log"; then
            result="FAIL (test hung > ${PEERS_TEST_TIMEOUT}s)"
            notes+=("$3 hung in: $(grep -m1 '^peers: TIMEOUT: ' "$log" | cut -d' ' -f3)")
        elif grep -q 'Timeout (0:' "$log"; then
            result="FAIL (hung; stacks in log)"
        elif [ "$c_f" -gt 0 ]; then
            result="FAIL (tests failed)"
        elif grep -q '^peers: FAILED: ' "$log"; then
            result="FAIL (harness check)"
            notes+=("$3: $(grep -m1 '^peers: FAILED: ' "$log" | cut -d' ' -f3-)")
        else
            result="FAIL (exit $rc)"
        fi
        ;;
    esac
}

run_asgiref() { # PY PYVER ASGIREF_VERSION
    local py="$1" pyver="$2" version="$3" tarball src mode name log t0 rc
    if ! tarball="$(sdist "$py" asgiref "$version")"; then
        loud "could not download the asgiref $version sdist"
        row "asgiref $version/py$pyver" "FAIL (no sdist)" 0 0 0 0 0
        failed=1
        return
    fi
    # Only the tests and their pytest config: the sdist's own asgiref package
    # must not shadow the installed one under test.
    src="$(extract "$tarball" "$work/asgiref-py$pyver" 'tests/*' setup.cfg)" || {
        row "asgiref $version/py$pyver" "FAIL (bad sdist)" 0 0 0 0 0
        failed=1
        return
    }
    for mode in $PEERS_ASGIREF_MODES; do
        name="asgiref/$mode/py$pyver"
        log="$work/$(tr / - <<<"$name").log"
        echo
        echo "== $name (asgiref $version) =="
        t0=$(date +%s)
        # -P: not the sdist directory on sys.path (the installed asgiref is under test);
        # no pytest-django (Django is configured by the plugin), no project plugin.
        (
            cd "$src" &&
                PEERS_RUN="$name" PEERS_ASGIREF_MODE="$mode" "${timeout_cmd[@]}" \
                    "$py" -P -m pytest -p no:django -p no:async_dbbridge -p no:cacheprovider \
                    -p tests.peers.asgiref_plugin -v -rfEX \
                    --timeout "$PEERS_TEST_TIMEOUT" --timeout-method thread \
                    $PEERS_PYTEST_ARGS
        ) 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        pytest_counts "$log"
        verdict "$rc" "$log" "$name"
        [ "$result" = ok ] || failed=1
        row "$name" "$result" "$c_p" "$c_f" "$c_x" "$c_s" "$(($(date +%s) - t0))"
    done
}

run_django() { # PY SERIES DJANGO_VERSION
    local py="$1" series="$2" version="$3" tarball src backend name log t0 rc
    if ! tarball="$(sdist "$py" Django "$version")"; then
        loud "could not download the Django $version sdist"
        row "django-$series" "FAIL (no sdist)" 0 0 0 0 0
        failed=1
        return
    fi
    src="$(extract "$tarball" "$work/django-$version" 'tests/*')" || {
        row "django-$series" "FAIL (bad sdist)" 0 0 0 0 0
        failed=1
        return
    }
    for backend in $PEERS_BACKENDS; do
        name="django-$series/$backend"
        log="$work/$(tr / - <<<"$name").log"
        echo
        echo "== $name (Django $version) =="
        t0=$(date +%s)
        # --parallel 1: the per-test timeout is armed in this process only.
        (
            cd "$src/tests" &&
                PEERS_RUN="$name" DB_BACKEND="$backend" "${timeout_cmd[@]}" \
                    "$py" runtests.py --settings=tests.peers.django_settings --parallel 1 \
                    --noinput -v 1 $PEERS_DJANGO_LABELS
        ) 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        django_counts "$log"
        verdict "$rc" "$log" "$name"
        [ "$result" = ok ] || failed=1
        row "$name" "$result" "$c_p" "$c_f" "$c_x" "$c_s" "$(($(date +%s) - t0))"
    done
}

# channels_tests PY VERSION -> path of a tarball holding Channels' tests/ at VERSION
channels_tests() {
    local py="$1" version="$2" tarball listing vendored
    # The listing first: with pipefail, `tar | grep -q` fails when grep stops reading early.
    if tarball="$(sdist "$py" channels "$version")" && listing="$(tar -tzf "$tarball")" &&
        grep -qx '[^/]*/tests/conftest.py' <<<"$listing"; then
        echo "$tarball"
        return 0
    fi
    # Channels' MANIFEST.in excludes its tests from the sdist (4.3.2 does):
    # the same tree from the release tag, kept here (see docs/peer-suites.md).
    vendored="$ROOT/tests/peers/channels-$version-tests.tar.gz"
    [ -f "$vendored" ] || return 1
    echo "$vendored"
}

run_channels() { # PY PYVER CHANNELS_VERSION
    local py="$1" pyver="$2" version="$3" tarball src name log t0 rc
    name="channels/py$pyver"
    if ! tarball="$(channels_tests "$py" "$version")"; then
        loud "no tests for Channels $version: its sdist has none, and tests/peers/ has no" \
            "channels-$version-tests.tar.gz (git archive --prefix=channels-$version/ $version" \
            "tests setup.cfg LICENSE | gzip -n9, in a clone of django/channels)"
        row "$name" "FAIL (no tests)" 0 0 0 0 0
        failed=1
        return
    fi
    src="$(extract "$tarball" "$work/channels-py$pyver" 'tests/*' setup.cfg)" || {
        row "$name" "FAIL (bad tarball)" 0 0 0 0 0
        failed=1
        return
    }
    log="$work/$(tr / - <<<"$name").log"
    echo
    echo "== $name (channels $version) =="
    t0=$(date +%s)
    # -P: not the source directory on sys.path (the installed channels is under
    # test). Channels' tests/sample_project/tests are its Selenium tests: they
    # drive a browser, which CI does not have.
    (
        cd "$src" &&
            PEERS_RUN="$name" PEERS_CHANNELS_TESTS="$src/tests" "${timeout_cmd[@]}" \
                "$py" -P -m pytest -p no:async_dbbridge -p no:cacheprovider \
                -p tests.peers.channels_plugin -v -rfEX \
                --timeout "$PEERS_TEST_TIMEOUT" --timeout-method thread \
                --ignore=tests/sample_project/tests $PEERS_PYTEST_ARGS
    ) 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    pytest_counts "$log"
    verdict "$rc" "$log" "$name"
    [ "$result" = ok ] || failed=1
    row "$name" "$result" "$c_p" "$c_f" "$c_x" "$c_s" "$(($(date +%s) - t0))"
}

start=$(date +%s)
for series in $DJANGO_SERIES; do
    if [ "$series" = 52 ]; then venv="$VENV_DIR"; else venv="$VENV_DJ61_DIR"; fi
    # Absolute: the runs start in the extracted sdists.
    case "$venv" in /*) ;; *) venv="$ROOT/$venv" ;; esac
    py="$venv/bin/python"
    if [ ! -x "$py" ]; then
        loud "$py does not exist: run scripts/bootstrap.sh all"
        row "$venv" "FAIL (no venv)" 0 0 0 0 0
        failed=1
        continue
    fi
    # The versions under test are the installed ones, read from the venv.
    read -r pyver asgiref_version django_version dj_series channels_version < <("$py" -c '
import sys, asgiref, django
try:
    import channels
    channels_version = channels.__version__
except ImportError:
    channels_version = "-"
print("%d.%d" % sys.version_info[:2], asgiref.__version__, django.__version__, "%d.%d" % django.VERSION[:2], channels_version)')
    if [ -z "${dj_series:-}" ]; then
        loud "$py cannot import asgiref and django"
        row "$venv" "FAIL (broken venv)" 0 0 0 0 0
        failed=1
        continue
    fi
    for suite in $PEERS_SUITES; do
        case "$suite" in
        asgiref) run_asgiref "$py" "$pyver" "$asgiref_version" ;;
        django) run_django "$py" "$dj_series" "$django_version" ;;
        channels)
            if [ "$channels_version" = - ]; then
                loud "$py has no channels: run scripts/bootstrap.sh (the channels extra)"
                row "channels/py$pyver" "FAIL (not installed)" 0 0 0 0 0
                failed=1
            else
                run_channels "$py" "$pyver" "$channels_version"
            fi
            ;;
        esac
    done
done

summary() {
    echo
    echo "== peers' suites summary =="
    printf '%-34s %-30s %6s %6s %6s %6s %6s\n' run result passed failed xfail skip time
    printf '%s\n' "${rows[@]}"
    [ "${#notes[@]}" -eq 0 ] || printf 'note: %s\n' "${notes[@]}"
    if [ "$failed" -eq 0 ]; then
        echo "peers: all ${#rows[@]} runs OK ($(($(date +%s) - start))s)"
    else
        echo "peers: FAILED (see the rows above; expected failures: tests/peers/expected_failures.txt)"
    fi
}
summary
if [ -n "${PEERS_SUMMARY:-}" ]; then
    summary >"$PEERS_SUMMARY"
fi
exit "$failed"
