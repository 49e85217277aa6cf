#!/usr/bin/env bash
# Checks the deployment side: the Helm chart (lint, and every store and rules
# variant rendered and validated against Kubernetes 1.33, and the unsafe
# values it must refuse), the plain manifests in k8s/ (validated, and in step
# with the chart), the Prometheus alert rules (promtool check and unit tests),
# every Envoy config in examples/ and k8s/ (envoy --mode validate), and the
# Kong plugin's Lua tests.
#
# Usage: bash .ci/check-deploy.sh
# Needs helm, kubernetes-validate, envoy, lua and promtool (bash
# .ci/install-tools.sh puts them in .tools/bin). Set SLUICE_BIN to a sluice binary to also check
# the rules in the chart with `sluice rules validate` (default: target/release
# or target/debug, when built). Exits non-zero naming every failed check.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
export PATH="$REPO/.tools/bin:$PATH"
K8S_VERSION=1.33.0
CHART=helm/sluice

TMP=$(mktemp -d)
LIVE_PIDS=()
cleanup() {
    local pid
    for pid in "${LIVE_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

FAILED=()
PASSED=0

pass() {
    PASSED=$((PASSED + 1))
    echo "ok    $1"
}

fail() {
    FAILED+=("$1")
    echo "FAIL  $1"
    if [ -n "${2:-}" ] && [ -s "$2" ]; then
        tail -n 40 "$2" | cut -c1-600 | sed 's/^/      /'
    fi
}

# check NAME COMMAND...: runs COMMAND, quietly unless it fails.
check() {
    local name=$1
    shift
    if "$@" >"$TMP/out" 2>&1; then
        pass "$name"
    else
        fail "$name" "$TMP/out"
    fi
}

# --- tools -------------------------------------------------------------------

missing=()
for tool in helm kubernetes-validate envoy lua promtool; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "check-deploy: missing ${missing[*]}: run bash .ci/install-tools.sh" >&2
    exit 1
fi

# A Python with PyYAML and jsonschema: the one kubernetes-validate runs in.
PYTHON=""
kv=$(readlink -f "$(command -v kubernetes-validate)")
for py in "$(dirname "$kv")/python3" "$(dirname "$kv")/python" python3; do
    if "$py" -c 'import yaml, jsonschema' >/dev/null 2>&1; then
        PYTHON=$py
        break
    fi
done
if [ -z "$PYTHON" ]; then
    echo "check-deploy: no Python with yaml and jsonschema (kubernetes-validate's venv has them): run bash .ci/install-tools.sh" >&2
    exit 1
fi

# Helper for what shell cannot do with YAML.
cat >"$TMP/helper.py" <<'PY'
import json, os, sys
import jsonschema, yaml

def docs(path):
    with (sys.stdin if path == "-" else open(path)) as f:
        return [d for d in yaml.safe_load_all(f) if d]

def crds(path, schema_dir):
    """Validates the custom resources kubernetes-validate has no schema for."""
    bad = 0
    for d in docs(path):
        api, kind = d.get("apiVersion", ""), d.get("kind", "")
        if "/" not in api or api.split("/")[0].endswith("k8s.io") or "." not in api.split("/")[0]:
            continue  # a built-in API group: kubernetes-validate's job
        name = f"{kind.lower()}-{api.replace('/', '-')}.json"
        schema_path = os.path.join(schema_dir, name)
        if not os.path.exists(schema_path):
            print(f"{path}: {kind} {api}: no schema {schema_path}")
            bad += 1
            continue
        schema = json.load(open(schema_path))
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(d), key=lambda e: list(e.path))
        for e in errors:
            print(f"{path}: {kind}/{d.get('metadata', {}).get('name')}: {'.'.join(map(str, e.path))}: {e.message}")
        bad += bool(errors)
        if not errors:
            print(f"{path}: {kind}/{d['metadata']['name']} valid against {name}")
    return 1 if bad else 0

