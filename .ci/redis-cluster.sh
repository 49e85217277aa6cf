#!/usr/bin/env bash
# A throw-away 6-node Redis Cluster (3 masters + 3 replicas) on 127.0.0.1.
#
# Usage: bash .ci/redis-cluster.sh start|stop|status DIR BASEPORT
#   start   (re)creates a fresh, empty cluster on ports BASEPORT..BASEPORT+5 with
#           its data, nodes-PORT.conf, redis.log and redis.pid in DIR/PORT/, and
#           returns once every node says cluster_state:ok and every replica says
#           master_link_status:up. If that cluster is already up and healthy it
#           is left as it is. On stdout: REDIS_CLUSTER_NODES=127.0.0.1:P,... so
#           that `eval "$(bash .ci/redis-cluster.sh start ...)"` works.
#   stop    shuts down every node of DIR's cluster (no error if none runs).
#   status  exits 0 if the cluster is healthy, 1 otherwise.
# Env: REDIS_CLUSTER_WAIT=SECONDS bounds each wait (default 30).
# Tools come from $REPO/.tools/bin (see install-tools.sh) or PATH.
# Kill a master with: kill -9 "$(cat DIR/PORT/redis.pid)".
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$REPO/.tools/bin:$PATH"
WAIT="${REDIS_CLUSTER_WAIT:-30}"
N=6

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }
elapsed() { local n; n=$(date +%s%N); printf '%d.%01d' $(((n - $1) / 1000000000)) $((((n - $1) / 100000000) % 10)); }
log() { echo "redis-cluster: $*" >&2; }
die() { echo "redis-cluster: ERROR: $*" >&2; exit 1; }

