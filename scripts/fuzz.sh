#!/usr/bin/env bash
# Runs every wire-protocol fuzz target (protocol/fuzz) for a bounded time, starting from the
# committed corpus. New inputs go to a scratch directory, so the committed corpus only changes
# when someone copies interesting finds into it. FUZZ_SECONDS per target (default 10).
#
# Fails (non-zero) when the target list is empty, when a target cannot be built or started,
# when libFuzzer reports a crash, a leak, a timeout or an out-of-memory kill, and when a target
# executed no input at all: a fuzz step that checked nothing must not pass.
#
# cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
# No sanitizer is used: the targets are safe Rust, so libFuzzer looks for panics and hangs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${FUZZ_SECONDS:-10}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cd "$root/protocol"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
targets=$(cargo fuzz list)
if [[ -z "${targets//[[:space:]]/}" ]]; then
  echo "fuzz: cargo fuzz list names no target in protocol/fuzz: nothing would be fuzzed" >&2
  exit 1
fi
cargo fuzz build -s none
failed=()
for target in $targets; do
  mkdir -p "$scratch/$target"
  log="$scratch/$target.log"
  echo "fuzz: $target for ${seconds}s"
  status=0
  cargo fuzz run -s none "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|Done|==|SUMMARY)' "$log" || true
  executed=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
  why=""
  if ((status != 0)); then
    why="exited with status $status"
  elif compgen -G "fuzz/artifacts/$target/*" >/dev/null; then
    why="left a failing input in protocol/fuzz/artifacts/$target"
  elif [[ -z "$executed" || "$executed" -eq 0 ]]; then
    why="executed no input (no libFuzzer statistics)"
  fi
  if [[ -n "$why" ]]; then
    echo "fuzz: $target $why; the end of its output:" >&2
    tail -n 30 "$log" >&2
    failed+=("$target")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
