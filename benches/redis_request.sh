#!/usr/bin/env bash
# Calls with several descriptors against a standalone Redis: decisions/s,
# latency percentiles and EVALSHA per call, for one or more sluice binaries
# (to compare builds), alternating over rounds so each sees the same machine.
#
#   cargo build --release --bins
#   benches/redis_request.sh                               # this tree's build
#   BINS="/tmp/before/sluice /work/main/target/release/sluice" benches/redis_request.sh
#   ROUNDS=3 DURATION=10s DESCRIPTORS=3 benches/redis_request.sh
#
# Rules: one generous limit per descriptor key (a, b, c, ...), so every call
# is admitted and takes the full read-modify-write path; 64 calls in flight.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$REPO/.tools/bin:$PATH"
LOAD=${LOAD:-$REPO/target/release/sluice-load}
BINS=${BINS:-$REPO/target/release/sluice}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
DESCRIPTORS=${DESCRIPTORS:-3}
PORT=${PORT:-23300}
GRPC=${GRPC:-23381}
HTTP=${HTTP:-23380}
WORK=${WORK:-/tmp/sluice-request-bench}

rm -rf "$WORK" && mkdir -p "$WORK/rules"
keys=()
{
    echo "domain: bench"
    echo "descriptors:"
    for i in $(seq "$DESCRIPTORS"); do
        k=$(printf "\\x$(printf %x $((96 + i)))")
        keys+=(--key "$k")
        echo "  - key: $k"
        echo "    rate_limit: {unit: hour, requests_per_unit: 1000000000}"
    done
} >"$WORK/rules/bench.yaml"

redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$WORK" --logfile "$WORK/redis.log" >/dev/null
sluice_pid=""
cleanup() {
    [ -n "$sluice_pid" ] && kill "$sluice_pid" 2>/dev/null && wait "$sluice_pid" 2>/dev/null
    redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
}
trap cleanup EXIT

evalsha() {
    redis-cli -p "$PORT" info commandstats | tr -d '\r' \
        | sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\),.*/\1/p' | grep . || echo 0
}

echo "| build | round | calls/s | p50 µs | p99 µs | p99.9 µs | EVALSHA per call | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for round in $(seq "$ROUNDS"); do
    for bin in $BINS; do
        "$bin" serve --store "redis://127.0.0.1:$PORT" --key-secret bench --rules "$WORK/rules" \
            --grpc-addr "127.0.0.1:$GRPC" --http-addr "127.0.0.1:$HTTP" --log-level warn \
            >"$WORK/sluice.log" 2>&1 &
        sluice_pid=$!
        for _ in $(seq 100); do
            curl -sf "http://127.0.0.1:$HTTP/readyz" | grep -q '"store_state":"up"' && break
            sleep 0.1
        done
        redis-cli -p "$PORT" flushall >/dev/null
        redis-cli -p "$PORT" config resetstat >/dev/null
        json=$("$LOAD" --addr "127.0.0.1:$GRPC" --domain bench "${keys[@]}" \
            --descriptors "$DESCRIPTORS" -c 4 -m 16 --duration "$DURATION" --warmup "$WARMUP" --json)
        sent=$(evalsha)
        # Decisions sluice made, warm-up included (as are the EVALSHA).
        decisions=$(curl -sf "http://127.0.0.1:$HTTP/metrics" \
            | awk 'index($1, "sluice_decisions_total{") == 1 {s += $2} END {printf "%d", s}')
        python3 - "$json" "$sent" "$decisions" "$bin" "$round" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
sent, decisions, bin, rnd = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
l = r["latency_us"]
print(f"| {bin} | {rnd} | {r['calls_per_s']:.0f} | {l['p50']} | {l['p99']} | {l['p999']} "
      f"| {sent / max(decisions, 1):.2f} | {r['errors']} |")
EOF
        kill "$sluice_pid"
        wait "$sluice_pid" 2>/dev/null || true
        sluice_pid=""
    done
done
