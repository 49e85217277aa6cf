#!/usr/bin/env bash
# The event stream's cost and speed, measured against the real RabbitMQ
# (127.0.0.1:5672, guest/guest) and PostgreSQL (127.0.0.1:5432, user
# postgres) this machine runs:
#
#   1. decisions/s and p99 with the stream on (--events-url) and off (usage
#      written straight to PostgreSQL), two sluice instances on the same
#      rules, alternating h2load runs round after round;
#   2. broker messages per 1 000 decisions (the aggregation's effect), from
#      the instance's own `published` count in /readyz;
#   3. the time from a violation to its row in PostgreSQL, through the
#      broker and `sluice consume usage`, over SAMPLES violations.
#
#   cargo build --release --bins
#   benches/events.sh
#   ROUNDS=5 DURATION=10 SAMPLES=50 benches/events.sh
#
# The load: h2load (one thread), CONNECTIONS x STREAMS in flight, every call
# the same request: domain `bench`, one descriptor `api_key=<a tenant's key>`
# (so every decision is metered: the key's lookup, its tenant's monthly
# quota, and a usage record). The events publisher's own ceiling (events/s
# with confirms) is `cargo bench --bench events_publish`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$REPO/.tools/bin:$PATH"
BIN=${BIN:-$REPO/target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-4}
STREAMS=${STREAMS:-16}
SAMPLES=${SAMPLES:-30}
WORK=${WORK:-/tmp/sluice-events-bench}
PORT=${PORT:-24481}
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
DB=sluice_bench_events
RABBIT=${RABBIT:-amqp://guest:guest@127.0.0.1:5672/%2f}
PREFIX="bench-$$."

command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; }
[ -x "$BIN/sluice" ] || { echo "$BIN/sluice not found: cargo build --release --bins" >&2; exit 1; }

rm -rf "$WORK" && mkdir -p "$WORK/rules" "$WORK/spool"
# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"

psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
export SLUICE_DATABASE_URL="$PGURL/$DB" SLUICE_KEY_SECRET=bench
sluice() { "$BIN/sluice" "$@"; }
sluice migrate >/dev/null
cat >"$WORK/rules/bench.yaml" <<'EOF'
domain: bench
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 1}
EOF
sluice rules apply "$WORK/rules" >/dev/null
sluice tenants create bench --plan enterprise >/dev/null
KEY=$(sluice keys issue --tenant bench)

python3 - "$WORK/request.bin" "$KEY" <<'EOF'
import struct, sys
def field(number, payload):
    return bytes([number << 3 | 2, len(payload)]) + payload
entry = field(1, b"api_key") + field(2, sys.argv[2].encode())
message = field(1, b"bench") + field(2, field(1, entry))
open(sys.argv[1], "wb").write(b"\0" + struct.pack(">I", len(message)) + message)
EOF

serve() { # name port extra-args...
    local name=$1 port=$2
    shift 2
    "$BIN/sluice" serve --rules postgres --grpc-addr "127.0.0.1:$port" \
        --http-addr "127.0.0.1:$((port + 1))" "$@" >"$WORK/$name.log" 2>&1 &
    pids+=($!)
    wait_port "$port"
}
serve off "$PORT"
serve on $((PORT + 10)) --events-url "$RABBIT" --events-prefix "$PREFIX" \
    --events-spool "$WORK/spool" --instance bench
SLUICE_EVENTS_URL="$RABBIT" SLUICE_EVENTS_PREFIX="$PREFIX" \
    "$BIN/sluice" consume usage >"$WORK/consumer.log" 2>&1 &
pids+=($!)
sleep 1

published() { # port -> events published so far by that instance
    curl -s "http://127.0.0.1:$(($1 + 1))/readyz" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["events"]["published"])'
}

