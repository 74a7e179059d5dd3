#!/usr/bin/env bash
# RustSec security advisories for every Rust lock file in this repository: the workspace's
# (Cargo.lock), the fuzz crate's (protocol/fuzz/Cargo.lock) and the Rust fixture's
# (fixtures/rust-app/Cargo.lock). Fails on any advisory that deny.toml does not acknowledge, and
# on any acknowledgement in deny.toml that gives no reason.
#
#   scripts/advisories.sh                 against the snapshot of the database at
#                                         ../shared/advisory-db beside this clone, with fetching
#                                         disabled (make lint, make test, CI). Advisories
#                                         published after the snapshot are not seen.
#   scripts/advisories.sh --live          against the live database, which cargo-deny fetches
#                                         from GitHub (make audit)
#   [--config DENY_TOML] [MANIFEST...]    another deny.toml, other crates (scripts/test-advisories.sh)
#
# KMIRROR_ADVISORY_DB=DIR checks against a snapshot elsewhere. The snapshot is data only and may
# be read-only; cargo-deny wants a git checkout, so one is built under target/advisory-db.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
live=0
config="$root/deny.toml"
manifests=()
while (($#)); do
  case "$1" in
    --live) live=1 ;;
    --config) config=$(realpath "$2"); shift ;;
    -*) echo "advisories: unknown option $1" >&2; exit 2 ;;
    *) manifests+=("$(realpath "$1")") ;;
  esac
  shift
