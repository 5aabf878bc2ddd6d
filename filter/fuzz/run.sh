#!/usr/bin/env bash
# Fuzzes every target of the filter for SECONDS each (default 60), after replaying the
# regression corpus (regressions/<target>/: inputs that once crashed, also kept as unit tests).
#   filter/fuzz/run.sh [SECONDS] [TARGET...]
# Needs the nightly toolchain and cargo-fuzz (both installed here if missing). FUZZ_JOBS=N runs N
# targets at once (default 1). Each target's log is logs/<target>.log; a crash leaves its
# input in artifacts/<target>/ and makes the script fail. So does a target that did not run.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-60}
shift || true

die() { echo "fuzz: $*" >&2; exit 1; }

# The targets come from Cargo.toml's [[bin]] entries, read here rather than asked of
# `cargo fuzz list`: on a fresh machine cargo-fuzz is not installed yet, and an empty list
# fuzzed nothing while the step passed.
ALL_TARGETS=()
mapfile -t ALL_TARGETS < <(awk '
  /^\[\[bin\]\]/ { in_bin = 1; next }
  /^\[/          { in_bin = 0 }
  in_bin && /^name *=/ { gsub(/^name *= *"|" *$/, ""); print }
' Cargo.toml)
[ ${#ALL_TARGETS[@]} -gt 0 ] || die "no [[bin]] target in filter/fuzz/Cargo.toml"
# A target file that Cargo.toml does not name would never be fuzzed: refuse it too.
for file in fuzz_targets/*.rs; do
  name=$(basename "$file" .rs)
  printf '%s\n' "${ALL_TARGETS[@]}" | grep -qx "$name" \
    || die "$file has no [[bin]] entry in filter/fuzz/Cargo.toml"
done

TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=("${ALL_TARGETS[@]}")
fi
for target in "${TARGETS[@]}"; do
  printf '%s\n' "${ALL_TARGETS[@]}" | grep -qx "$target" \
    || die "unknown target $target (known: ${ALL_TARGETS[*]})"
done

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
# Where `cargo install` puts cargo-fuzz, on PATH for this run (a fresh shell may not have it).
INSTALL_BIN="${CARGO_INSTALL_ROOT:-${CARGO_HOME:-$HOME/.cargo}}/bin"
export PATH="$INSTALL_BIN:$PATH"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz into $INSTALL_BIN" >&2
  cargo install --quiet --locked cargo-fuzz
fi
cargo +nightly fuzz --version >/dev/null 2>&1 \
  || die "cargo-fuzz is not usable after installing it into $INSTALL_BIN"

python3 make_seeds.py
# The build's own failure must fail the script (the filter only hides the progress lines).
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
if ! cargo +nightly fuzz build --fuzz-dir . >"$build_log" 2>&1; then
  cat "$build_log" >&2
  die "cargo fuzz build failed"
fi
grep -v '^\s*\(Compiling\|Downloaded\|Downloading\)' "$build_log" || true
mkdir -p logs
rm -f logs/*.result

dict_of() {
  case "$1" in
    json_model|request_decision|messages_translate|claude_translate|gemini_translate|ollama_translate|responses_translate) echo "-dict=dict/json.dict" ;;
    router_config) echo "-dict=dict/config.dict" ;;
  esac
}

fuzz_one() {
  local target=$1 log=logs/$1.log
  mkdir -p "corpus/$target" "regressions/$target"
  local status=0
  : >"$log"
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
  if [ $status -eq 0 ] && [ "${execs:-0}" -gt 0 ]; then
    echo "$target: ok, $execs executions in ${SECONDS_EACH}s"
    echo "ok $execs" >"logs/$target.result"
  elif [ $status -eq 0 ]; then
    echo "$target: FAILED, no executions reported (see filter/fuzz/$log)"
    return 1
  else
    echo "$target: FAILED (see filter/fuzz/$log and filter/fuzz/artifacts/$target/)"
    return 1
  fi
}
export -f fuzz_one dict_of
export SECONDS_EACH

status=0
printf '%s\n' "${TARGETS[@]}" | xargs -P "${FUZZ_JOBS:-1}" -I{} bash -c 'fuzz_one "$@"' _ {} || status=$?
# Every target asked for must have left its result: a target that never ran fails the step.
missing=()
for target in "${TARGETS[@]}"; do
  [ -f "logs/$target.result" ] || missing+=("$target")
done
if [ ${#missing[@]} -gt 0 ]; then
  die "${#missing[@]} of ${#TARGETS[@]} targets did not run cleanly: ${missing[*]}"
fi
[ $status -eq 0 ] || die "xargs exited with $status"
echo "fuzz: all ${#TARGETS[@]} targets ran"