RESULTS="$WORK/results.tsv"
printf 'round\tstream\tcalls_per_s\tp50_us\tp99_us\tmessages_per_1000\n' >"$RESULTS"
run() { # round name port
    local round=$1 name=$2 port=$3 log="$WORK/h2load-$2-$1" before=0 after=0
    [ "$name" = on ] && before=$(published "$port")
    h2load -c "$CONNECTIONS" -m "$STREAMS" -t 1 -D "$DURATION" --warm-up-time "$WARMUP" \
        --log-file "$log.tsv" --data "$WORK/request.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$port/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" \
        >"$log.out" 2>&1 || { cat "$log.out" >&2; exit 1; }
    # The last flush of the run's sums (--events-flush 1s).
    if [ "$name" = on ]; then sleep 1.5; after=$(published "$port"); fi
    local rate calls p50 p99 per1000
    rate=$(awk '/^finished in/ {print $4}' "$log.out")
    calls=$(awk -v r="$rate" -v d="$DURATION" -v w="$WARMUP" 'BEGIN {printf "%d", r * (d + w)}')
    read -r p50 p99 < <(cut -f3 "$log.tsv" | sort -n | awk '{v[NR] = $1} END {print v[int(NR * 0.5)], v[int(NR * 0.99)]}')
    per1000=$(awk -v m="$((after - before))" -v c="$calls" 'BEGIN {printf "%.3f", m * 1000 / c}')
    [ "$name" = on ] || per1000=-
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$rate" "$p50" "$p99" "$per1000" >>"$RESULTS"
    printf '| %s | %s | %.0f | %s | %s | %s |\n' "$round" "$name" "$rate" "$p50" "$p99" "$per1000"
}

echo "load: h2load ${CONNECTIONS}x${STREAMS} in flight, ${DURATION}s after ${WARMUP}s warm-up; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| round | event stream | calls/s | p50 µs | p99 µs | broker messages per 1 000 decisions |"
echo "|---:|---|---:|---:|---:|---:|"
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="off on"; else order="on off"; fi
    for name in $order; do
        if [ "$name" = on ]; then run "$round" on $((PORT + 10)); else run "$round" off "$PORT"; fi
    done
done
echo
awk -F'\t' 'NR > 1 {n[$2]++; r[$2, n[$2]] = $3; p[$2, n[$2]] = $5}
function med(a, k, c,   i, j, t, v) {
    for (i = 1; i <= c; i++) v[i] = a[k, i] + 0
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return c % 2 ? v[(c + 1) / 2] : (v[c / 2] + v[c / 2 + 1]) / 2
}
END {
    printf "medians: off %.0f calls/s (p99 %.0f µs), on %.0f calls/s (p99 %.0f µs): on / off = %.2f\n",
        med(r, "off", n["off"]), med(p, "off", n["off"]), med(r, "on", n["on"]), med(p, "on", n["on"]),
        med(r, "on", n["on"]) / med(r, "off", n["off"])
}' "$RESULTS"

# Violations: a new user's second call is denied (1 an hour); the time until
# its row is in PostgreSQL, polled with psql (each poll costs ~10 ms).
echo
latencies="$WORK/violation-ms.txt"
: >"$latencies"
count() { psql -Atq "$PGURL/$DB" -c "SELECT coalesce(sum(hits), 0) FROM violations"; }
for i in $(seq 1 "$SAMPLES"); do
    user="u$$-$i"
    before=$(count)
    "$BIN/sluice" check --addr "127.0.0.1:$((PORT + 10))" --domain bench -d "user=$user" >/dev/null || true
    if "$BIN/sluice" check --addr "127.0.0.1:$((PORT + 10))" --domain bench -d "user=$user" >/dev/null; then
        echo "the second call of $user was not denied" >&2
        exit 1
    fi
    denied=$(date +%s%N)
    until [ "$(count)" != "$before" ]; do
        [ $(( ($(date +%s%N) - denied) / 1000000 )) -lt 30000 ] || { echo "no violation row within 30 s" >&2; exit 1; }
        sleep 0.005
    done
    echo $(( ($(date +%s%N) - denied) / 1000000 )) >>"$latencies"
done
sort -n "$latencies" | awk '{v[NR] = $1} END {
    printf "violation to its PostgreSQL row, %d samples: p50 %d ms, p90 %d ms, max %d ms\n", NR, v[int(NR * 0.5) + 1], v[int(NR * 0.9) + 1], v[NR]}'
echo "(the event stream flushes its sums every --events-flush, 1 s by default; the consumer batches up to --batch-wait, 200 ms)"
echo
echo "Raw per-run figures: $RESULTS"
