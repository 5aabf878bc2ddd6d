#!/usr/bin/env bash
# Fuzzes every target of the filter for SECONDS each (default 60), after replaying the
# regression corpus (regressions/<target>/: inputs that once crashed, also kept as unit tests).
#   filter/fuzz/run.sh [SECONDS] [TARGET...]
# Needs the nightly toolchain and cargo-fuzz (installed here if missing). FUZZ_JOBS=N runs N
# targets at once (default 1). Each target's log is logs/<target>.log; a crash leaves its
# input in artifacts/<target>/ and makes the script fail.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <(cargo +nightly fuzz list --fuzz-dir .)
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install --quiet --locked cargo-fuzz
python3 make_seeds.py
cargo +nightly fuzz build --fuzz-dir . 2>&1 | grep -v '^\s*\(Compiling\|Downloaded\|Downloading\)' || true
mkdir -p logs

dict_of() {
  case "$1" in
    json_model|request_decision) echo "-dict=dict/json.dict" ;;
    router_config) echo "-dict=dict/config.dict" ;;
  esac
}

fuzz_one() {
  local target=$1 log=logs/$1.log
  mkdir -p "corpus/$target" "regressions/$target"
  local status=0
  # The regression corpus first: each input once.
  if [ -n "$(ls -A "regressions/$target")" ]; then
    cargo +nightly fuzz run --fuzz-dir . "$target" "regressions/$target" -- -runs=0 >"$log" 2>&1 || status=$?
  fi
  if [ $status -eq 0 ]; then
    cargo +nightly fuzz run --fuzz-dir . "$target" "corpus/$target" -- \
      -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=128 \
      -print_final_stats=1 $(dict_of "$target") >>"$log" 2>&1 || status=$?
  fi
  local execs
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if [ $status -eq 0 ]; then
    echo "$target: ok, ${execs:-?} executions in ${SECONDS_EACH}s"
  else
    echo "$target: FAILED (see filter/fuzz/$log and filter/fuzz/artifacts/$target/)"
    return 1
  fi
}
export -f fuzz_one dict_of
export SECONDS_EACH

printf '%s\n' "${TARGETS[@]}" | xargs -P "${FUZZ_JOBS:-1}" -I{} bash -c 'fuzz_one "$@"' _ {}
