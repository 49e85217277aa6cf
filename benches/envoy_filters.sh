#!/usr/bin/env bash
# Envoy 1.40 in front of a backend, under the same h2load load, with sluice
# deciding per request (the `ratelimit` filter, examples/envoy/envoy.yaml)
# or by quota (the `rate_limit_quota` filter, examples/envoy/envoy-rlqs.yaml),
# and the same gateway without either filter as the ceiling; the three
# alternate round after round (the order reversed every other round).
#
#   cargo build --release --bins
#   benches/envoy_filters.sh
#   ROUNDS=5 DURATION=10 benches/envoy_filters.sh
#   OVER=1 benches/envoy_filters.sh     # then a limited bucket at full load for a whole window
#
# The load: h2load over h2c, CONNECTIONS x STREAMS requests in flight, every
# request `GET /forecast` with `x-client-id: bench-client`: one descriptor,
# or one bucket, `client_id=bench-client`, with a limit of a billion an hour
# (so every request passes and takes the whole path). The backend is a
# second Envoy answering 200 by itself (direct_response), so that it costs
# little. sluice runs with in-process counters. CPU per request is each
# process's user + system time from /proc/PID/stat over the measured run,
# divided by the requests h2load completed; latency percentiles come from
# h2load's per-request log. A short unmeasured run before each measured one
# warms the connections (and, for the quota filter, gets the bucket its
# first share).
#
# With OVER=1, a last run sends the same load through the quota filter
# against a limit of LIMIT a minute (fixed windows) from the start of a
# minute to the end of the next, and counts, per window, the 200s by the
# time h2load sent them: what was admitted beside the limit.
#
# Prints Markdown rows; raw lines go to $WORK/results.tsv.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$REPO/.tools/bin:$PATH"
BIN=${BIN:-$REPO/target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNECTIONS=${CONNECTIONS:-4}
STREAMS=${STREAMS:-16}
OVER=${OVER:-0}
LIMIT=${LIMIT:-6000}
WORK=${WORK:-/tmp/sluice-envoy-filters}
BASE=${BASE:-24400}                 # gateway BASE, its admin +1, backend +2, its admin +3, sluice gRPC +81, HTTP +80
CLK_TCK=$(getconf CLK_TCK)

command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; }
command -v envoy >/dev/null || { echo "envoy not found: bash .ci/install-tools.sh" >&2; exit 1; }
[ -x "$BIN/sluice" ] || { echo "$BIN/sluice not found: cargo build --release --bins" >&2; exit 1; }

GATEWAY=$BASE
GATEWAY_ADMIN=$((BASE + 1))
BACKEND=$((BASE + 2))
BACKEND_ADMIN=$((BASE + 3))
SLUICE_HTTP=$((BASE + 80))
SLUICE_GRPC=$((BASE + 81))

rm -rf "$WORK" && mkdir -p "$WORK"
RESULTS="$WORK/results.tsv"
printf 'round\tfilter\trequests_per_s\tp50_us\tp99_us\tsluice_cpu_us\tenvoy_cpu_us\tok_share\n' >"$RESULTS"

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
unset BASE # common.sh's cleanup stops Redis on BASE; this script starts none

