#!/usr/bin/env bash
# Memory of the in-process store: idle RSS, then RSS growth per live counter
# after sluice-load has touched up to a million distinct counters.
#
#   cargo build --release --bins
#   benches/memory.sh                                # 60 s of load
#   DURATION=120s OTHERS="before=/tmp/old/sluice" benches/memory.sh
#
# The counters live for an hour (one descriptor, `client_id`, 1e9 an hour),
# so none expires during the run; the live count is sluice's own
# `sluice_store_keys` gauge, read after the load stops.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN=${BIN:-$REPO/target/release}
DURATION=${DURATION:-60s}
CLIENTS=${CLIENTS:-1000000}
OTHERS=${OTHERS:-}
WORK=${WORK:-/tmp/sluice-memory}
PORT=${PORT:-24581}

rm -rf "$WORK" && mkdir -p "$WORK/rules"
# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
write_rules hour 1000000000

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

echo "| build | idle RSS MB | live counters | RSS after MB | bytes per counter |"
echo "|---|---:|---:|---:|---:|"
for build in "sluice=$BIN/sluice" $OTHERS; do
    name=${build%%=*} bin=${build#*=}
    "$bin" serve --rules "$WORK/rules" --grpc-addr "127.0.0.1:$PORT" \
        --http-addr "127.0.0.1:$((PORT + 1))" --memory-max-keys 2000000 >"$WORK/$name.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$((PORT + 1))/healthz" >/dev/null && break
        sleep 0.1
    done
    sleep 1
    idle=$(rss_kib "$pid")
    "$BIN/sluice-load" --addr "127.0.0.1:$PORT" --domain bench --clients "$CLIENTS" \
        --duration "$DURATION" --warmup 0s -c 4 -m 16 >"$WORK/$name.load" 2>&1
    sleep 2 # one sweep: the gauge is set every second
    live=$(curl -sf "http://127.0.0.1:$((PORT + 1))/metrics" |
        awk '/^sluice_store_keys/ {print $2}')
    after=$(rss_kib "$pid")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    awk -v n="$name" -v i="$idle" -v a="$after" -v l="$live" \
        'BEGIN {printf "| %s | %.1f | %d | %.1f | %.0f |\n", n, i / 1024, l, a / 1024, (a - i) * 1024 / l}'
done