def envoy_configs(path, out_dir):
    """Writes each Envoy config in path to out_dir: the file itself, or the
    envoy*.yaml keys of the ConfigMaps it holds. Prints the files written."""
    ds = docs(path)
    maps = [d for d in ds if d.get("kind") == "ConfigMap"]
    if not maps:
        print(os.path.abspath(path))
        return 0
    n = 0
    for m in maps:
        for key, text in (m.get("data") or {}).items():
            if key.startswith("envoy") and key.endswith((".yaml", ".yml")):
                n += 1
                out = os.path.join(out_dir, f"{os.path.basename(path)}.{m['metadata']['name']}.{key}")
                open(out, "w").write(text)
                print(out)
    if n == 0:
        print(f"{path}: a ConfigMap file without an envoy*.yaml key", file=sys.stderr)
        return 1
    return 0

def rules(path, out_dir):
    """Writes the rule files of the rules ConfigMap(s) in a rendering to out_dir."""
    n = 0
    for d in docs(path):
        if d.get("kind") == "ConfigMap" and d["metadata"]["name"].endswith("-rules"):
            for key, text in d.get("data", {}).items():
                open(os.path.join(out_dir, key), "w").write(text)
                n += 1
    print(n)
    return 0

def same_rules(chart_values, rules_dir):
    """The chart's default rule files say the same as examples/rules (comments
    and layout aside)."""
    files = yaml.safe_load(open(chart_values))["rules"]["files"]
    bad = 0
    for name, text in files.items():
        example = os.path.join(rules_dir, name)
        if not os.path.exists(example):
            print(f"{chart_values}: rules.files.{name} has no {example}")
            bad += 1
        elif yaml.safe_load(text) != yaml.safe_load(open(example)):
            print(f"{chart_values}: rules.files.{name} differs from {example}")
            bad += 1
    return 1 if bad else 0

def to_json(path, out):
    json.dump(yaml.safe_load(open(path)), open(out, "w"))
    return 0

def ports(n):
    """Prints n free TCP ports on 127.0.0.1."""
    import socket
    socks = [socket.socket() for _ in range(int(n))]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    return 0

def backend(port):
    """A stand-in backend: 200 and the path for every GET."""
    import http.server
    class Handler(http.server.BaseHTTPRequestHandler):
        # Keep-alive, as real backends do: with HTTP/1.0's close after every
        # response, Envoy now and then reuses a connection as it closes (503).
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = f"backend saw {self.path}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()

def envoy_local(path, out, admin, gateway, health, grpc, backend_port):
    """The gateway's Envoy config from a k8s ConfigMap, with every address
    moved to 127.0.0.1: listeners on the given ports, the sluice cluster to
    grpc, every other cluster to backend_port."""
    cm = [d for d in docs(path) if d.get("kind") == "ConfigMap"][0]
    cfg = yaml.safe_load(cm["data"]["envoy.yaml"])
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=int(admin))
    listener_ports = {8080: int(gateway), 8001: int(health)}
    for l in cfg["static_resources"]["listeners"]:
        sa = l["address"]["socket_address"]
        sa.update(address="127.0.0.1", port_value=listener_ports[sa["port_value"]])
    for c in cfg["static_resources"]["clusters"]:
        for e in c["load_assignment"]["endpoints"]:
            for lb in e["lb_endpoints"]:
                sa = lb["endpoint"]["address"]["socket_address"]
                sa.update(address="127.0.0.1", port_value=int(grpc if c["name"] == "sluice" else backend_port))
    yaml.safe_dump(cfg, open(out, "w"))
    return 0

cmd, *args = sys.argv[1:]
sys.exit({"crds": crds, "envoy-configs": envoy_configs, "rules": rules, "to-json": to_json,
          "same-rules": same_rules,
          "ports": ports, "backend": backend, "envoy-local": envoy_local}[cmd](*args))
PY
helper() { "$PYTHON" "$TMP/helper.py" "$@"; }

