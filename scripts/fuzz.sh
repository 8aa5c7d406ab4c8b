#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time each.
#
#   scripts/fuzz.sh                 # every target, 30 s each (what CI runs)
#   scripts/fuzz.sh 600             # every target, 10 minutes each
#   scripts/fuzz.sh 3600 otlp sql   # the named targets, an hour each
#
# New inputs that reach new code are kept in fuzz/corpus/<target>/ (not
# committed; it grows run after run on one machine). A crash, hang or
# out-of-memory stops the run with the input in fuzz/artifacts/<target>/:
# fix it, then commit the input to fuzz/regressions/<target>/, where the
# stable test (fuzz/tests/corpus.rs) replays it for good.
#
# Targets are built without a sanitizer (the crates they reach forbid
# unsafe code; libFuzzer still catches panics, aborts, hangs and memory
# blow-ups) and unoptimised, which builds in a fraction of the time an
# optimised build of DataFusion takes; LUMEN_FUZZ_PROFILE=--release for
# long runs by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-30}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^lumen-fuzz$')
fi

# libFuzzer's instrumentation needs the nightly compiler.
rustup run nightly rustc --version >/dev/null 2>&1 || {
  echo "installing the nightly toolchain (for cargo fuzz)" >&2
  rustup toolchain install nightly --profile minimal
}
command -v cargo-fuzz >/dev/null 2>&1 || {
  echo "installing cargo-fuzz (crates.io)" >&2
  cargo install --locked --quiet cargo-fuzz --version 0.13.2
}

profile=${LUMEN_FUZZ_PROFILE:---dev}
# Its own build directory: nightly and the sanitizer-coverage flags share
# nothing with the workspace's stable build.
target_dir=${LUMEN_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-target}-fuzz}
fuzz=(cargo +nightly fuzz)
opts=("$profile" --sanitizer none --features libfuzzer --target-dir "$target_dir")

echo "fuzz: building ${#targets[@]} targets" >&2
"${fuzz[@]}" build "${opts[@]}"

# One target per core at a time (`nproc`, or LUMEN_FUZZ_JOBS).
jobs=${LUMEN_FUZZ_JOBS:-$(nproc)}

fuzz_one() {
  local t=$1
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  # Seeds and regression inputs are read; new inputs go to the first dir.
  local dirs=("fuzz/corpus/$t" "fuzz/seeds/$t")
  [[ -d "fuzz/regressions/$t" ]] && dirs+=("fuzz/regressions/$t")
  mkdir -p fuzz/logs
  local log="fuzz/logs/$t.log"
  if ! "${fuzz[@]}" run "${opts[@]}" "$t" "${dirs[@]}" -- \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" > "$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/ (see above)" >&2
    return 1
  fi
  # One line per target: executions, speed and corpus size at the end.
  local runs speed
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  echo "fuzz: $t: ${seconds}s, $runs runs ($speed/s), corpus $(ls "fuzz/corpus/$t" | wc -l) files" >&2
}

echo "fuzz: ${#targets[@]} targets, ${seconds}s each, $jobs at a time" >&2
failed=0
running=0
for t in "${targets[@]}"; do
  fuzz_one "$t" &
  running=$((running + 1))
  if ((running >= jobs)); then
    wait -n || failed=1
    running=$((running - 1))
  fi
done
while ((running > 0)); do
  wait -n || failed=1
  running=$((running - 1))
done
# Each target process keeps its scratch files (a WAL, tables) until it
# exits, and libFuzzer exits without running destructors.
rm -rf /dev/shm/lumen-fuzz-* "${TMPDIR:-/tmp}"/lumen-fuzz-*
exit "$failed"
