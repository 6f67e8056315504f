#!/usr/bin/env bash
# A streaming replica of the local PostgreSQL cluster, for the read-replica tests.
#
# Usage: scripts/replica.sh [ensure|start|stop|status|drop]
#   ensure   (default) create it if missing, start it, wait until it streams; prints its port
#   start    start it (it must exist)
#   stop     stop it (fast shutdown); the tests stop it mid-load and start it again
#   status   "streaming", "stopped" or "missing"
#   drop     remove the cluster and its data
#
# Idempotent and fast when the replica is already there (a second `ensure` only checks it).
# The replica is a second cluster of the primary's PostgreSQL version (Debian's
# pg_createcluster), its data copied with `pg_basebackup -R` (which writes
# primary_conninfo and standby.signal), on port REPLICA_PORT (default 5433).
# The primary must accept replication connections from 127.0.0.1: when its pg_hba.conf
# has no replication line, one is added (`host replication postgres 127.0.0.1/32
# trust`, the same trust it gives every local TCP login) and the primary reloaded.
#
# Env: PRIMARY_PORT (5432), REPLICA_PORT (5433), REPLICA_CLUSTER (dbbridge_replica).
set -euo pipefail

PRIMARY_PORT="${PRIMARY_PORT:-5432}"
REPLICA_PORT="${REPLICA_PORT:-5433}"
CLUSTER="${REPLICA_CLUSTER:-dbbridge_replica}"

log() { printf '[replica] %s\n' "$*" >&2; }
die() {
    printf '[replica] ERROR: %s\n' "$*" >&2
    exit 1
}

command -v pg_lsclusters >/dev/null 2>&1 ||
    die "pg_lsclusters not found: the replica needs Debian's postgresql-common (postgresql package)"

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# The primary: the cluster listening on PRIMARY_PORT.
read -r VERSION PRIMARY_CLUSTER < <(pg_lsclusters -h | awk -v p="$PRIMARY_PORT" '$3 == p { print $1, $2; exit }') ||
    true
[ -n "${VERSION:-}" ] || die "no PostgreSQL cluster on port $PRIMARY_PORT (pg_lsclusters)"

exists() { pg_lsclusters -h | awk -v c="$CLUSTER" -v v="$VERSION" '$1 == v && $2 == c { f = 1 } END { exit !f }'; }
online() { pg_lsclusters -h | awk -v c="$CLUSTER" -v v="$VERSION" '$1 == v && $2 == c && $4 ~ /online/ { f = 1 } END { exit !f }'; }

# -w: never wait at a password prompt.
psql_primary() { psql -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -wXAtq "$@"; }
psql_replica() { psql -h 127.0.0.1 -p "$REPLICA_PORT" -U postgres -wXAtq "$@"; }

streaming() {
    [ "$(psql_replica -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = t ] &&
        [ "$(psql_replica -c "SELECT status FROM pg_stat_wal_receiver" 2>/dev/null)" = streaming ]
}

wait_streaming() {
    local deadline=$((SECONDS + 30))
    while [ "$SECONDS" -lt "$deadline" ]; do
        streaming && return 0
        sleep 0.1
    done
    die "the replica on port $REPLICA_PORT is not streaming after 30 s (see /var/log/postgresql/postgresql-$VERSION-$CLUSTER.log)"
}

allow_replication() {
    local hba
    hba="$(psql_primary -c 'SHOW hba_file')"
    if ! grep -Eq '^[[:space:]]*host[[:space:]]+replication[[:space:]]' "$hba"; then
        log "allowing replication connections from 127.0.0.1 in $hba"
        printf '\n# scripts/replica.sh (async_dbbridge tests): streaming replica on this host\nhost replication postgres 127.0.0.1/32 trust\n' >>"$hba"
        psql_primary -c 'SELECT pg_reload_conf()' >/dev/null
    fi
}

data_dir() { pg_lsclusters -h | awk -v c="$CLUSTER" -v v="$VERSION" '$1 == v && $2 == c { print $6 }'; }

# A replica: the cluster exists and its data is a standby's (a half-made one is made again).
ready() { exists && [ -f "$(data_dir)/standby.signal" ]; }

create() {
    allow_replication
    if exists; then
        log "cluster $VERSION/$CLUSTER is not a standby (an interrupted run?): making it again"
        pg_dropcluster --stop "$VERSION" "$CLUSTER"
    fi
    log "creating cluster $VERSION/$CLUSTER on port $REPLICA_PORT"
    pg_createcluster "$VERSION" "$CLUSTER" -p "$REPLICA_PORT" >/dev/null
    # Debian keeps the config in /etc: the replica takes the primary's client
    # authentication, so the tests log in to both the same way.
    cp "$(psql_primary -c 'SHOW hba_file')" "/etc/postgresql/$VERSION/$CLUSTER/pg_hba.conf"
    local data
    data="$(data_dir)"
    # Emptied, not removed: postgres may not create directories beside it.
    find "$data" -mindepth 1 -delete
    log "pg_basebackup from port $PRIMARY_PORT into $data"
    as_postgres pg_basebackup -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -D "$data" -R -X stream -c fast
}

start() {
    online || pg_ctlcluster "$VERSION" "$CLUSTER" start
    wait_streaming
}

case "${1:-ensure}" in
ensure)
    ready || create
    start
    echo "$REPLICA_PORT"
    ;;
start)
    exists || die "no replica cluster $VERSION/$CLUSTER: run scripts/replica.sh ensure"
    start
    ;;
stop)
    if online; then pg_ctlcluster "$VERSION" "$CLUSTER" stop -m fast; fi
    ;;
status)
    if ! exists; then
        echo missing
    elif streaming; then
        echo streaming
    else
        echo stopped
    fi
    ;;
drop)
    if exists; then pg_dropcluster --stop "$VERSION" "$CLUSTER"; fi
    ;;
*)
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