# validate NAME FILE: kubernetes-validate, strictly; custom resources against
# helm/crd-schemas. A file holding no resource at all fails.
validate() {
    local name=$1 file=$2 out="$TMP/validate.out"
    if ! kubernetes-validate --strict -k "$K8S_VERSION" "$file" >"$out" 2>&1; then
        fail "$name: kubernetes-validate" "$out"
        return
    fi
    if ! grep -q 'passed for resource' "$out"; then
        echo "no Kubernetes resource in $file" >>"$out"
        fail "$name: kubernetes-validate" "$out"
        return
    fi
    # kubernetes-validate only warns about kinds it has no schema for.
    if grep -v -e "Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1" \
        -e "Couldn't find schema for kind PrometheusRule with api version monitoring.coreos.com/v1" "$out" \
        | grep -q '^WARN'; then
        fail "$name: kubernetes-validate warned" "$out"
        return
    fi
    local count
    count=$(grep -c 'passed for resource' "$out")
    if ! helper crds "$file" helm/crd-schemas >"$out" 2>&1; then
        fail "$name: custom resources" "$out"
        return
    fi
    count=$((count + $(grep -c ' valid against ' "$out")))
    pass "$name: $count resources valid"
}

# --- Helm chart ---------------------------------------------------------------

echo "== Helm chart ($CHART)"

