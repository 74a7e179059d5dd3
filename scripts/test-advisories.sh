#!/usr/bin/env bash
# Proves that scripts/advisories.sh (the offline advisories check of make lint / make test) can
# fail: a throwaway crate whose lock file pins base64 0.5.1, which RUSTSEC-2017-0004 (a heap
# overflow, fixed in 0.5.2) names in the snapshot, must be reported; the same crate on 0.5.2
# must pass, so the failure comes from the advisory and not from a broken set-up. Also: an
# acknowledgement with a reason is honoured, one without a reason is refused, and a missing
# snapshot fails instead of passing silently.
#
# No network: the pinned crates are stand-ins (a manifest and an empty lib.rs) served from a
# directory source that replaces crates.io for the throwaway crate only, so cargo and
# cargo-deny see `base64 0.5.1` from crates.io exactly as a real lock file would name it.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
check="$root/scripts/advisories.sh"
snapshot="${KMIRROR_ADVISORY_DB:-$root/../shared/advisory-db}"
id=RUSTSEC-2017-0004
[[ -f "$snapshot/crates/base64/$id.md" ]] || {
  echo "test-advisories: $snapshot has no crates/base64/$id.md; pick another known advisory" >&2
  exit 1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# probe_crate DIR VERSION: a crate depending on base64 =VERSION, with a lock file pinning it.
probe_crate() {
  local dir=$1 version=$2 sum
  sum=$(printf 'kmirror advisories probe base64 %s' "$version" | sha256sum | cut -d' ' -f1)
  mkdir -p "$dir/src" "$dir/vendor/base64" "$dir/.cargo"
  : >"$dir/src/lib.rs"
  : >"$dir/vendor/base64/lib.rs"
  cat >"$dir/vendor/base64/Cargo.toml" <<EOF
[package]
name = "base64"
version = "$version"
edition = "2015"

[lib]
path = "lib.rs"
EOF
  printf '{"files":{},"package":"%s"}\n' "$sum" >"$dir/vendor/base64/.cargo-checksum.json"
  cat >"$dir/.cargo/config.toml" <<EOF
[source.crates-io]
replace-with = "probe-vendor"

[source.probe-vendor]
directory = "vendor"
EOF
  cat >"$dir/Cargo.toml" <<EOF
[package]
name = "advisories-probe"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
base64 = "=$version"

[workspace]
EOF
  cat >"$dir/Cargo.lock" <<EOF
version = 4

[[package]]
name = "advisories-probe"
version = "0.0.0"
dependencies = [
 "base64",
]

[[package]]
name = "base64"
version = "$version"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "$sum"
EOF
}

# deny_with DIR ENTRY: deny.toml with ENTRY added to [advisories] ignore.
deny_with() {
  mkdir -p "$1"
  sed "/^ignore = \[/a\\    $2," "$root/deny.toml" >"$1/deny.toml"
  grep -qF "$2" "$1/deny.toml" || { echo "test-advisories: could not edit deny.toml" >&2; exit 1; }
}

probe_crate "$tmp/vulnerable" 0.5.1
probe_crate "$tmp/patched" 0.5.2
deny_with "$tmp/acknowledged" "{ id = \"$id\", reason = \"the probe never encodes\" }"
deny_with "$tmp/no-reason" "\"$id\""

passed=0
failures=0
# expect NAME WANT_RC PATTERN -- COMMAND...: COMMAND exits 0 (WANT_RC=0) or not (1), and its
# output contains PATTERN.
expect() {
  local name=$1 want=$2 pattern=$3 rc=0
  shift 4
  "$@" >"$tmp/$name.log" 2>&1 || rc=1
  if [[ $rc == "$want" ]] && grep -qF -- "$pattern" "$tmp/$name.log"; then
    echo "test-advisories: ok: $name"
    passed=$((passed + 1))
  else
    echo "test-advisories: FAILED: $name (exit status $([[ $rc == 0 ]] && echo 0 || echo non-zero)," \
      "wanted $([[ $want == 0 ]] && echo 0 || echo non-zero) and '$pattern' in the output):" >&2
    sed 's/^/    /' "$tmp/$name.log" >&2
    failures=$((failures + 1))
  fi
}

expect vulnerable_version_is_reported 1 "$id" -- "$check" "$tmp/vulnerable/Cargo.toml"
expect patched_version_passes 0 "advisories: ok against the snapshot of" -- \
  "$check" "$tmp/patched/Cargo.toml"
expect acknowledged_with_reason_passes 0 "advisories: ok against the snapshot of" -- \
  "$check" --config "$tmp/acknowledged/deny.toml" "$tmp/vulnerable/Cargo.toml"
expect acknowledged_without_reason_is_refused 1 "acknowledges $id without a reason" -- \
  "$check" --config "$tmp/no-reason/deny.toml" "$tmp/vulnerable/Cargo.toml"
expect missing_snapshot_fails 1 "no RustSec database snapshot at $tmp/none" -- \
  env KMIRROR_ADVISORY_DB="$tmp/none" "$check" "$tmp/patched/Cargo.toml"

echo "test-advisories: $passed passed, $failures failed"
((failures == 0))
