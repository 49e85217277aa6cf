#!/usr/bin/env bash
# Instructions per call of a server under load, counted by callgrind: the same
# binary and load give the same count however busy the machine is.
#
#   cargo build --release --bins
#   benches/profile.sh sluice     # sluice serve, in-process store
#   benches/profile.sh noop       # the no-op server (the ceiling)
#   benches/profile.sh noop-hyper # the no-op on hyper alone (noop-raw-h2: on h2 alone)
#   STORE=redis://127.0.0.1:6379 benches/profile.sh sluice   # on a Redis
# (with a store, the store timeout is SERVE_TIMEOUT, 2s by default: a server
# under callgrind runs some fifty times slower, and the failure mode's
# answers are not the path to profile)
#
# The server runs under callgrind with instrumentation off; WARM calls warm it up
# (connections, metric registration, map growth), then instrumentation is switched
# on for exactly CALLS calls and the profile is dumped. Prints instructions
# per call; the profile is in $DIR/callgrind.out.<target>.
# callgrind_annotate $DIR/callgrind.out.sluice | head -60 shows where they go.
set -euo pipefail

target=${1:?usage: benches/profile.sh sluice|noop|noop-hyper|noop-raw-h2}
BIN=${BIN:-target/release}
RULES=${RULES:-examples/rules}
WARM=${WARM:-2000}
CALLS=${CALLS:-20000}
CONNECTIONS=${CONNECTIONS:-4}
CONCURRENCY=${CONCURRENCY:-16}
DOMAIN=${DOMAIN:-weather}
EXTRA=${EXTRA:-}
STORE=${STORE:-}
SERVE_TIMEOUT=${SERVE_TIMEOUT:-2s}
PORT=${PORT:-18181}
DIR=${DIR:-/tmp/sluice-profile}
mkdir -p "$DIR"
out="$DIR/callgrind.out.$target"
rm -f "$out"*

case "$target" in
sluice) cmd=("$BIN/sluice" serve --rules "$RULES" --grpc-addr "127.0.0.1:$PORT"
    --http-addr "127.0.0.1:$((PORT + 1))" ${STORE:+--store "$STORE" --key-secret profile --store-timeout "$SERVE_TIMEOUT"}) ;;
noop) cmd=("$BIN/sluice-load" noop-server --listen "127.0.0.1:$PORT") ;;
noop-hyper) cmd=("$BIN/sluice-load" noop-server --stack hyper --listen "127.0.0.1:$PORT") ;;
noop-raw-h2) cmd=("$BIN/sluice-load" noop-server --stack raw-h2 --listen "127.0.0.1:$PORT") ;;
*) echo "unknown target $target" >&2; exit 2 ;;
esac

valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "${cmd[@]}" >"$DIR/$target.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT

load() { # calls
    # shellcheck disable=SC2086
    "$BIN/sluice-load" --addr "127.0.0.1:$PORT" --domain "$DOMAIN" -c "$CONNECTIONS" \
        -m "$CONCURRENCY" --calls "$1" --timeout 60s $EXTRA
}
for _ in $(seq 300); do
    if "$BIN/sluice-load" --addr "127.0.0.1:$PORT" --domain "$DOMAIN" --calls 1 -c 1 -m 1 \
        --timeout 10s >/dev/null 2>&1; then break; fi
    sleep 0.2
done
load "$WARM" >/dev/null
callgrind_control -i on "$server" >/dev/null
load "$CALLS" | tee "$DIR/$target.load.txt"
callgrind_control -i off "$server" >/dev/null
callgrind_control -d "$server" >/dev/null
sleep 1
dump="$out.1"
total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$target: $total instructions for $CALLS calls = $((total / CALLS)) per call ($dump)"