# Each variant: a name, then helm arguments.
VARIANTS=(
    "defaults (the chart's own Redis)|"
    "memory, one replica|--set store.type=memory --set autoscaling.enabled=false --set replicaCount=1"
    "memory+configMap, per-pod limits|--set store.type=memory --set store.memory.perPodLimits=true"
    "memory+postgres, per-pod limits|--set store.type=memory --set store.memory.perPodLimits=true --set rules.source=postgres --set postgres.url=postgres://sluice@postgres:5432/sluice --set keySecret.existingSecret=sluice-key"
    "redis+configMap|--set store.type=redis --set store.redis.host=redis --set keySecret.existingSecret=sluice-key"
    "redis+postgres|--set store.type=redis --set store.redis.host=redis --set keySecret.existingSecret=sluice-key --set rules.source=postgres --set postgres.url=postgres://sluice@postgres:5432/sluice"
    "redisSentinel+configMap|--set store.type=redisSentinel --set store.redisSentinel.sentinels={s-0.s:26379,s-1.s:26379,s-2.s:26379}"
    "redisCluster+configMap|--set store.type=redisCluster --set keySecret.existingSecret=sluice-key --set store.redisCluster.nodes={redis-0.redis:6379,redis-1.redis:6379}"
    "redisCluster+postgres|--set store.type=redisCluster --set keySecret.existingSecret=sluice-key --set store.redisCluster.nodes={redis-0.redis:6379} --set rules.source=postgres --set postgres.urlSecret.name=sluice-db"
    "redis+postgres+events|--set store.type=redis --set store.redis.host=redis --set keySecret.existingSecret=sluice-key --set rules.source=postgres --set postgres.url=postgres://sluice@postgres:5432/sluice --set events.enabled=true --set events.urlSecret.name=sluice-amqp --set events.requestLogSample=0.01"
    "redis+postgres+events, alerts and billing consumers|--set store.type=redis --set store.redis.host=redis --set keySecret.existingSecret=sluice-key --set rules.source=postgres --set postgres.url=postgres://sluice@postgres:5432/sluice --set events.enabled=true --set events.urlSecret.name=sluice-amqp --set events.alerts.enabled=true --set events.alerts.webhookRetryFor=2h --set events.billing.enabled=true --set events.billing.grace=30m"
)
for f in "$CHART"/ci/*-values.yaml; do
    VARIANTS+=("$(basename "$f" -values.yaml) (ci/$(basename "$f"))|-f $f")
done

for variant in "${VARIANTS[@]}"; do
    name=${variant%%|*}
    read -r -a args <<<"${variant#*|}"
    check "helm lint --strict [$name]" helm lint --strict "$CHART" "${args[@]}"
    if helm template sluice "$CHART" --namespace sluice "${args[@]}" >"$TMP/render.yaml" 2>"$TMP/out"; then
        validate "helm template [$name]" "$TMP/render.yaml"
    else
        fail "helm template [$name]" "$TMP/out"
    fi
done

# Every server setting (each SLUICE_* variable config.rs reads) can be set
# through the chart's values.
missing=""
for var in $(grep -o 'env = "SLUICE_[A-Z_]*"' src/config.rs | cut -d'"' -f2 | sort -u); do
    grep -rqw "$var" "$CHART/templates" || missing="$missing $var"
done
check "the chart sets every SLUICE_* setting (missing:${missing:- none})" test -z "$missing"

# The defaults enforce one shared limit: the chart's own Redis, its password
# and the key secret generated, nothing evicted silently.
helm template sluice "$CHART" >"$TMP/defaults.yaml" 2>"$TMP/out"
check "default install: a Redis StatefulSet and SLUICE_STORE pointing at it" sh -c \
    "grep -q '^kind: StatefulSet' '$TMP/defaults.yaml' && grep -A1 'name: SLUICE_STORE\$' '$TMP/defaults.yaml' | grep -q 'redis://sluice-redis:6379/0'"
check "default install: generated Redis password and key secret, from Secrets" sh -c \
    "grep -A4 'name: SLUICE_REDIS_PASSWORD' '$TMP/defaults.yaml' | grep -q 'name: sluice-redis' && grep -A4 'name: SLUICE_KEY_SECRET' '$TMP/defaults.yaml' | grep -q 'name: sluice-key'"
check "default install: Redis with maxmemory, volatile-ttl, no persistence, resource limits" sh -c \
    "grep -q 'maxmemory-policy volatile-ttl' '$TMP/defaults.yaml' && grep -q 'save \"\"' '$TMP/defaults.yaml' && grep -q 'maxmemory 200mb' '$TMP/defaults.yaml'"
for var in SLUICE_METRICS_TENANTS; do
    check "ci/postgres-values.yaml renders $var" sh -c \
        "helm template sluice '$CHART' -f '$CHART/ci/postgres-values.yaml' | grep -qw $var"
done
for var in SLUICE_REDIS_CA_CERT SLUICE_BREAKER_FAILURES SLUICE_BREAKER_COOLDOWN SLUICE_LOCAL_CACHE_SIZE; do
    check "ci/redis-values.yaml renders $var" sh -c \
        "helm template sluice '$CHART' -f '$CHART/ci/redis-values.yaml' | grep -qw $var"
done
for var in SLUICE_ADMIN_ADDR SLUICE_ADMIN_TLS_CERT SLUICE_ADMIN_AUTH_FAILURES SLUICE_ADMIN_AUTH_FAILURE_WINDOW; do
    check "ci/postgres-values.yaml renders the admin Deployment with $var" sh -c \
        "helm template sluice '$CHART' -f '$CHART/ci/postgres-values.yaml' | grep -qw $var"
done
for var in SLUICE_USAGE_FLUSH SLUICE_USAGE_QUEUE; do
    check "ci/postgres-values.yaml renders $var" sh -c \
        "helm template sluice '$CHART' -f '$CHART/ci/postgres-values.yaml' | grep -qw $var"
done

# Mistakes that must stop `helm install`, and the message that must say why.
MUST_FAIL=(
    "memory store under the HPA (the old default)|every pod would count on its own|--set store.type=memory"
    "memory store with 3 replicas|up to 3 times its limit|--set store.type=memory --set autoscaling.enabled=false --set replicaCount=3"
    "redisSentinel store without sentinels|needs store.redisSentinel.sentinels|--set store.type=redisSentinel"
    "TLS to the chart's own Redis|store.redis.tls needs store.redis.host|--set store.redis.tls=true"
    "an allkeys eviction policy|maxmemoryPolicy|--set redis.maxmemoryPolicy=allkeys-lru"
    "redisCluster store without nodes|needs store.redisCluster.nodes|--set store.type=redisCluster --set keySecret.existingSecret=k"
    "postgres rules without a URL|needs postgres.url or postgres.urlSecret.name|--set rules.source=postgres --set keySecret.existingSecret=k"
    "postgres rules without keySecret|rules.source=postgres needs keySecret.existingSecret|--set rules.source=postgres --set postgres.url=postgres://db/sluice"
    "TLS with gRPC probes|kubelet's gRPC probes cannot speak TLS|--set tls.enabled=true --set tls.secretName=t"
    "unknown failureMode|failureMode must be one of|--set failureMode=maybe"
    "unknown store type|store.type must be one of|--set store.type=memcached"
    "unknown logFormat|log.format must be one of|--set log.format=xml"
    "unknown algorithm|defaultAlgorithm must be one of|--set defaultAlgorithm=leaky_bucket"
    "misspelt value|Additional property storeType is not allowed|--set storeType=redis"
    "admin API without TLS|admin.enabled serves tokens and API keys|--set admin.enabled=true --set postgres.url=postgres://db/sluice --set keySecret.existingSecret=k"
    "admin API without PostgreSQL|admin.enabled needs PostgreSQL|--set admin.enabled=true --set admin.tls.secretName=t"
)
for case in "${MUST_FAIL[@]}"; do
    IFS='|' read -r name expect argstr <<<"$case"
    read -r -a args <<<"$argstr"
    if helm template sluice "$CHART" "${args[@]}" >/dev/null 2>"$TMP/out"; then
        echo "rendered, but should have failed" >"$TMP/out"
        fail "helm template rejects $name" "$TMP/out"
    elif grep -qF -- "$expect" "$TMP/out"; then
        pass "helm template rejects $name"
    else
        { echo "expected the message to contain: $expect"; cat "$TMP/out"; } >"$TMP/out2"
        fail "helm template rejects $name" "$TMP/out2"
    fi
done

check "the chart's default rules say what examples/rules says" \
    helper same-rules "$CHART/values.yaml" examples/rules

# The rules the chart ships, checked by sluice itself when a binary is here.
SLUICE_BIN=${SLUICE_BIN:-}
if [ -z "$SLUICE_BIN" ]; then
    for b in target/release/sluice target/debug/sluice; do
        if [ -x "$b" ] && "$b" rules --help >/dev/null 2>&1; then
            SLUICE_BIN=$b
            break
        fi
    done
fi
if [ -n "$SLUICE_BIN" ]; then
    for values in "" "-f helm/k8s-values.yaml"; do
        label=${values:+k8s-values}
        rules_dir="$TMP/rules${label:+-$label}"
        mkdir -p "$rules_dir"
        # shellcheck disable=SC2086
        helm template sluice "$CHART" $values >"$TMP/rules.yaml" 2>"$TMP/out" \
            && helper rules "$TMP/rules.yaml" "$rules_dir" >/dev/null
        check "sluice rules validate [chart rules${label:+, $label}]" "$SLUICE_BIN" rules validate "$rules_dir"
    done
else
    echo "skip  sluice rules validate: no sluice binary (cargo build, or set SLUICE_BIN)"
fi

# --- plain manifests ------------------------------------------------------------

echo "== Kubernetes manifests (k8s/)"
for f in k8s/*.yaml; do
    validate "$f" "$f"
done
check "k8s/sluice.yaml and deploy/prometheus/alerts.yaml agree with the chart (helm/render-k8s.sh --check)" helm/render-k8s.sh --check

# --- Prometheus alert rules and the Grafana dashboard -----------------------------

echo "== Prometheus alert rules (deploy/prometheus), Grafana dashboard"
check "promtool check rules deploy/prometheus/alerts.yaml" promtool check rules deploy/prometheus/alerts.yaml
check "promtool test rules deploy/prometheus/alerts.test.yaml (each alert fires, and does not)" \
    promtool test rules deploy/prometheus/alerts.test.yaml
check "every alert has a runbook in docs/operations.md" sh -c \
    'for a in $(grep -o "alert: Sluice[A-Za-z]*" deploy/prometheus/alerts.yaml | cut -d" " -f2); do grep -q "^### $a\$" docs/operations.md || { echo "no runbook: $a"; exit 1; }; done'
check "the Grafana dashboard is JSON" "$PYTHON" -c 'import json, sys; json.load(open(sys.argv[1]))' "$CHART/files/sluice-dashboard.json"
check "the dashboard ConfigMap carries the dashboard and the sidecar label" sh -c \
    "helm template sluice '$CHART' --set grafanaDashboard.enabled=true --show-only templates/dashboard-configmap.yaml | grep -q 'grafana_dashboard: \"1\"'"


# --- Envoy --------------------------------------------------------------------

echo "== Envoy configs"
mkdir -p "$TMP/envoy"
mapfile -t envoy_files < <(find examples/ k8s/ -name 'envoy*.yaml' 2>/dev/null | sort)
if [ ${#envoy_files[@]} -eq 0 ]; then
    echo "no envoy*.yaml under examples/ or k8s/" >"$TMP/out"
    fail "Envoy configs found" "$TMP/out"
fi
for f in "${envoy_files[@]}"; do
    if ! helper envoy-configs "$f" "$TMP/envoy" >"$TMP/configs" 2>"$TMP/out"; then
        fail "envoy --mode validate $f" "$TMP/out"
        continue
    fi
    while read -r config; do
        label=$f
        [ "$config" != "$(readlink -f "$f")" ] && label="$f (${config##*/})"
        check "envoy --mode validate $label" envoy --mode validate -c "$config" --log-level warn
    done <"$TMP/configs"
