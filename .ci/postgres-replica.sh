#!/usr/bin/env bash
# A throw-away PostgreSQL primary + streaming hot-standby replica on 127.0.0.1.
#
# Usage: bash .ci/postgres-replica.sh start|stop|status DIR PRIMARY_PORT REPLICA_PORT
#   start   (re)creates both servers from scratch: DIR/primary (initdb, trust auth,
#           listens on 127.0.0.1 only, wal_level=replica) with a database `sluice`,
#           and DIR/replica (pg_basebackup -R -X stream), both with their Unix
#           sockets in DIR and logs in DIR/primary.log, DIR/replica.log. Returns
#           once the replica answers pg_is_in_recovery() = t and streams from the
#           primary. If both already run healthy from DIR they are left as they
#           are. On stdout, for `eval "$(bash .ci/postgres-replica.sh start ...)"`:
#             PG_PRIMARY_URL=postgres://postgres@127.0.0.1:PRIMARY_PORT/sluice
#             PG_REPLICA_URL=postgres://postgres@127.0.0.1:REPLICA_PORT/sluice
#   stop    stops both (no error if they don't run).
#   status  exits 0 if both run healthy from DIR, 1 otherwise.
# As root the servers run as the `postgres` user, so DIR must be reachable by it:
# use e.g. DIR=$(mktemp -d /tmp/sluice-pg-XXXX) (this script chowns DIR itself).
# Env: PG_REPLICA_WAIT=SECONDS bounds each wait (default 60).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$REPO/.tools/bin:$PATH"
WAIT="${PG_REPLICA_WAIT:-60}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }
log() { echo "postgres-replica: $*" >&2; }
die() { echo "postgres-replica: ERROR: $*" >&2; exit 1; }
elapsed() { local n; n=$(date +%s%N); printf '%d.%01d' $(((n - $1) / 1000000000)) $((((n - $1) / 100000000) % 10)); }

[ $# -eq 4 ] || usage
CMD=$1 DIR=$2 PPORT=$3 RPORT=$4
for p in "$PPORT" "$RPORT"; do
    [[ "$p" =~ ^[0-9]+$ ]] && [ "$p" -ge 1024 ] && [ "$p" -le 65535 ] || die "ports must be numbers in 1024..65535, got '$p'"
done
[ "$PPORT" != "$RPORT" ] || die "PRIMARY_PORT and REPLICA_PORT must differ"
[[ "$DIR" != *"'"* && "$DIR" != *" "* ]] || die "DIR must not contain quotes or spaces: $DIR"

# --- PostgreSQL binaries: PATH (.tools/bin links them) or /usr/lib/postgresql/N/bin
PGBIN=""
if command -v initdb >/dev/null; then
    PGBIN=$(dirname "$(readlink -f "$(command -v initdb)")")
else
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V); do
        [ -x "$d/initdb" ] && PGBIN=$d
    done
fi
[ -n "$PGBIN" ] || die "initdb not found: run bash .ci/install-tools.sh"
for t in initdb pg_ctl postgres pg_basebackup psql; do
    [ -x "$PGBIN/$t" ] || die "$PGBIN/$t not found: run bash .ci/install-tools.sh"
done

# --- who runs the servers: initdb/pg_ctl refuse to run as root
RUNAS=()
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user (apt-get install postgresql creates it)"
    command -v runuser >/dev/null || die "runuser not found (util-linux)"
    RUNAS=(runuser -u postgres --)
fi
# as_pg CMD...: run as the server user, from DIR (it may not be able to enter our cwd)
as_pg() { (cd "$DIR" && "${RUNAS[@]}" "$@"); }

