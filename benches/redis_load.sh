#!/usr/bin/env bash
# sluice with Redis counters under load: standalone Redis and a 6-node
# Cluster, one descriptor per call, 64 calls in flight (4 connections x 16);
# Redis commands per decision from INFO commandstats; and a hot key at 10x
# its limit. (The script takes one binary argument per unit, which
# redis-benchmark cannot send: benches/peer.sh is the side-by-side run.)
#
#   cargo build --release --bins
#   benches/redis_load.sh                   # 3 rounds x 10 s per target
#   ROUNDS=1 DURATION=5s benches/redis_load.sh
#
# Everything runs on this machine: Redis, sluice, the load generator and
# redis-benchmark share its cores. Results go to $OUT (one JSON line per run)
# and a summary in Markdown on stdout.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$REPO/.tools/bin:$PATH"
BIN=${BIN:-$REPO/target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-4}
CONCURRENCY=${CONCURRENCY:-16}
CLIENTS=${CLIENTS:-10000}
WORK=${WORK:-/tmp/sluice-redis-bench}
OUT=${OUT:-$WORK/results.jsonl}
BASE=${BASE:-23100}          # standalone Redis on BASE, Cluster on BASE+1..BASE+6
GRPC=${GRPC:-23181}
HTTP=${HTTP:-23180}
IN_FLIGHT=$((CONNECTIONS * CONCURRENCY))

rm -rf "$WORK" && mkdir -p "$WORK/rules"
: >"$OUT"
# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
# 60 a minute per client: with 10 000 clients at the rates seen here, almost
# every call is admitted (the script's full read-modify-write path).
write_rules minute 60

start_sluice() { # store-url
    "$BIN/sluice" serve --store "$1" --key-secret bench --rules "$WORK/rules" \
        --grpc-addr "127.0.0.1:$GRPC" --http-addr "127.0.0.1:$HTTP" >"$WORK/sluice.log" 2>&1 &
    sluice_pid=$!
    pids+=("$sluice_pid")
    for _ in $(seq 100); do
        if "$BIN/sluice-load" --addr "127.0.0.1:$GRPC" --domain bench --calls 1 -c 1 -m 1 >/dev/null 2>&1 \
            && curl -sf "http://127.0.0.1:$HTTP/readyz" | grep -q '"store_state":"up"'; then
            return 0
        fi
        sleep 0.1
    done
    echo "sluice did not become ready; see $WORK/sluice.log" >&2
    exit 1
}

stop_sluice() {
    kill "$sluice_pid" 2>/dev/null || true
    wait "$sluice_pid" 2>/dev/null || true
}

# Sum of a Prometheus counter over its label sets (those containing $2).
metric() {
    curl -sf "http://127.0.0.1:$HTTP/metrics" \
        | awk -v m="$1" -v f="${2:-}" 'index($1, m) == 1 && index($1, f) > 0 && substr($1, length(m) + 1, 1) ~ /^({|)$/ {s += $2} END {printf "%d", s}'
}
# Sum of `calls` of one command over some ports.
calls() { # command port...
    local cmd=$1 total=0 n
    shift
    for p in "$@"; do
        n=$(redis-cli -p "$p" info commandstats | tr -d '\r' | sed -n "s/^cmdstat_$cmd:calls=\([0-9]*\),.*/\1/p")
        total=$((total + ${n:-0}))
    done
    echo "$total"
}
resetstat() { for p in "$@"; do redis-cli -p "$p" config resetstat >/dev/null; done; }

# CPU seconds (user + system) of processes, from /proc; and of this shell's
# finished children (the load generator, redis-benchmark), from `times`.
tck=$(getconf CLK_TCK)
cpu_of() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t $tck" | awk '{printf "%.3f", $1 / $2}'; }
# (`times` must run in this shell, not in a $(...) subshell.)
children_cpu() {
    times >"$WORK/times"
    CHILD_CPU=$(tail -n 1 "$WORK/times" | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }')
}
redis_pids() { for p in "$@"; do redis-cli -p "$p" info server | tr -d '\r' | sed -n 's/^process_id://p'; done; }

