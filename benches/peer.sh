#!/usr/bin/env bash
# sluice beside a peer rate-limit server (Kuadrant's limitador-server) under
# the same h2load load, alternating the servers round after round in one
# run, with the no-op server (`sluice-load noop-server`) as a third
# contender: what HTTP/2 and gRPC alone cost here.
#
#   cargo build --release --bins
#   LIMITADOR_BIN=/path/to/limitador-server benches/peer.sh
#   MODES="memory redis cluster" ROUNDS=5 DURATION=10 benches/peer.sh
#   INFLIGHT="1x1 1x4 1x16 4x16" MODES=redis benches/peer.sh   # latency by calls in flight
#   HALF=1 benches/peer.sh             # also p99 at half of each server's maximum
#   OTHERS="before=/tmp/old/sluice" benches/peer.sh   # other sluice builds, same rounds
#   NOOPS="tonic hyper raw-h2" benches/peer.sh   # the no-op on less and less of the stack
#
# LIMITADOR_BIN is a limitador-server built from its own source (see
# BENCHMARKS.md); without it the peer's rows are left out. Modes:
#   memory   counters in the server's process
#   redis    one standalone redis-server started here (both servers share it;
#            its CPU is read during each server's runs)
#   cluster  a 6-node Redis Cluster started here (sluice only: the peer has
#            no Cluster client; compare with its standalone row)
#
# The load: h2load (a C client, so the client's CPU does not hide the
# servers'), CONNECTIONS x STREAMS calls in flight, every call the same
# request: domain `bench`, one descriptor `client_id=bench-client`, a limit
# of a billion an hour, so every call takes the full read-modify-write path.
# h2load counts gRPC errors as successes, so the script checks that each run
# received response messages (data bytes per call) and reads each server's
# CPU time from /proc. Latency percentiles come from h2load's per-request log.
#
# Prints one Markdown row per run and a summary per mode (medians of the
# per-round figures); raw lines go to $WORK/results.tsv.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$REPO/.tools/bin:$PATH"
BIN=${BIN:-$REPO/target/release}
LIMITADOR_BIN=${LIMITADOR_BIN:-}
MODES=${MODES:-memory redis}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
INFLIGHT=${INFLIGHT:-4x16}          # CONNECTIONSxSTREAMS, space-separated list
HALF=${HALF:-0}                     # 1: each run again at half the rate it reached
NOOP=${NOOP:-1}                     # 0 leaves the no-op ceiling out
NOOPS=${NOOPS:-tonic}               # no-op servers: tonic (sluice's stack), hyper, raw-h2
OTHERS=${OTHERS:-}                  # "label=path ..." more sluice builds to alternate with
WORK=${WORK:-/tmp/sluice-peer}
BASE=${BASE:-24100}                 # Redis on BASE, Cluster on BASE+1..BASE+6
SLUICE_PORT=${SLUICE_PORT:-24181}
PEER_PORT=${PEER_PORT:-24281}
NOOP_PORT=${NOOP_PORT:-24381}
CLK_TCK=$(getconf CLK_TCK)

command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; }
[ -x "$BIN/sluice" ] || { echo "$BIN/sluice not found: cargo build --release --bins" >&2; exit 1; }
if [ -n "$LIMITADOR_BIN" ] && [ ! -x "$LIMITADOR_BIN" ]; then
    echo "LIMITADOR_BIN=$LIMITADOR_BIN is not an executable" >&2
    exit 1
fi

rm -rf "$WORK" && mkdir -p "$WORK/rules"
RESULTS="$WORK/results.tsv"
printf 'mode\tround\tinflight\tserver\tcalls_per_s\tserver_cpu_us\tredis_cpu_us\tredis_calls\tp50_us\tp99_us\tp999_us\tdata_bytes_per_call\n' >"$RESULTS"

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
write_rules hour 1000000000
cat >"$WORK/limits.yaml" <<'EOF'
- namespace: bench
  name: per-client
  max_value: 1000000000
  seconds: 3600
  conditions: []
  variables:
    - "descriptors[0]['client_id']"
EOF

# One gRPC message: a compression flag, a 4-byte big-endian length, then
# RateLimitRequest{domain: "bench", descriptors: [{entries: [{client_id: bench-client}]}]}.
python3 - "$WORK/request.bin" <<'EOF'
import struct, sys
def field(number, payload):
    return bytes([number << 3 | 2, len(payload)]) + payload
entry = field(1, b"client_id") + field(2, b"bench-client")
message = field(1, b"bench") + field(2, field(1, entry))
open(sys.argv[1], "wb").write(b"\0" + struct.pack(">I", len(message)) + message)
EOF