psql_() { # PORT SQL
    "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 -tAc "$2" </dev/null
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
running() { [ -f "$DIR/$1/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$DIR/$1" status >/dev/null 2>&1; }

# serves PORT NAME: the server on PORT runs from DIR/NAME
serves() {
    local d
    d=$(psql_ "$1" "show data_directory" 2>/dev/null) && [ "$d" = "$DIR/$2" ]
}

healthy() {
    running primary && running replica || return 1
    serves "$PPORT" primary && serves "$RPORT" replica || return 1
    [ "$(psql_ "$PPORT" "select pg_is_in_recovery()" 2>/dev/null)" = f ] || return 1
    [ "$(psql_ "$RPORT" "select pg_is_in_recovery()" 2>/dev/null)" = t ] || return 1
    replica_streaming || return 1
    [ "$(psql_ "$RPORT" "select count(*) from pg_database where datname = 'sluice'" 2>/dev/null)" = 1 ]
}

stop_one() {
    local name=$1
    [ -f "$DIR/$name/postmaster.pid" ] || return 0
    if ! as_pg "$PGBIN/pg_ctl" -D "$DIR/$name" -m fast -w -t 30 stop >/dev/null 2>&1; then
        as_pg "$PGBIN/pg_ctl" -D "$DIR/$name" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
    fi
    if running "$name"; then die "could not stop the server in $DIR/$name"; fi
    return 0
}

do_stop() {
    stop_one replica
    stop_one primary
    [ "${1:-}" = quiet ] || log "stopped (if running) the servers in $DIR"
}

print_urls() {
    echo "PG_PRIMARY_URL=postgres://postgres@127.0.0.1:$PPORT/sluice"
    echo "PG_REPLICA_URL=postgres://postgres@127.0.0.1:$RPORT/sluice"
}

# wait_for WHAT CMD...: retry CMD until it succeeds, at most $WAIT seconds
wait_for() {
    local what=$1 deadline=$((SECONDS + WAIT))
    shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${WAIT}s waiting for $what; see $DIR/primary.log and $DIR/replica.log"
        sleep 0.1
    done
}

replica_in_recovery() { [ "$(psql_ "$RPORT" "select pg_is_in_recovery()" 2>/dev/null)" = t ]; }
replica_streaming() {
    [ "$(psql_ "$PPORT" "select count(*) from pg_stat_replication where state = 'streaming'" 2>/dev/null)" -ge 1 ] 2>/dev/null
}

setup_dir() {
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd -P)
    # the Unix socket path must fit in sun_path (107 bytes)
    [ $((${#DIR} + ${#PPORT} + 10)) -le 107 ] || die "DIR is too long for Unix socket paths (keep it under ~90 characters, e.g. /tmp/sluice-pg-XXXX): $DIR"
    if [ ${#RUNAS[@]} -gt 0 ]; then
        chown postgres: "$DIR"
        chmod 0755 "$DIR"
        runuser -u postgres -- test -w "$DIR" -a -x "$DIR" \
            || die "user postgres cannot enter/write $DIR (a parent directory is not searchable by it, e.g. /root is 0700): use a DIR under /tmp, e.g. \$(mktemp -d /tmp/sluice-pg-XXXX)"
    fi
}

do_start() {
    local t0
    t0=$(date +%s%N)
    setup_dir
    if healthy; then
        log "already running and healthy: primary 127.0.0.1:$PPORT, replica 127.0.0.1:$RPORT ($DIR)"
        print_urls
        return
    fi
    do_stop quiet
    for p in "$PPORT" "$RPORT"; do
        port_busy "$p" && die "port $p is in use by another process (not a server from $DIR)"
    done
    rm -rf "${DIR:?}/primary" "${DIR:?}/replica" "$DIR/primary.log" "$DIR/replica.log"

    as_pg "$PGBIN/initdb" -D "$DIR/primary" -U postgres --auth=trust -E UTF8 --no-locale --no-sync \
        >"$DIR/initdb.log" 2>&1 || die "initdb failed; see $DIR/initdb.log: $(tail -n 5 "$DIR/initdb.log")"
    cat >>"$DIR/primary/postgresql.conf" <<EOF

# --- added by .ci/postgres-replica.sh (test cluster: speed over durability)
listen_addresses = '127.0.0.1'
port = $PPORT
unix_socket_directories = '$DIR'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '256MB'
hot_standby = on
hot_standby_feedback = on
fsync = off
shared_buffers = '64MB'
max_connections = 200
EOF
    cat >"$DIR/primary/pg_hba.conf" <<'EOF'
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 trust
host    all          all   127.0.0.1/32  trust
local   replication  all                 trust
host    replication  all   127.0.0.1/32  trust
EOF
    as_pg "$PGBIN/pg_ctl" -D "$DIR/primary" -l "$DIR/primary.log" -w -t "$WAIT" start >/dev/null \
        || die "primary did not start on port $PPORT; see $DIR/primary.log: $(tail -n 5 "$DIR/primary.log")"
    psql_ "$PPORT" "CREATE DATABASE sluice" >/dev/null || die "CREATE DATABASE sluice failed on the primary"

    as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PPORT" -U postgres -D "$DIR/replica" -R -X stream -c fast --no-sync \
        >"$DIR/basebackup.log" 2>&1 || die "pg_basebackup failed; see $DIR/basebackup.log: $(tail -n 5 "$DIR/basebackup.log")"
    cat >>"$DIR/replica/postgresql.conf" <<EOF

# --- replica (added by .ci/postgres-replica.sh)
port = $RPORT
EOF
    [ -f "$DIR/replica/standby.signal" ] || die "pg_basebackup -R wrote no standby.signal"
    as_pg "$PGBIN/pg_ctl" -D "$DIR/replica" -l "$DIR/replica.log" -w -t "$WAIT" start >/dev/null \
        || die "replica did not start on port $RPORT; see $DIR/replica.log: $(tail -n 5 "$DIR/replica.log")"

    wait_for "the replica (port $RPORT) to answer pg_is_in_recovery() = t" replica_in_recovery
    wait_for "the primary (port $PPORT) to see a streaming replica" replica_streaming
    healthy || die "primary/replica started but are not healthy"
    log "ready in $(elapsed "$t0")s: primary 127.0.0.1:$PPORT, replica 127.0.0.1:$RPORT (hot standby, streaming), sockets in $DIR"
    print_urls
}

case "$CMD" in
    start) do_start ;;
    stop)
        if [ -d "$DIR" ]; then DIR=$(cd "$DIR" && pwd -P); do_stop; else log "nothing to stop ($DIR does not exist)"; fi ;;
    status)
        [ -d "$DIR" ] && DIR=$(cd "$DIR" && pwd -P)
        if healthy; then log "healthy"; exit 0; else log "not healthy"; exit 1; fi ;;
    *) usage ;;
esac
