#!/usr/bin/env bash
# Runs every wire-protocol fuzz target (protocol/fuzz) for a bounded time, starting from the
# committed corpus. New inputs go to a scratch directory, so the committed corpus only changes
# when someone copies interesting finds into it. FUZZ_SECONDS per target (default 10).
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
cargo fuzz build -s none
for target in $targets; do
  mkdir -p "$scratch/$target"
  echo "fuzz: $target for ${seconds}s"
  cargo fuzz run -s none "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -print_final_stats=1 2>&1 | grep -E '^(stat::number_of_executed_units|Done|==|SUMMARY)' || true
  # A crash leaves an artifact and a non-zero exit; pipefail is off for grep, so check here.
  if compgen -G "fuzz/artifacts/$target/*" >/dev/null; then
    echo "fuzz: $target found a failing input in protocol/fuzz/artifacts/$target" >&2
    exit 1
  fi
done