# The examples with this run's ports and domain; `none` without any filter
# but the router.
render() { # EXAMPLE OUT
    sed -e "s/port_value: 10000$/port_value: $GATEWAY/" \
        -e "s/port_value: 9901$/port_value: $GATEWAY_ADMIN/" \
        -e "s/port_value: 8081$/port_value: $SLUICE_GRPC/" \
        -e "s/port_value: 8000$/port_value: $BACKEND/" \
        -e "s/domain: weather$/domain: bench/" \
        "$REPO/examples/envoy/$1" >"$2"
}
render envoy.yaml "$WORK/ratelimit.yaml"
render envoy-rlqs.yaml "$WORK/quota.yaml"
python3 - "$WORK/ratelimit.yaml" "$WORK/none.yaml" <<'EOF'
import sys
lines = open(sys.argv[1]).read().split('\n')
start = next(i for i, l in enumerate(lines) if 'name: envoy.filters.http.ratelimit' in l)
end = next(i for i, l in enumerate(lines) if 'name: envoy.filters.http.router' in l)
open(sys.argv[2], 'w').write('\n'.join(lines[:start] + lines[end:]))
EOF
cat >"$WORK/backend.yaml" <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $BACKEND_ADMIN } }
static_resources:
  listeners:
    - name: backend
      address: { socket_address: { address: 127.0.0.1, port_value: $BACKEND } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: backend
                route_config:
                  virtual_hosts:
                    - name: backend
                      domains: ["*"]
                      routes:
                        - match: { prefix: "/" }
                          direct_response: { status: 200, body: { inline_string: "sunny\n" } }
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
EOF
for config in ratelimit quota none backend; do
    envoy --mode validate -c "$WORK/$config.yaml" >/dev/null 2>&1 || { echo "$config.yaml does not validate" >&2; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

wait_http() { # PORT PATH
    for _ in $(seq 1 200); do
        curl -sf -o /dev/null "http://127.0.0.1:$1$2" && return 0
        sleep 0.05
    done
    echo "nothing answers on $1$2" >&2
    exit 1
}

start_sluice() { # RULES_DIR
    "$BIN/sluice" serve --rules "$1" --grpc-addr "127.0.0.1:$SLUICE_GRPC" \
        --http-addr "127.0.0.1:$SLUICE_HTTP" --log-level warn >>"$WORK/sluice.log" 2>&1 &
    SLUICE_PID=$!
    pids+=("$SLUICE_PID")
    wait_http "$SLUICE_HTTP" /readyz
}

start_envoy() { # CONFIG LOG ADMIN_PORT
    envoy -c "$1" --log-level error --disable-hot-restart >>"$2" 2>&1 &
    ENVOY_PID=$!
    pids+=("$ENVOY_PID")
    wait_http "$3" /ready
}

load() { # LOG SECONDS
    h2load -D "$2" -c "$CONNECTIONS" -m "$STREAMS" -H 'x-client-id: bench-client' \
        --log-file="$1" "http://127.0.0.1:$GATEWAY/forecast"
}

write_rules hour 1000000000
start_envoy "$WORK/backend.yaml" "$WORK/backend.log" "$BACKEND_ADMIN"
start_sluice "$WORK/rules"
echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| round | filter | requests/s | p50 µs | p99 µs | sluice CPU µs/request | gateway Envoy CPU µs/request | 200s |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"

run() { # ROUND FILTER
    local round=$1 filter=$2 log="$WORK/$1-$2.log"
    start_envoy "$WORK/$filter.yaml" "$WORK/gateway-$filter.log" "$GATEWAY_ADMIN"
    load "$WORK/warmup.log" "$WARMUP" >/dev/null
    local s0 e0 s1 e1 out
    s0=$(cpu_ticks "$SLUICE_PID")
    e0=$(cpu_ticks "$ENVOY_PID")
    out=$(load "$log" "$DURATION")
    s1=$(cpu_ticks "$SLUICE_PID")
    e1=$(cpu_ticks "$ENVOY_PID")
    kill "$ENVOY_PID"
    wait "$ENVOY_PID" 2>/dev/null || true
    python3 - "$log" "$DURATION" $((s1 - s0)) $((e1 - e0)) "$CLK_TCK" "$round" "$filter" <<'EOF' | tee -a "$RESULTS" | awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8}'
import sys
log, duration, sluice_ticks, envoy_ticks, tck, rnd, flt = sys.argv[1:]
rows = [l.split('\t') for l in open(log) if l.strip()]
lat = sorted(int(r[2]) for r in rows)
n = len(rows)
ok = sum(1 for r in rows if r[1] == '200')
pct = lambda p: lat[min(n - 1, int(p * n))] if n else 0
per = lambda ticks: int(ticks) / int(tck) * 1e6 / n if n else 0
print(f"{rnd}\t{flt}\t{n / float(duration):.0f}\t{pct(0.5)}\t{pct(0.99)}\t{per(sluice_ticks):.2f}\t{per(envoy_ticks):.1f}\t{ok / n if n else 0:.3f}")
EOF
}

for round in $(seq 1 "$ROUNDS"); do
    order="ratelimit quota none"
    [ $((round % 2)) -eq 0 ] && order="none quota ratelimit"
    for filter in $order; do run "$round" "$filter"; done
done

echo
python3 - "$RESULTS" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter='\t'))
print("medians:")
print("| filter | requests/s | p50 µs | p99 µs | sluice CPU µs/request | gateway Envoy CPU µs/request |")
print("|---|---:|---:|---:|---:|---:|")
for f in ["ratelimit", "quota", "none"]:
    r = [x for x in rows if x['filter'] == f]
    m = lambda k: statistics.median(float(x[k]) for x in r)
    print(f"| {f} | {m('requests_per_s'):.0f} | {m('p50_us'):.0f} | {m('p99_us'):.0f} | {m('sluice_cpu_us'):.2f} | {m('envoy_cpu_us'):.1f} |")
EOF

if [ "$OVER" = 1 ]; then
    kill "$SLUICE_PID"
    wait "$SLUICE_PID" 2>/dev/null || true
    write_rules minute "$LIMIT" fixed_window
    start_sluice "$WORK/rules"
    start_envoy "$WORK/quota.yaml" "$WORK/gateway-over.log" "$GATEWAY_ADMIN"
    # From just after a minute starts to the end of the next one.
    now=$(date +%s.%N)
    sleep "$(python3 -c "import math; n=$now; print(math.ceil(n / 60) * 60 - n + 0.2)")"
    echo
    echo "over-admission: the quota filter at full load, $LIMIT a minute (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    load "$WORK/over.log" 119 >/dev/null
    python3 - "$WORK/over.log" "$LIMIT" <<'EOF'
import collections, sys
windows = collections.Counter()
sent = collections.Counter()
for line in open(sys.argv[1]):
    start, status, _ = line.split('\t')
    w = int(start) // 60_000_000
    sent[w] += 1
    if status == '200':
        windows[w] += 1
for w in sorted(sent):
    print(f"window {w}: {sent[w]} sent, {windows[w]} admitted (limit {sys.argv[2]})")
EOF
fi