done

# --- live: the gateway and the Kong plugin logic against a real sluice ----------

# wait_for URL SECONDS: until URL answers 200.
wait_for() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$1")" = 200 ] && return 0
        sleep 0.1
    done
    return 1
}

# codes N CURL_ARGS...: the HTTP status of N requests, one per line.
codes() {
    local n=$1 i
    shift
    for ((i = 0; i < n; i++)); do
        curl -s -o /dev/null -w '%{http_code}\n' "$@"
    done
}

# expect_limit NAME LIMIT HEADER CURL_ARGS...: LIMIT requests pass, the next
# gets 429 with an x-ratelimit-limit header naming the rule.
expect_limit() {
    local name=$1 limit=$2 rule=$3 got
    shift 3
    got=$(codes "$limit" "$@" | sort | uniq -c | awk '{printf "%s x %s; ", $1, $2}')
    curl -s -D "$TMP/headers" -o /dev/null "$@"
    if [ "$got" = "$limit x 200; " ] && head -n1 "$TMP/headers" | grep -q ' 429' \
        && grep -qi "^x-ratelimit-limit:.*name=\"$rule\"" "$TMP/headers"; then
        pass "$name"
    else
        { echo "first $limit requests: $got"; echo "then:"; cat "$TMP/headers"; } >"$TMP/out"
        fail "$name" "$TMP/out"
    fi
}