done
if ((${#manifests[@]} == 0)); then
  manifests=("$root/Cargo.toml" "$root/protocol/fuzz/Cargo.toml" "$root/fixtures/rust-app/Cargo.toml")
fi

die() {
  echo "advisories: $*" >&2
  exit 1
}

# cargo-deny accepts an acknowledgement without a reason; this project does not.
python3 - "$config" <<'EOF' || exit 1
import sys, tomllib
path = sys.argv[1]
with open(path, "rb") as f:
    cfg = tomllib.load(f)
bad = []
for entry in cfg.get("advisories", {}).get("ignore", []):
    if not isinstance(entry, dict) or not str(entry.get("reason", "")).strip():
        bad.append(entry if isinstance(entry, str) else entry.get("id", entry.get("crate", entry)))
if bad:
    print(f"advisories: {path} acknowledges {', '.join(map(str, bad))} without a reason: "
          'write it as { id = "...", reason = "why it does not affect kmirror" }', file=sys.stderr)
    sys.exit(1)
EOF

command -v cargo-deny >/dev/null ||
  die "cargo-deny is not installed: run 'cargo install --locked cargo-deny' (make lint does)"

deny_args=(--config "$config")
if ((live)); then
  db="https://github.com/RustSec/advisory-db"
  timeout 30 git ls-remote "$db" HEAD >/dev/null 2>&1 ||
    die "the live RustSec database ($db) cannot be reached from here; 'make test' checks" \
      "against the snapshot in ../shared/advisory-db instead"
  echo "advisories: checking against the live RustSec database ($db)"
else
  snapshot="${KMIRROR_ADVISORY_DB:-$root/../shared/advisory-db}"
  [[ -d "$snapshot/crates" && -f "$snapshot/SNAPSHOT.md" ]] ||
    die "no RustSec database snapshot at $snapshot (a folder with crates/ and SNAPSHOT.md," \
      "expected as ../shared/advisory-db beside the repository), so advisories cannot be" \
      "checked offline. Put the snapshot there, point KMIRROR_ADVISORY_DB at one, or run" \
      "'make audit' where GitHub can be reached."
  # "... at commit <sha> (<YYYY-MM-DD>) ..."
  read -r upstream date < <(tr '\n' ' ' <"$snapshot/SNAPSHOT.md" |
    sed -nE 's/.*commit[[:space:]]+([0-9a-f]{40})[[:space:]]+\(([0-9]{4}-[0-9]{2}-[0-9]{2})\).*/\1 \2/p') ||
    true
  [[ -n "${date:-}" ]] || die "$snapshot/SNAPSHOT.md does not say 'commit <sha> (<YYYY-MM-DD>)'"
  age=$((($(date -u +%s) - $(date -u -d "$date" +%s)) / 86400))

  # A git checkout of the snapshot, its commit dated as the snapshot, rebuilt on every run so it
  # is always the snapshot as it is now (about a second).
  work="$root/target/advisory-db"
  [[ -d "$work" ]] && chmod -R u+w "$work"
  rm -rf "$work"
  mkdir -p "$work/dbs"
  cp -R "$snapshot" "$work/repo"
  chmod -R u+w "$work/repo"
  export GIT_AUTHOR_DATE="${date}T00:00:00Z" GIT_COMMITTER_DATE="${date}T00:00:00Z"
  git -C "$work/repo" init -q -b main
  git -C "$work/repo" add -A
  git -C "$work/repo" -c user.name=kmirror -c user.email=kmirror@localhost \
    -c commit.gpgsign=false -c core.hooksPath=/dev/null \
    commit -q -m "RustSec advisory-db snapshot $upstream ($date)"
  unset GIT_AUTHOR_DATE GIT_COMMITTER_DATE

  # deny.toml with its database folder moved under target/, so neither the live database in
  # ~/.cargo nor shared/ is touched.
  grep -q '^[[:space:]]*db-path' "$config" && die "$config sets db-path; the offline check sets its own"
  sed "/^\[advisories\]/a db-path = \"$work/dbs\"" "$config" >"$work/deny.toml"
  grep -q "^db-path = \"$work/dbs\"" "$work/deny.toml" || die "$config has no [advisories] table"
  deny_args=(--config "$work/deny.toml")

  # cargo-deny keeps each database in a folder named after its URL. Let it make that folder
  # itself, by "fetching" the default URL from the local checkout (git's insteadOf), then make
  # sure what it holds is the snapshot and nothing else.
  (cd "$root" && GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0="url.$work/repo.insteadOf" \
    GIT_CONFIG_VALUE_0="https://github.com/RustSec/advisory-db" \
    cargo deny "${deny_args[@]}" fetch db) >"$work/fetch.log" 2>&1 ||
    die "could not hand the snapshot to cargo-deny: $(cat "$work/fetch.log")"
  want=$(git -C "$work/repo" rev-parse HEAD)
  dbs=("$work"/dbs/*/)
  if ((${#dbs[@]} != 1)) || [[ "$(git -C "${dbs[0]}" rev-parse HEAD 2>/dev/null)" != "$want" ]]; then
    die "cargo-deny's database under $work/dbs is not the snapshot; see $work/fetch.log"
  fi

  echo "advisories: $(cargo deny --version) checking against the RustSec database snapshot of" \
    "$date (commit ${upstream:0:12}, $age days old) with fetching disabled;" \
    "advisories published after $date are not seen here ('make audit' checks the live database)"
  ((age <= 90)) || echo "advisories: WARNING: the snapshot is $age days old; newer advisories" \
    "are missing until shared/advisory-db is refreshed" >&2
  deny_args+=(--offline)
fi

failed=()
for manifest in "${manifests[@]}"; do
  dir=$(dirname "$manifest")
  name=${dir#"$root/"}
  [[ "$dir" == "$root" ]] && name="workspace"
  extra=()
  # An acknowledgement that matches nothing is worth a warning for the workspace, where it
  # means deny.toml went stale; the other crates share deny.toml and need not use every entry.
  [[ "$dir" == "$root" ]] || extra=(--allow advisory-not-detected)
  echo "advisories: $name ($manifest, lock file ${manifest%.toml}.lock)"
  # The check reads crate manifests with `cargo metadata`, which needs them downloaded (crates
  # come from crates.io; only the advisory database is offline). Run where cargo would build
  # the crate, so its .cargo/config.toml applies. --locked: check the lock file as committed.
  if ! (cd "$dir" && cargo fetch --locked -q --manifest-path "$manifest" &&
    cargo deny "${deny_args[@]}" --locked --workspace --manifest-path "$manifest" \
      check "${extra[@]}" advisories); then
    failed+=("$name")
  fi
done

when="the live database"
((live)) || when="the snapshot of $date"
if ((${#failed[@]})); then
  echo "advisories: FAILED against $when for: ${failed[*]} (see above). For an advisory, update" \
    "the crate (cargo update -p NAME --precise VERSION) or, if it does not affect kmirror," \
    "acknowledge it in deny.toml's [advisories] ignore with a reason." >&2
  exit 1
fi
echo "advisories: ok against $when (${#manifests[@]} lock files)"
