#!/usr/bin/env bash
# Runs every test of sluice on a fresh machine: installs the real components
# the tests talk to (Redis and Redis Sentinel, PostgreSQL, RabbitMQ,
# Prometheus and promtool, Envoy, grpcurl, helm, a Kubernetes manifest
# validator, Lua) into .tools/ when missing, starts RabbitMQ when it is not
# running, then runs the Rust test suites, which start their own Redis, Redis
# Cluster, Sentinel group, PostgreSQL primary and replica, Prometheus and
# Envoy on free ports, and the deployment checks.
#
# Usage: bash .ci/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash .ci/install-tools.sh
export PATH="$PWD/.tools/bin:$PATH"

# Every test binary; tests that need a tool fail (never skip) without it.
cargo test --locked --all-targets "$@"
# Doc tests are not part of --all-targets.
cargo test --locked --doc

if [ -f .ci/check-deploy.sh ]; then
    bash .ci/check-deploy.sh
fi
