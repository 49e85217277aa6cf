# Shared by the bench scripts (sourced, not run): the rules file and the
# clean-up of what a run started. Set REPO and WORK first, and BASE when
# the script starts Redis on BASE and a Cluster on BASE+1..BASE+6.

# write_rules UNIT REQUESTS_PER_UNIT [ALGORITHM]: domain `bench`, one
# descriptor `client_id`, in $WORK/rules/bench.yaml.
write_rules() {
    mkdir -p "$WORK/rules"
    printf 'domain: bench\ndescriptors:\n  - key: client_id\n    rate_limit: {unit: %s, requests_per_unit: %s%s}\n' \
        "$1" "$2" "${3:+, algorithm: $3}" >"$WORK/rules/bench.yaml"
}

# wait_port PORT: until something listens on 127.0.0.1:PORT (10 s at most).
wait_port() { # port
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listening on $1" >&2
    return 1
}

# On exit: kill the processes listed in `pids`, and stop the Redis and the
# Cluster the run may have started.
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${BASE:-}" ]; then
        redis-cli -p "$BASE" shutdown nosave >/dev/null 2>&1 || true
        bash "$REPO/.ci/redis-cluster.sh" stop "$WORK/cluster" $((BASE + 1)) >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
