#!/usr/bin/env bash
# A profile-guided release build of sluice: build it instrumented, serve a
# training load with it, then build again with the profile it wrote.
#
#   rustup component add llvm-tools     # llvm-profdata of rustc's own LLVM
#   deploy/pgo-build.sh                 # -> target/pgo/use/release/sluice
#   OUT=/out deploy/pgo-build.sh        # also copies the binaries to /out
#   REDIS_URL=redis://127.0.0.1:6379 deploy/pgo-build.sh   # a Redis round too
#
# The training load is sluice-load (not the h2load the benchmarks use) on
# rules of each algorithm, one to three descriptors a call, 4 connections x
# 16 calls in flight: for each algorithm, TRAIN (10 s) over 10 000 client
# ids, mostly admitted, then HOT (3 s) on one hot client, mostly over its
# limit; in the in-process store and, with REDIS_URL, again in Redis.
# BENCHMARKS.md has what the profile buys ("A profile-guided build").
#
# Only the server's profile is kept: build scripts run during the
# instrumented build and sluice-load writes its own, so those are dropped.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET=${TARGET:-$REPO/target/pgo}
OUT=${OUT:-}
REDIS_URL=${REDIS_URL:-}
TRAIN=${TRAIN:-10s}
HOT=${HOT:-3s}
PORT=${PORT:-24681}
WORK=$(mktemp -d)
# Fixed paths in RUSTFLAGS, so a second run rebuilds nothing it need not:
# cargo compares the flags, not the files they name.
PROFILES=$TARGET/profiles
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    echo "no llvm-profdata at $profdata: run 'rustup component add llvm-tools'" >&2
    exit 1
fi

echo "== instrumented build ($TARGET/gen)"
RUSTFLAGS="-Cprofile-generate=$PROFILES" \
    cargo build --release --locked --bins --target-dir "$TARGET/gen" --manifest-path "$REPO/Cargo.toml"
rm -rf "$PROFILES"
gen="$TARGET/gen/release"

mkdir -p "$WORK/rules"
for algorithm in sliding_window fixed_window gcra; do
    printf 'domain: train-%s\ndescriptors:\n  - key: client_id\n    rate_limit: {unit: minute, requests_per_unit: 100, algorithm: %s}\n  - key: route\n    rate_limit: {unit: second, requests_per_unit: 100000, algorithm: %s}\n' \
        "$algorithm" "$algorithm" "$algorithm" >"$WORK/rules/$algorithm.yaml"
done

# train STORE: one server on STORE, every algorithm's load in turn.
train() {
    LLVM_PROFILE_FILE="$PROFILES/sluice-%p-%m.profraw" "$gen/sluice" serve \
        --rules "$WORK/rules" --store "$1" --key-secret pgo-training \
        --grpc-addr "127.0.0.1:$PORT" --http-addr "127.0.0.1:$((PORT + 1))" \
        >"$WORK/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$((PORT + 1))/readyz" >/dev/null && break
        sleep 0.1
    done
    if ! curl -sf "http://127.0.0.1:$((PORT + 1))/readyz" >/dev/null; then
        echo "the instrumented server did not become ready on $1:" >&2
        cat "$WORK/serve.log" >&2
        exit 1
    fi
    for algorithm in sliding_window fixed_window gcra; do
        for shape in "--clients 10000 --duration $TRAIN" "--hot --duration $HOT"; do
            # shellcheck disable=SC2086 # the shape is several flags
            LLVM_PROFILE_FILE="$WORK/client/%p.profraw" "$gen/sluice-load" \
                --addr "127.0.0.1:$PORT" --domain "train-$algorithm" \
                --key client_id --key route --descriptors 1..3 $shape \
                -c 4 -m 16 --warmup 0s
        done
    done
    kill -TERM "$server"
    wait "$server" || true
}

echo "== training: in-process store"
train memory
if [ -n "$REDIS_URL" ]; then
    echo "== training: $REDIS_URL"
    train "$REDIS_URL"
fi
"$profdata" merge -o "$WORK/sluice.profdata" "$PROFILES"
# Named by its content: a new profile is a new flag, so cargo rebuilds.
merged="$TARGET/sluice-$(sha256sum "$WORK/sluice.profdata" | cut -c1-16).profdata"
mv "$WORK/sluice.profdata" "$merged"

echo "== optimised build ($TARGET/use, $merged)"
RUSTFLAGS="-Cprofile-use=$merged" \
    cargo build --release --locked --bins --target-dir "$TARGET/use" --manifest-path "$REPO/Cargo.toml"
if [ -n "$OUT" ]; then
    install -D -m 0755 -t "$OUT" "$TARGET/use/release/sluice" "$TARGET/use/release/sluice-load"
fi
echo "built $TARGET/use/release/sluice"