echo "== Live: k8s/envoy-gateway.yaml and the Kong plugin logic against a real sluice"
LIVE_JSON_URL=""
if [ -z "$SLUICE_BIN" ] || ! command -v curl >/dev/null; then
    echo "skip  live checks: need a sluice binary (cargo build, or set SLUICE_BIN) and curl"
else
    # The rules the plain manifests deploy, the gateway config they deploy.
    mkdir -p "$TMP/live-rules"
    helper rules k8s/sluice.yaml "$TMP/live-rules" >/dev/null
    read -r P_GRPC P_HTTP P_GATEWAY P_HEALTH P_ADMIN P_BACKEND < <(helper ports 6)
    helper envoy-local k8s/envoy-gateway.yaml "$TMP/envoy-local.yaml" \
        "$P_ADMIN" "$P_GATEWAY" "$P_HEALTH" "$P_GRPC" "$P_BACKEND"
    # Python itself in the background, not the helper function: $! must be
    # the server's pid for cleanup to stop it.
    "$PYTHON" "$TMP/helper.py" backend "$P_BACKEND" >"$TMP/backend.log" 2>&1 &
    LIVE_PIDS+=($!)
    SLUICE_RULES="$TMP/live-rules" SLUICE_GRPC_ADDR="127.0.0.1:$P_GRPC" SLUICE_HTTP_ADDR="127.0.0.1:$P_HTTP" \
        SLUICE_LOG_LEVEL=warn "$SLUICE_BIN" serve >"$TMP/sluice.log" 2>&1 &
    SLUICE_PID=$!
    LIVE_PIDS+=("$SLUICE_PID")
    envoy -c "$TMP/envoy-local.yaml" --disable-hot-restart --log-level warn >"$TMP/envoy.log" 2>&1 &
    LIVE_PIDS+=($!)
    GW="http://127.0.0.1:$P_GATEWAY"
    RUN_ID="$$-$RANDOM"

    # Up once sluice, Envoy's health listener and the backend answer, and
    # Envoy's health check has found sluice (a limited answer has the headers).
    up=0
    if wait_for "http://127.0.0.1:$P_HTTP/readyz" 30 && wait_for "http://127.0.0.1:$P_HEALTH/ready" 10 \
        && wait_for "http://127.0.0.1:$P_BACKEND/" 10; then
        for ((i = 0; i < 100; i++)); do
            if curl -s -D - -o /dev/null -H "x-client-id: warm-up-$RUN_ID" "$GW/weather/" \
                | grep -qi '^x-ratelimit-limit'; then
                up=1
                break
            fi
            sleep 0.1
        done
    fi
    if [ "$up" = 1 ]; then
        pass "live: $("$SLUICE_BIN" --version 2>/dev/null | head -n1) and Envoy up with the k8s/ rules and gateway config"
        LIVE_JSON_URL="http://127.0.0.1:$P_HTTP/json"

        expect_limit "live gateway: /weather allows each x-client-id 60 a minute" 60 weather_per_client \
            -H "x-client-id: alice-$RUN_ID" "$GW/weather/today"
        expect_limit "live gateway: /weather falls back to 60 a minute per address" 60 weather_per_ip \
            "$GW/weather/today"
        curl -s -D "$TMP/headers" -o /dev/null -H "x-api-key: k-$RUN_ID" "$GW/business/orders?page=2"
        check "live gateway: /business/orders?... sends api_key and route=/orders" \
            grep -qi '^x-ratelimit-limit:.*name="per_api_key".*name="orders_route"' "$TMP/headers"
        curl -s -D "$TMP/headers" -o /dev/null -H "x-api-key: k-$RUN_ID" "$GW/business/search/cities"
        check "live gateway: /business/search/... sends route=/search" \
            grep -qi '^x-ratelimit-limit:.*name="search_route"' "$TMP/headers"
        got=$(codes 30 -H "x-client-id: internal-reporting" "$GW/business/reports" | sort -u | tr '\n' ' ')
        check "live gateway: the internal-reporting client is unlimited (got: $got)" test "$got" = "200 "
    else
        { echo "== sluice"; tail -n 20 "$TMP/sluice.log"; echo "== envoy"; tail -n 20 "$TMP/envoy.log"; } >"$TMP/out"
        fail "live: sluice and Envoy up with the k8s/ rules and gateway config" "$TMP/out"
    fi