cpu_ticks() { # pid -> utime + stime
    awk '{print $14 + $15}' "/proc/$1/stat"
}

redis_pid=
redis_port=
redis_calls() { # total script calls on every Redis node of this mode
    local total=0 port n
    for port in $redis_ports; do
        n=$(redis-cli -p "$port" info commandstats |
            awk -F'[=,:]' '/^cmdstat_(evalsha|eval|fcall):/ {s += $3} END {print s + 0}')
        total=$((total + n))
    done
    echo "$total"
}
redis_ticks() {
    local total=0 pid
    for pid in $redis_pids; do total=$((total + $(cpu_ticks "$pid"))); done
    echo "$total"
}

start_redis() {
    redis-server --port "$BASE" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize no --logfile "$WORK/redis.log" &
    pids+=($!)
    redis_pids=$!
    redis_ports=$BASE
    wait_port "$BASE"
}

start_cluster() {
    bash "$REPO/.ci/redis-cluster.sh" start "$WORK/cluster" $((BASE + 1)) >"$WORK/cluster.log" 2>&1
    redis_ports=$(seq $((BASE + 1)) $((BASE + 6)) | tr '\n' ' ')
    redis_pids=
    for port in $redis_ports; do
        redis_pids="$redis_pids $(redis-cli -p "$port" info server | awk -F: '/^process_id/ {print $2+0}')"
    done
}

# Every sluice build under test: "label port pid" lines.
sluices=()
start_sluice() { # store-url
    local builds=("sluice=$BIN/sluice") port=$SLUICE_PORT build
    for build in $OTHERS; do builds+=("sluice-$build"); done
    sluices=()
    for build in "${builds[@]}"; do
        "${build#*=}" serve --store "$1" --key-secret bench --rules "$WORK/rules" \
            --grpc-addr "127.0.0.1:$port" --http-addr "127.0.0.1:$((port + 1))" \
            >"$WORK/${build%%=*}.log" 2>&1 &
        pids+=($!)
        sluices+=("${build%%=*} $port $!")
        wait_port "$port"
        port=$((port + 10))
    done
}

start_peer() { # storage args...
    "$LIMITADOR_BIN" -b 127.0.0.1 -p "$PEER_PORT" -B 127.0.0.1 -P $((PEER_PORT + 1)) \
        "$WORK/limits.yaml" "$@" >"$WORK/peer.log" 2>&1 &
    pids+=($!)
    peer_pid=$!
    wait_port "$PEER_PORT"
}

# Every no-op server: "label port pid" lines; "noop" is tonic's, the stack
# sluice serves on, the others answer the same on less of it.
noops=()
start_noop() {
    local flavour port=$NOOP_PORT label args
    noops=()
    for flavour in $NOOPS; do
        case $flavour in
            tonic) label=noop args=() ;;
            hyper) label=noop-hyper args=(--stack hyper) ;;
            raw-h2) label=noop-raw-h2 args=(--stack raw-h2) ;;
            *) echo "unknown no-op server $flavour" >&2; exit 1 ;;
        esac
        "$BIN/sluice-load" noop-server --listen "127.0.0.1:$port" "${args[@]}" >"$WORK/$label.log" 2>&1 &
        pids+=($!)
        noops+=("$label $port $!")
        wait_port "$port"
        port=$((port + 10))
    done
}

stop_servers() {
    local s all=()
    for s in "${sluices[@]}" "${noops[@]}"; do all+=("${s##* }"); done
    for pid in "${all[@]}" ${peer_pid:-}; do kill "$pid" 2>/dev/null || true; done
    wait "${all[@]}" ${peer_pid:-} 2>/dev/null || true
    sluices=() noops=() peer_pid=
}

# The rate of the last run (calls/s), for HALF=1.
last_rate=0