[ $# -eq 3 ] || usage
CMD=$1 DIR=$2 BASE=$3
[[ "$BASE" =~ ^[0-9]+$ ]] && [ "$BASE" -ge 1024 ] && [ $((BASE + N - 1)) -le 65535 ] \
    || die "BASEPORT must be a number in 1024..$((65535 - N + 1)), got '$BASE'"
# The cluster bus uses PORT+10000.
[ $((BASE + N - 1 + 10000)) -le 65535 ] || die "BASEPORT+5+10000 (cluster bus port) must be <= 65535"
for t in redis-server redis-cli; do
    command -v "$t" >/dev/null || die "$t not found: run bash .ci/install-tools.sh"
done

PORTS=()
for ((i = 0; i < N; i++)); do PORTS+=($((BASE + i))); done

cli() { local p=$1; shift; timeout 5 redis-cli -h 127.0.0.1 -p "$p" "$@"; }
alive() { [ "$(cli "$1" ping 2>/dev/null)" = PONG ]; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ours PORT: the server on PORT works in DIR/PORT
ours() {
    local d
    d=$(cli "$1" config get dir 2>/dev/null | sed -n 2p) || return 1
    [ "$d" = "$(cd "$DIR/$1" 2>/dev/null && pwd -P)" ]
}

# healthy [quiet]: every node cluster_state:ok with 6 known nodes, 3 replicas, all linked
healthy() {
    local p info repl replicas=0
    for p in "${PORTS[@]}"; do
        info=$(cli "$p" cluster info 2>/dev/null) || return 1
        [[ "$info" == *"cluster_state:ok"* ]] || return 1
        [[ "$info" == *"cluster_known_nodes:$N"* ]] || return 1
        repl=$(cli "$p" info replication 2>/dev/null) || return 1
        if [[ "$repl" == *"role:slave"* ]]; then
            [[ "$repl" == *"master_link_status:up"* ]] || return 1
            replicas=$((replicas + 1))
        fi
    done
    [ "$replicas" -eq $((N / 2)) ]
}

all_ours() {
    local p
    for p in "${PORTS[@]}"; do ours "$p" || return 1; done
}

stop_node() {
    local p=$1 pidf="$DIR/$1/redis.pid" pid=""
    [ -f "$pidf" ] && pid=$(cat "$pidf" 2>/dev/null || true)
    if alive "$p" && ours "$p"; then
        cli "$p" shutdown nosave >/dev/null 2>&1 || true
    fi
    # the pid file is only trusted if that pid is a redis-server
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && [[ "$(cat "/proc/$pid/cmdline" 2>/dev/null | tr '\0' ' ')" == *redis-server*":$p"* ]]; then
        local i
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidf"
}

do_stop() {
    local p stopped=0
    for p in "${PORTS[@]}"; do
        if [ -d "$DIR/$p" ]; then stop_node "$p"; stopped=$((stopped + 1)); fi
    done
    for p in "${PORTS[@]}"; do
        local i
        for ((i = 0; i < 50; i++)); do port_busy "$p" && ours "$p" 2>/dev/null || break; sleep 0.1; done
    done
    log "stopped ($stopped node dirs in $DIR)"
}

print_env() {
    local IFS=,
    local nodes=()
    for p in "${PORTS[@]}"; do nodes+=("127.0.0.1:$p"); done
    echo "REDIS_CLUSTER_NODES=${nodes[*]}"
}

do_start() {
    local t0 p
    t0=$(date +%s%N)
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd -P)
    if healthy && all_ours; then
        log "already running and healthy on ports ${PORTS[0]}..${PORTS[N - 1]}"
        print_env
        return
    fi
    # Start from scratch: stop leftovers of ours, refuse ports used by others.
    do_stop >/dev/null 2>&1
    for p in "${PORTS[@]}"; do
        port_busy "$p" && die "port $p is in use by another process (not this cluster in $DIR)"
        port_busy $((p + 10000)) && die "cluster bus port $((p + 10000)) is in use by another process"
    done
    for p in "${PORTS[@]}"; do
        rm -rf "${DIR:?}/$p"
        mkdir -p "$DIR/$p"
        redis-server --port "$p" --bind 127.0.0.1 \
            --dir "$DIR/$p" --logfile "$DIR/$p/redis.log" --pidfile "$DIR/$p/redis.pid" \
            --cluster-enabled yes --cluster-config-file "nodes-$p.conf" --cluster-node-timeout 2000 \
            --save '' --appendonly no --repl-diskless-sync-delay 0 --daemonize yes \
            || die "redis-server on port $p did not start (see $DIR/$p/redis.log)"
    done
    for p in "${PORTS[@]}"; do
        local deadline=$((SECONDS + WAIT))
        until alive "$p"; do
            [ $SECONDS -lt $deadline ] || die "redis-server on port $p does not answer PING after ${WAIT}s; see $DIR/$p/redis.log: $(tail -n 3 "$DIR/$p/redis.log" 2>/dev/null)"
            sleep 0.05
        done
    done
    local addrs=()
    for p in "${PORTS[@]}"; do addrs+=("127.0.0.1:$p"); done
    if ! redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
        >"$DIR/cluster-create.log" 2>&1 </dev/null; then
        die "redis-cli --cluster create failed; see $DIR/cluster-create.log: $(tail -n 5 "$DIR/cluster-create.log")"
    fi
    local deadline=$((SECONDS + WAIT))
    until healthy; do
        if [ $SECONDS -ge $deadline ]; then
            for p in "${PORTS[@]}"; do
                log "  $p: $(cli "$p" cluster info 2>/dev/null | grep -E '^cluster_state' | tr -d '\r') $(cli "$p" info replication 2>/dev/null | grep -E '^(role|master_link_status)' | tr -d '\r' | tr '\n' ' ')"
            done
            die "cluster on ${PORTS[0]}..${PORTS[N - 1]} not ready after ${WAIT}s (need cluster_state:ok on all nodes and master_link_status:up on all replicas)"
        fi
        sleep 0.1
    done
    log "ready on 127.0.0.1:${PORTS[0]}..${PORTS[N - 1]} in $(elapsed "$t0")s (3 masters + 3 replicas, dir $DIR)"
    print_env
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
