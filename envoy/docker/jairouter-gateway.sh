#!/bin/sh
# The gateway image's entry point for a single container (docker run, docker compose): renders
# the Envoy bootstrap from the JAiRouter configuration, follows edits of it in the background,
# and runs Envoy. Kubernetes runs these steps as separate containers (see the Helm chart).
#
# Environment: JAIROUTER_CONFIG (/etc/jairouter/application.yml), JAIROUTER_API_KEYS (a file of
# API keys, optional), PORT (the file's server.port, else 8080), METRICS_PORT (9090: /ready and
# /stats/prometheus), ADMIN_PORT (9901, loopback), STATUS_PORT (9902, loopback), CONCURRENCY
# (Envoy workers, 2), ENVOY_LOG_LEVEL (warning).
set -eu
config="${JAIROUTER_CONFIG:-/etc/jairouter/application.yml}"
run="${JAIROUTER_RUN_DIR:-/var/run/jairouter}"
wasm="${JAIROUTER_WASM:-/usr/local/lib/jairouter/jairouter.wasm}"
set -- --wasm "$wasm" --live-dir "$run/live"
if [ -n "${JAIROUTER_API_KEYS:-}" ]; then
  set -- "$@" --api-keys "$JAIROUTER_API_KEYS"
fi
port_args=""
if [ -n "${PORT:-}" ]; then port_args="--port $PORT"; fi
# shellcheck disable=SC2086  # port_args is empty or two words
jairouter-render bootstrap "$config" "$@" $port_args --listen-address 0.0.0.0 \
  --metrics-port "${METRICS_PORT:-9090}" --admin-port "${ADMIN_PORT:-9901}" \
  --status-port "${STATUS_PORT:-9902}" --out "$run/envoy.json"
jairouter-render watch "$config" "$@" &
exec envoy -c "$run/envoy.json" --concurrency "${CONCURRENCY:-2}" \
  --log-level "${ENVOY_LOG_LEVEL:-warning}" --disable-hot-restart