# run MODE ROUND INFLIGHT NAME PORT PID [CALLS_PER_S]: one h2load run; with
# CALLS_PER_S, at that rate (label "NAME@half") instead of as fast as it goes.
run() {
    local mode=$1 round=$2 inflight=$3 name=$4 port=$5 pid=$6 target=${7:-}
    local conns=${inflight%x*} streams=${inflight#*x}
    local rate_args=()
    if [ -n "$target" ]; then
        # --rps is per client (connection).
        rate_args=(--rps "$(awk -v m="$target" -v c="$conns" 'BEGIN {printf "%d", m / c}')")
        name="$name@half"
    fi
    local log="$WORK/h2load-$mode-$name-$inflight-$round"
    local redis_before=0 calls_before=0
    if [ -n "${redis_pids:-}" ]; then
        redis_before=$(redis_ticks)
        calls_before=$(redis_calls)
    fi
    local cpu_before
    cpu_before=$(cpu_ticks "$pid")
    h2load -c "$conns" -m "$streams" -t 1 -D "$DURATION" --warm-up-time "$WARMUP" \
        "${rate_args[@]}" --log-file "$log.tsv" \
        --data "$WORK/request.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$port/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" \
        >"$log.out" 2>&1 || { cat "$log.out" >&2; exit 1; }
    local cpu_after
    cpu_after=$(cpu_ticks "$pid")
    local redis_cpu=0 calls=0
    if [ -n "${redis_pids:-}" ]; then
        redis_cpu=$(( $(redis_ticks) - redis_before ))
        calls=$(( $(redis_calls) - calls_before ))
    fi
    # "requests: 1000 total, 1000 started, 1000 done, 1000 succeeded, ..."
    local done_calls rate data_bytes
    done_calls=$(awk '/^requests:/ {print $8}' "$log.out")
    rate=$(awk '/^finished in/ {print $4}' "$log.out")
    # "traffic: 1.2MB (1234567) total, 100KB (102400) headers (space savings ...), 20KB (20480) data"
    data_bytes=$(awk '/^traffic:/ {for (i = 1; i <= NF; i++) if ($i == "data") {v = $(i - 1); gsub(/[()]/, "", v); print v}}' "$log.out")
    [ "${done_calls:-0}" -gt 0 ] || { cat "$log.out" >&2; echo "no calls completed" >&2; exit 1; }
    # The warm-up's calls are in h2load's traffic totals but not in "done".
    local per_call
    per_call=$(awk -v d="$data_bytes" -v n="$done_calls" 'BEGIN {printf "%.1f", d / n}')
    if awk -v p="$per_call" 'BEGIN {exit !(p < 8)}'; then
        echo "$name answered $per_call data bytes per call: errors, not decisions" >&2
        cat "$log.out" >&2
        exit 1
    fi
    local server_us redis_us per_decision_calls
    server_us=$(awk -v t="$((cpu_after - cpu_before))" -v n="$done_calls" -v hz="$CLK_TCK" -v r="$rate" -v d="$DURATION" -v w="$WARMUP" \
        'BEGIN {printf "%.1f", t / hz * 1e6 / (r * (d + w))}')
    redis_us=$(awk -v t="$redis_cpu" -v hz="$CLK_TCK" -v r="$rate" -v d="$DURATION" -v w="$WARMUP" \
        'BEGIN {printf "%.1f", t / hz * 1e6 / (r * (d + w))}')
    per_decision_calls=$(awk -v c="$calls" -v r="$rate" -v d="$DURATION" -v w="$WARMUP" \
        'BEGIN {printf "%.3f", c / (r * (d + w))}')
    local p50 p99 p999
    read -r p50 p99 p999 < <(cut -f3 "$log.tsv" | sort -n | awk '{v[NR] = $1} END {
        i50 = int(NR * 0.50); i99 = int(NR * 0.99); i999 = int(NR * 0.999);
        if (i50 < 1) i50 = 1; if (i99 < 1) i99 = 1; if (i999 < 1) i999 = 1;
        print v[i50], v[i99], v[i999]}')
    last_rate=$rate
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$round" "$inflight" "$name" \
        "$rate" "$server_us" "$redis_us" "$per_decision_calls" "$p50" "$p99" "$p999" "$per_call" >>"$RESULTS"
    printf '| %s | %s | %s | %s | %.0f | %s | %s | %s | %s / %s / %s |\n' "$mode" "$round" "$inflight" "$name" \
        "$rate" "$server_us" "$redis_us" "$per_decision_calls" "$p50" "$p99" "$p999"
}

contenders() { # mode -> "name port pid" lines, alternating order by round parity
    local mode=$1
    printf '%s\n' "${sluices[@]}"
    if [ -n "${peer_pid:-}" ]; then echo "limitador $PEER_PORT $peer_pid"; fi
    if [ "${#noops[@]}" -gt 0 ]; then printf '%s\n' "${noops[@]}"; fi
}

echo "load: h2load, DURATION=${DURATION}s after ${WARMUP}s warm-up, in flight $INFLIGHT, HALF=$HALF; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| mode | round | in flight | server | calls/s | server CPU µs/call | Redis CPU µs/call | script calls/call | p50 / p99 / p99.9 µs |"
echo "|---|---:|---|---|---:|---:|---:|---:|---|"
for mode in $MODES; do
    redis_pids= redis_ports=
    case $mode in
        memory)
            start_sluice memory
            [ -z "$LIMITADOR_BIN" ] || start_peer memory
            ;;
        redis)
            start_redis
            start_sluice "redis://127.0.0.1:$BASE"
            [ -z "$LIMITADOR_BIN" ] || start_peer redis "redis://127.0.0.1:$BASE"
            ;;
        cluster)
            start_cluster
            start_sluice "redis+cluster://127.0.0.1:$((BASE + 1))"
            ;;
        *) echo "unknown mode $mode" >&2; exit 1 ;;
    esac
    # The ceiling does not depend on the store: measured once, beside memory.
    [ "$NOOP" = 0 ] || [ "$mode" != memory ] || start_noop
    sleep 1
    for round in $(seq 1 "$ROUNDS"); do
        mapfile -t order < <(contenders "$mode")
        if [ $((round % 2)) = 0 ]; then
            mapfile -t order < <(printf '%s\n' "${order[@]}" | tac)
        fi
        for inflight in $INFLIGHT; do
            for c in "${order[@]}"; do
                # shellcheck disable=SC2086
                run "$mode" "$round" "$inflight" $c
                if [ "$HALF" = 1 ]; then
                    # shellcheck disable=SC2086
                    run "$mode" "$round" "$inflight" $c "$(awk -v r="$last_rate" 'BEGIN {print r / 2}')"
                fi
            done
        done
    done
    stop_servers
    case $mode in
        redis) redis-cli -p "$BASE" shutdown nosave >/dev/null 2>&1 || true ;;
        cluster) bash "$REPO/.ci/redis-cluster.sh" stop "$WORK/cluster" $((BASE + 1)) >/dev/null 2>&1 || true ;;
    esac
