#!/usr/bin/env bash
# Create / update the development virtualenvs for async_dbbridge.
#
# Usage: scripts/bootstrap.sh [dev|all] [--bench]
#   dev      .venv       Python 3.11, Django 5.2, all extras (default)
#   all      .venv       + .venv-dj61 (Python 3.13, else 3.12; Django 6.1)
#   --bench  also make sure `wrk` is installed (apt), and install the `bench` extra
#            (uvicorn[standard], gunicorn, a2wsgi, django-cors-headers, whitenoise,
#            sentry-sdk: benchmarks/bench_project.py's servers and real stack) in .venv
#
# Idempotent: each venv has a stamp file (.bootstrap-<venv name>) holding a hash of
# pyproject.toml + this script; when it matches and the venv's python still runs,
# nothing is done (a warm run takes well under a second).
#
# Overrides (env): VENV_DIR (default .venv), VENV_DJ61_DIR (default .venv-dj61),
# BOOTSTRAP_FORCE=1 (ignore stamps).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV_DIR="${VENV_DIR:-.venv}"
VENV_DJ61_DIR="${VENV_DJ61_DIR:-.venv-dj61}"
PIP_FLAGS=(-q --disable-pip-version-check)

DEV_SPECS=(-e ".[postgresql,mysql,test,lint,docs,demo,browser,bench,servers,celery,channels,dramatiq,huey,rq,opentelemetry,prometheus]" "Django>=5.2,<5.3" "asgiref>=3.13" matplotlib)
# The integrations' extras in both series: tests/test_docs.py imports every public module and
# runs the integration pages' samples, their test modules import them (even where the matrix
# deselects the real-worker tests), and make peers runs Channels' suite, under each Django.
DJ61_SPECS=(-e ".[postgresql,mysql,test,servers,celery,channels,dramatiq,huey,rq,opentelemetry,prometheus]" "Django>=6.1,<6.2")
# The benchmarks' servers and real-stack middleware are in DEV_SPECS too (mypy checks
# benchmarks/); --bench makes sure of them and of wrk.
BENCH_SPECS=(-e ".[bench]" "Django>=5.2,<5.3")

log() { printf '[bootstrap] %s\n' "$*"; }
die() {
    printf '[bootstrap] ERROR: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

target=dev
bench=0
for arg in "$@"; do
    case "$arg" in
    dev | all) target="$arg" ;;
    --bench) bench=1 ;;
    -h | --help) usage ;;
    *)
        printf '[bootstrap] unknown argument: %s\n' "$arg" >&2
        usage
        ;;
    esac
done

start_ts=$(date +%s)

# One bootstrap at a time (make targets and humans may race).
exec 9>"$ROOT/.bootstrap-lock"
flock 9

# ---------------------------------------------------------------- system packages
apt_updated=0
apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
            # no terminal (CI): never wait for a password prompt
            [ -t 0 ] || sudo=(sudo -n)
        else
            die "need to install system packages ($*) but not root and no sudo; install them by hand: apt-get install -y --no-install-recommends $*"
        fi
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found; install these system packages by hand: $*"
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
            die "apt-get update failed"
        apt_updated=1
    fi
    log "apt-get install $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
        die "apt-get install $* failed"
}

have_mysql_headers() {
    command -v pkg-config >/dev/null 2>&1 || return 1
    pkg-config --exists mysqlclient || pkg-config --exists mariadb ||
        pkg-config --exists libmariadb
}

sys_pkgs=()
have_mysql_headers || sys_pkgs+=(libmariadb-dev pkg-config)
# mysqlclient has no Linux wheels: it is compiled
command -v cc >/dev/null 2>&1 || sys_pkgs+=(gcc libc6-dev)
# The demo's browser test (tests/test_demo_browser.py) drives Debian's headless
# Chromium through its chromedriver with Selenium.
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
    sys_pkgs+=(chromium chromium-driver)
fi
# The scale tests (tests/test_deployment.py, tests/test_pgbouncer.py, tests/test_scale_out.py)
# start Debian's PgBouncer themselves, on a port of their own, with a config they write
# (the package's own service is not used).
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    sys_pkgs+=(pgbouncer)
fi
if [ "$bench" -eq 1 ] && ! command -v wrk >/dev/null 2>&1; then
    sys_pkgs+=(wrk)
fi
if [ "${#sys_pkgs[@]}" -gt 0 ]; then
    apt_install "${sys_pkgs[@]}"
fi
have_mysql_headers || die "libmariadb-dev still not visible to pkg-config after install"

# ---------------------------------------------------------------- interpreters
# Print the path of a working interpreter of version $1 (e.g. 3.11), or fail.
# pyenv shims exist on PATH even for versions that are not selected, so every
# candidate is actually run.
find_python() {
    local want="$1" cand
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    local cands=("python$want") found=()
    for cand in "$pyenv_root"/versions/"$want"*/bin/"python$want" \
        /root/.pyenv/versions/"$want"*/bin/"python$want"; do
        [ -x "$cand" ] && found+=("$cand")
    done
    # newest patch release first
    if [ "${#found[@]}" -gt 0 ]; then
        while IFS= read -r cand; do
            cands+=("$cand")
        done < <(printf '%s\n' "${found[@]}" | sort -urV)
    fi
    cands+=(python3)
    for cand in "${cands[@]}"; do
        if "$cand" -c "import sys, venv; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$want' else 1)" \
            >/dev/null 2>&1; then
            "$cand" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 1
}

