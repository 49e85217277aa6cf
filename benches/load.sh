#!/usr/bin/env bash
# sluice (in-process store) against the no-op server (the ceiling), with the
# same load, alternating in one run so both see the same machine.
#
#   cargo build --release --bins
#   benches/load.sh                      # 5 rounds x 10 s each, 4 x 16 in flight
#   ROUNDS=3 DURATION=20s CONNECTIONS=8 CONCURRENCY=8 benches/load.sh
#   EXTRA="--hot" benches/load.sh        # one hot counter
#   BEFORE=/tmp/old/sluice benches/load.sh  # also an older build, same rounds
#
# Client and servers share the machine's cores: on a 2-core machine the load
# generator takes a large share of the CPU, for both targets alike.
# Every round runs sluice then the ceiling (with BEFORE, the older build first); each line of $OUT is one
# `sluice-load --json` result plus the server's CPU time per call (from
# /proc/PID/stat, so it includes only the server process).
set -euo pipefail

BIN=${BIN:-target/release}
RULES=${RULES:-examples/rules}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-4}
CONCURRENCY=${CONCURRENCY:-16}
DOMAIN=${DOMAIN:-weather}
CLIENTS=${CLIENTS:-10000}
EXTRA=${EXTRA:-}
SLUICE_PORT=${SLUICE_PORT:-18081}
HTTP_PORT=${HTTP_PORT:-18080}
NOOP_PORT=${NOOP_PORT:-19091}
BEFORE=${BEFORE:-}
BEFORE_PORT=${BEFORE_PORT:-18083}
OUT=${OUT:-/tmp/sluice-bench/results.jsonl}

mkdir -p "$(dirname "$OUT")"
: >"$OUT"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -f "$OUT.run.json" "$OUT.run.time"
}
trap cleanup EXIT

"$BIN/sluice" serve --rules "$RULES" --grpc-addr "127.0.0.1:$SLUICE_PORT" \
    --http-addr "127.0.0.1:$HTTP_PORT" >"$(dirname "$OUT")/sluice.log" 2>&1 &
sluice_pid=$!
pids+=("$sluice_pid")
if [ -n "$BEFORE" ]; then
    "$BEFORE" serve --rules "$RULES" --grpc-addr "127.0.0.1:$BEFORE_PORT" \
        --http-addr "127.0.0.1:$((BEFORE_PORT + 1))" >"$(dirname "$OUT")/before.log" 2>&1 &
    before_pid=$!
    pids+=("$before_pid")
fi
"$BIN/sluice-load" noop-server --listen "127.0.0.1:$NOOP_PORT" \
    >"$(dirname "$OUT")/noop.log" 2>&1 &
noop_pid=$!
pids+=("$noop_pid")

wait_ready() {
    for _ in $(seq 100); do
        if "$BIN/sluice-load" --addr "$1" --domain "$DOMAIN" --calls 1 -c 1 -m 1 >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "load.sh: $1 never answered" >&2
    exit 1
}
wait_ready "127.0.0.1:$SLUICE_PORT"
wait_ready "127.0.0.1:$NOOP_PORT"
if [ -n "$BEFORE" ]; then wait_ready "127.0.0.1:$BEFORE_PORT"; fi

# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)

run() { # name addr pid
    local before after json client_cpu
    local tmp=$OUT.run
    before=$(cpu_ticks "$3")
    # The client's own CPU time too (bash's `time`: user and system seconds).
    # shellcheck disable=SC2086
    { TIMEFORMAT='%3U %3S'; time "$BIN/sluice-load" --addr "$2" --domain "$DOMAIN" \
        --clients "$CLIENTS" -c "$CONNECTIONS" -m "$CONCURRENCY" --duration "$DURATION" \
        --warmup "$WARMUP" --json $EXTRA >"$tmp.json"; } 2>"$tmp.time"
    after=$(cpu_ticks "$3")
    json=$(cat "$tmp.json")
    client_cpu=$(awk '{print $1 + $2}' "$tmp.time")
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$3/status")
    python3 -c '
import json, sys
r = json.loads(sys.argv[1])
r["target"] = sys.argv[2]
r["round"] = int(sys.argv[3])
ticks, tck = int(sys.argv[4]), int(sys.argv[5])
# CPU over warm-up + measured window, per call of the measured window scaled
# to the whole run; the two windows run at the same rate.
total_s = r["duration_s"] + r["warmup_s"]
r["server_cpu_us_per_call"] = ticks / tck * 1e6 / (r["calls_per_s"] * total_s) if r["calls"] else None
r["loadavg"] = open("/proc/loadavg").read().split()[0]
r["server_rss_kb"] = int(sys.argv[6])
r["client_cpu_us_per_call"] = float(sys.argv[7]) * 1e6 / (r["calls_per_s"] * total_s) if r["calls"] else None
print(json.dumps(r))' "$json" "$1" "$round" "$((after - before))" "$tck" "$rss" "$client_cpu" | tee -a "$OUT"
}

for round in $(seq "$ROUNDS"); do
    if [ -n "$BEFORE" ]; then run before "127.0.0.1:$BEFORE_PORT" "$before_pid"; fi
    run sluice "127.0.0.1:$SLUICE_PORT" "$sluice_pid"
    run noop "127.0.0.1:$NOOP_PORT" "$noop_pid"
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(target, f):
    return statistics.median(f(r) for r in rows if r["target"] == target)
print()
print("| target | calls/s (median) | p50 µs | p99 µs | p99.9 µs | server CPU µs/call | client CPU µs/call | OK | OVER_LIMIT | errors | server RSS MB (end) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for t in ("before", "sluice", "noop"):
    rs = [r for r in rows if r["target"] == t]
    if not rs:
        continue
    print(f"| {t} | {med(t, lambda r: r['calls_per_s']):.0f} | {med(t, lambda r: r['latency_us']['p50']):.0f}"
          f" | {med(t, lambda r: r['latency_us']['p99']):.0f} | {med(t, lambda r: r['latency_us']['p999']):.0f}"
          f" | {med(t, lambda r: r['server_cpu_us_per_call']):.1f}"
          f" | {med(t, lambda r: r['client_cpu_us_per_call']):.1f}"
          f" | {sum(r['ok'] for r in rs)} | {sum(r['over_limit'] for r in rs)} | {sum(r['errors'] for r in rs)}"
          f" | {rs[-1]['server_rss_kb'] / 1024:.0f} |")
noop = {r["round"]: r for r in rows if r["target"] == "noop"}
cpu = lambda r: r["server_cpu_us_per_call"] + r["client_cpu_us_per_call"]
print()
for t in ("before", "sluice"):
    rs = [r for r in rows if r["target"] == t]
    if not rs:
        continue
    ratios = [r["calls_per_s"] / noop[r["round"]]["calls_per_s"] for r in rs]
    print(f"{t} / ceiling, calls/s per round:", " ".join(f"{x:.1%}" for x in ratios),
          f"(median {statistics.median(ratios):.1%})")
    # When the machine's cores are the bottleneck, throughput goes as
    # 1 / (client + server CPU per call): the ratio the cores allow.
    ratios = [cpu(noop[r["round"]]) / cpu(r) for r in rs]
    print(f"{t} / ceiling, CPU per call (client + server):", " ".join(f"{x:.1%}" for x in ratios),
          f"(median {statistics.median(ratios):.1%})")
EOF