done

echo
echo "Medians over rounds (calls/s; CPU µs per call; ratio = sluice / limitador calls/s):"
echo
echo "| mode | in flight | server | calls/s | server CPU µs/call | Redis CPU µs/call | script calls/call | p99 µs | p99.9 µs |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|"
awk -F'\t' 'NR > 1 {
    k = $1 "\t" $3 "\t" $4; n[k]++; rate[k, n[k]] = $5; cpu[k, n[k]] = $6; rcpu[k, n[k]] = $7;
    calls[k, n[k]] = $8; p99[k, n[k]] = $10; p999[k, n[k]] = $11; keys[k] = 1
}
function median(arr, k, count,   i, j, t, v) {
    for (i = 1; i <= count; i++) v[i] = arr[k, i] + 0
    for (i = 1; i <= count; i++) for (j = i + 1; j <= count; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return count % 2 ? v[(count + 1) / 2] : (v[count / 2] + v[count / 2 + 1]) / 2
}
END {
    for (k in keys) {
        split(k, f, "\t")
        m = median(rate, k, n[k]); med[f[1], f[2], f[3]] = m; cpus[f[1], f[2], f[3]] = median(cpu, k, n[k])
        rcpus[f[1], f[2], f[3]] = median(rcpu, k, n[k]); modes[f[1] "\t" f[2]] = 1
        printf "| %s | %s | %s | %.0f | %.1f | %.1f | %.3f | %.0f | %.0f |\n", f[1], f[2], f[3],
            m, median(cpu, k, n[k]), median(rcpu, k, n[k]), median(calls, k, n[k]),
            median(p99, k, n[k]), median(p999, k, n[k]) | "sort"
    }
    close("sort")
    print ""
    for (mi in modes) {
        split(mi, f, "\t")
        # The Cluster has no peer row: compare with the peer on standalone Redis.
        peer_mode = f[1] == "cluster" ? "redis" : f[1]
        if (((peer_mode, f[2], "limitador") in med) && ((f[1], f[2], "sluice") in med)) {
            printf "%s %s: sluice / limitador%s = %.2fx calls/s; server CPU per call %.2fx", f[1], f[2],
                f[1] == "cluster" ? " (standalone Redis)" : "",
                med[f[1], f[2], "sluice"] / med[peer_mode, f[2], "limitador"],
                cpus[f[1], f[2], "sluice"] / cpus[peer_mode, f[2], "limitador"]
            if (rcpus[peer_mode, f[2], "limitador"] > 0)
                printf "; Redis CPU per call %.2fx", rcpus[f[1], f[2], "sluice"] / rcpus[peer_mode, f[2], "limitador"]
            printf "\n"
        }
        if (((f[1], f[2], "noop") in med) && ((f[1], f[2], "sluice") in med))
            printf "%s %s: sluice / no-op = %.2f of the calls/s\n", f[1], f[2], med[f[1], f[2], "sluice"] / med[f[1], f[2], "noop"]
    }
}' "$RESULTS"
echo
echo "Raw per-run figures: $RESULTS"