fi

# --- Kong plugin ----------------------------------------------------------------

echo "== Kong plugin (examples/kong)"
if helper to-json examples/kong/kong.yml "$TMP/kong.json" 2>"$TMP/out"; then
    export SLUICE_KONG_CONFIG_JSON="$TMP/kong.json"
else
    fail "examples/kong/kong.yml parses" "$TMP/out"
fi
if [ -n "$LIVE_JSON_URL" ]; then
    export SLUICE_JSON_URL="$LIVE_JSON_URL"
fi
if (cd examples/kong && lua spec/run.lua) >"$TMP/lua.out" 2>&1; then
    pass "Kong plugin tests with plain lua: $(tail -n1 "$TMP/lua.out")"
else
    fail "Kong plugin tests with plain lua" "$TMP/lua.out"
fi
if command -v busted >/dev/null; then
    check "Kong plugin tests with busted" sh -c 'cd examples/kong && busted --output=plainTerminal spec'
fi

# Last, as it stops sluice: the gateway fails open (failure_mode_deny: false).
if [ -n "$LIVE_JSON_URL" ]; then
    kill "$SLUICE_PID"
    wait "$SLUICE_PID" 2>/dev/null
    got=$(codes 3 -H "x-client-id: after-$RUN_ID" "$GW/weather/today" | sort -u | tr '\n' ' ')
    check "live gateway: lets traffic through with sluice down (got: $got)" test "$got" = "200 "
fi

# --------------------------------------------------------------------------------

echo
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "Failed checks:"
    printf '  - %s\n' "${FAILED[@]}"
fi
echo "check-deploy: $PASSED passed, ${#FAILED[@]} failed"
[ ${#FAILED[@]} -eq 0 ]