run_load() { # target round ports... ; extra args in $EXTRA
    local target=$1 round=$2
    shift 2
    resetstat "$@"
    local d0 c0 o0 json d1 c1 o1 evalsha r0 r1 s0 s1 k0 k1 rpids
    rpids=$(redis_pids "$@")
    # shellcheck disable=SC2086
    r0=$(cpu_of $rpids)
    s0=$(cpu_of "$sluice_pid")
    children_cpu
    k0=$CHILD_CPU
    d0=$(metric sluice_decisions_total)
    o0=$(metric sluice_decisions_total 'code="OK"')
    c0=$(metric sluice_local_cache_answers_total)
    # shellcheck disable=SC2086
    json=$("$BIN/sluice-load" --addr "127.0.0.1:$GRPC" --domain bench --key client_id \
        -c "${C:-$CONNECTIONS}" -m "${M:-$CONCURRENCY}" --duration "$DURATION" --warmup "$WARMUP" \
        --json ${EXTRA:---clients $CLIENTS})
    children_cpu
    k1=$CHILD_CPU
    s1=$(cpu_of "$sluice_pid")
    # shellcheck disable=SC2086
    r1=$(cpu_of $rpids)
    d1=$(metric sluice_decisions_total)
    o1=$(metric sluice_decisions_total 'code="OK"')
    c1=$(metric sluice_local_cache_answers_total)
    evalsha=$(calls evalsha "$@")
    python3 -c '
import json, sys
r = json.loads(sys.argv[1])
d = int(sys.argv[4])
r.update(target=sys.argv[2], round=int(sys.argv[3]), decisions=d,
         evalsha=int(sys.argv[5]), local_cache_answers=int(sys.argv[6]), admitted=int(sys.argv[7]),
         cpu_us_per_call=dict(sluice=float(sys.argv[8]) * 1e6 / d, redis=float(sys.argv[9]) * 1e6 / d,
                              client=float(sys.argv[10]) * 1e6 / d),
         loadavg=open("/proc/loadavg").read().split()[0])
print(json.dumps(r))' "$json" "$target" "$round" "$((d1 - d0))" "$evalsha" "$((c1 - c0))" "$((o1 - o0))" \
        "$(echo "$s1 - $s0" | bc)" "$(echo "$r1 - $r0" | bc)" "$(echo "$k1 - $k0" | bc)" | tee -a "$OUT"
}

# --- standalone ---
redis-server --port "$BASE" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --logfile "$WORK/redis.log" --dir "$WORK"
for _ in $(seq 50); do redis-cli -p "$BASE" ping >/dev/null 2>&1 && break; sleep 0.1; done
start_sluice "redis://127.0.0.1:$BASE/0"
for round in $(seq "$ROUNDS"); do
    run_load redis "$round" "$BASE"
done

# Hot key: one client at 10x its limit. Measure the rate one hot client
# reaches, then give it a per-second limit of a tenth of that. Once with one
# call in flight (one client waiting for each answer), once with all 64.
hot() { # label connections in-flight-per-connection
    local label=$1 rate limit
    # The rate of a hot client whose every call goes to Redis (nothing denied).
    stop_sluice
    write_rules second 1000000000 sliding_window
    start_sluice "redis://127.0.0.1:$BASE/0"
    C=$2 M=$3 EXTRA="--hot" run_load "hot-probe-$label" 1 "$BASE" >/dev/null
    rate=$(tail -n 1 "$OUT" | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["calls_per_s"]))')
    limit=$((rate / 10 > 0 ? rate / 10 : 1))
    stop_sluice
    for algorithm in sliding_window fixed_window gcra; do
        write_rules second "$limit" "$algorithm"
        start_sluice "redis://127.0.0.1:$BASE/0"
        C=$2 M=$3 EXTRA="--hot" run_load "hot $label $algorithm $limit/s" 1 "$BASE"
        stop_sluice
    done
    write_rules minute 60 sliding_window
    start_sluice "redis://127.0.0.1:$BASE/0"
}
hot "1-in-flight" 1 1
hot "64-in-flight" "$CONNECTIONS" "$CONCURRENCY"
stop_sluice

# --- cluster ---
eval "$(bash "$REPO/.ci/redis-cluster.sh" start "$WORK/cluster" $((BASE + 1)))"
ports=()
for i in 1 2 3 4 5 6; do ports+=($((BASE + i))); done
start_sluice "redis+cluster://$REDIS_CLUSTER_NODES"
for round in $(seq "$ROUNDS"); do
    run_load redis-cluster "$round" "${ports[@]}"
done
stop_sluice

python3 - "$OUT" "$IN_FLIGHT" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "hot-probe" not in l]
print()
print(f"| target | calls/s (median) | p50 µs | p99 µs | p99.9 µs | EVALSHA per decision | local-cache answers | errors | CPU µs/call sluice / Redis / client |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
for t in dict.fromkeys(r["target"] for r in rows):
    rs = [r for r in rows if r["target"] == t]
    med = lambda f: statistics.median(f(r) for r in rs)
    lat = lambda q: med(lambda r: r["latency_us"].get(q, float("nan")))
    per = (f"{sum(r['evalsha'] for r in rs) / max(1, sum(r['decisions'] for r in rs)):.3f}"
           if "evalsha" in rs[0] else "1 (by construction)")
    cache = sum(r.get("local_cache_answers", 0) for r in rs)
    # (No EVALSHA per denied call: a batch decides admitted and denied
    # calls together, so its calls cannot be split between them.)
    errors = sum(r.get("errors", 0) for r in rs)
    p999 = lat("p999")
    c = lambda who: med(lambda r: r["cpu_us_per_call"].get(who, float("nan")))
    cpu = " / ".join("—" if c(w) != c(w) else f"{c(w):.1f}" for w in ("sluice", "redis", "client"))
    print(f"| {t} | {med(lambda r: r['calls_per_s']):.0f} | {lat('p50'):.0f} | {lat('p99'):.0f} | "
          f"{'—' if p999 != p999 else f'{p999:.0f}'} | {per} | {cache} | {errors} | {cpu} |")
EOF