# pip install into venv $1; drops the per-package warnings pip prints for
# extra-index-url/find-links locations configured on the machine but absent.
pip_install() {
    local dir="$1"
    shift
    "$dir/bin/python" -m pip install "${PIP_FLAGS[@]}" "$@" \
        2> >(grep -v -e 'is ignored: it is neither a file nor a directory' >&2)
}

# tests/test_quickstart.py follows README.md in fresh venvs: it installs the package from
# this clone and from a wheel built here, and serves the quick start with uvicorn, offline.
# pip reads the wheels of the distributions it needs (the versions this venv has) from
# $dir/wheelhouse instead of an index.
WHEELHOUSE_DISTS=(Django asgiref psycopg psycopg-binary psycopg-pool uvicorn hatchling hatch-fancy-pypi-readme)
make_wheelhouse() {
    local dir="$1" specs=()
    mapfile -t specs < <("$dir/bin/python" -c 'import sys, importlib.metadata as m; print("\n".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "${WHEELHOUSE_DISTS[@]}")
    rm -rf "$dir/wheelhouse"
    log "$dir: wheelhouse for the quick-start test: ${specs[*]}"
    "$dir/bin/python" -m pip download "${PIP_FLAGS[@]}" --only-binary=:all: --dest "$dir/wheelhouse" "${specs[@]}" \
        2> >(grep -v -e 'is ignored: it is neither a file nor a directory' >&2) ||
        die "pip download of the quick-start test's wheels failed in $dir"
}

venv_pyver() { "$1/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

# ---------------------------------------------------------------- venvs
stamp_hash() { # $1 = venv dir, $2 = label
    { cat pyproject.toml "${BASH_SOURCE[0]}"; printf '%s\n' "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" "$2"; } |
        sha256sum | cut -d' ' -f1
}

stamp_file() { printf '%s/.bootstrap-%s' "$ROOT" "$(basename "$1" | sed 's/^\.//')"; }

# build_venv DIR LABEL "ACCEPTED_VERSIONS" -- PIP SPECS...
build_venv() {
    local dir="$1" label="$2" accepted="$3"
    shift 4
    local stamp hash ver py="" want t0
    stamp="$(stamp_file "$dir")"
    hash="$(stamp_hash "$dir" "$label")"
    if [ "${BOOTSTRAP_FORCE:-0}" != 1 ] && [ -x "$dir/bin/python" ] &&
        [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
        log "$dir ($label): up to date"
        return 0
    fi
    t0=$(date +%s)
    rm -f "$stamp"

    if [ -x "$dir/bin/python" ]; then
        ver="$(venv_pyver "$dir" || true)"
        if [ -n "$ver" ] && [[ " $accepted " == *" $ver "* ]]; then
            log "$dir ($label): reusing existing venv (Python $ver)"
        else
            log "$dir ($label): existing venv has Python '${ver:-broken}', recreating"
            rm -rf "$dir"
        fi
    fi
    if [ ! -x "$dir/bin/python" ]; then
        for want in $accepted; do
            if py="$(find_python "$want")"; then break; fi
            py=""
        done
        [ -n "$py" ] || die "no Python $accepted found (tried python<ver> on PATH and ~/.pyenv/versions/<ver>*)"
        log "$dir ($label): creating with $py"
        rm -rf "$dir"
        "$py" -m venv "$dir" || die "could not create $dir with $py"
        pip_install "$dir" --upgrade pip ||
            die "could not upgrade pip in $dir"
    fi

    log "$dir ($label): pip install $*"
    pip_install "$dir" "$@" ||
        die "pip install failed in $dir (is async_dbbridge/__init__.py with __version__ and README.md present?)"
    make_wheelhouse "$dir"
    printf '%s\n' "$hash" >"$stamp"
    log "$dir ($label): ready, Python $(venv_pyver "$dir"), Django $("$dir/bin/python" -c 'import django; print(django.get_version())'), $(($(date +%s) - t0))s"
}

build_venv "$VENV_DIR" "dev: py3.11 django5.2" "3.11" -- "${DEV_SPECS[@]}"
if [ "$bench" -eq 1 ]; then
    # Its own stamp (over the dev venv's): `dev` and `dev --bench` do not undo each other.
    bench_stamp="$(stamp_file "$VENV_DIR")-bench"
    bench_hash="$({ cat "$(stamp_file "$VENV_DIR")"; printf '%s\n' "${BENCH_SPECS[@]}"; } | sha256sum | cut -d' ' -f1)"
    if [ "${BOOTSTRAP_FORCE:-0}" != 1 ] && [ -f "$bench_stamp" ] && [ "$(cat "$bench_stamp")" = "$bench_hash" ]; then
        log "$VENV_DIR (bench extra): up to date"
    else
        log "$VENV_DIR (bench extra): pip install ${BENCH_SPECS[*]}"
        pip_install "$VENV_DIR" "${BENCH_SPECS[@]}" || die "pip install of the bench extra failed in $VENV_DIR"
        printf '%s\n' "$bench_hash" >"$bench_stamp"
    fi
fi
if [ "$target" = all ]; then
    build_venv "$VENV_DJ61_DIR" "dj61: py3.13 django6.1" "3.13 3.12" -- "${DJ61_SPECS[@]}"
fi

log "done ($target$([ "$bench" -eq 1 ] && echo ' --bench'), $(($(date +%s) - start_ts))s)"
