#!/usr/bin/env bash
# Builds the test cluster's binaries that are missing, into a cache outside the clone, and
# links them into target/cluster/bin of this clone.
#
#   tests/cluster/build.sh [kube|etcd|containerd|coredns|images]...   (default: all)
#
# Each component is built once per content of its inputs (see key() below) into
# ${KMIRROR_CLUSTER_CACHE:-/var/cache/kmirror/cluster}/<component>-<hash>/, so a second clone
# of the same commit, or a later one that changed nothing here, reuses it. Builds run at the
# lowest CPU priority (nice 19): the machine is shared. Go's own module and build caches
# (GOMODCACHE, GOCACHE) are left where the machine keeps them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=versions.env
. "$here/versions.env"
cache="${KMIRROR_CLUSTER_CACHE:-/var/cache/kmirror/cluster}"
bin="$root/target/cluster/bin"
export CGO_ENABLED=0
# Only the committed go.mod/go.sum are used: a build never resolves versions by itself.
export GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath"

# The machine's Go when it has one; else the current Go that scripts/setup.sh installs.
command -v go >/dev/null || PATH="/opt/kmirror-go/bin:$PATH"
command -v go >/dev/null || {
    echo "build.sh: Go is not installed; run scripts/setup.sh (it installs a current Go)" >&2
    exit 1
}

# The cache key of one component: everything that decides what its binaries contain: the Go
# version, its build function's text (the flags), the versions.env lines it reads and its wrapper
# module's files. Edits elsewhere (this script, another component's version) do not rebuild it.
key() {
    {
        go version
        declare -f "build_$1" gobuild
        grep -E "^(${versions_of[$1]:-NONE})=" "$here/versions.env" || true
        find "$here/$1" -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 |
            sort -z | xargs -0 cat
    } | sha256sum | cut -c1-16
}
declare -A versions_of=(
    [kube]="KUBERNETES_VERSION|KUBERNETES_STAGING_VERSION"
    [etcd]=ETCD_VERSION
    [containerd]=CONTAINERD_VERSION
    [coredns]=COREDNS_VERSION
)

# build_one COMPONENT OUTPUT-NAME... : runs build_<component> into a fresh directory and moves
# it into place only when it succeeded, so an interrupted build is never taken for a cached one.
build_one() {
    local comp="$1" dir start
    dir="$cache/$comp-$(key "$comp")"
    if [ ! -d "$dir" ]; then
        mkdir -p "$cache"
        rm -rf "$dir.tmp"
        mkdir -p "$dir.tmp"
        echo "build.sh: building $comp into $dir (cold: takes minutes; see README)" >&2
        start=$(date +%s)
        (cd "$here/$comp" && "build_$comp" "$dir.tmp")
        echo "$(($(date +%s) - start))" >"$dir.tmp/build-seconds"
        mv "$dir.tmp" "$dir"
        echo "build.sh: built $comp in $(cat "$dir/build-seconds")s" >&2
    fi
    # Its time of last use, for prune_cache.
    touch "$dir"
    prune_cache "$comp" "$dir"
    mkdir -p "$bin"
    shift
    local name
    for name in "$@"; do
        ln -sfn "$dir/$(target_of "$comp" "$name")" "$bin/$name"
    done
}

# prune_cache COMPONENT CURRENT-DIR: the cache keeps, besides the build in use, the one used
# most recently before it (another clone on an older commit, or a switch back), and removes older
# builds and what interrupted builds left, so version bumps do not pile up 300 MB each. Go's own
# caches trim themselves (GOCACHE drops entries unused for days); `go clean -modcache -cache`
# empties them.
prune_cache() {
    local comp="$1" keep="$2" d kept=0
    rm -rf "$cache/$comp"-*.tmp
    while IFS= read -r d; do
        [ "$d" != "$keep" ] || continue
        if [ $kept = 0 ]; then
            kept=1
        else
            echo "build.sh: removing the unused build $d" >&2
            rm -rf "$d"
        fi
    done < <(find "$cache" -mindepth 1 -maxdepth 1 -type d -name "$comp-*" -printf '%T@ %p\n' |
        sort -rn | cut -d' ' -f2-)
}

target_of() { # COMPONENT NAME: the file in the component's cache directory behind NAME
    case "$1" in
    kube) echo kube ;;
    *) echo "$2" ;;
    esac
}

gobuild() { nice -n 19 go build "$@"; }

build_kube() {
    local minor="${KUBERNETES_VERSION#v1.}"
    minor="${minor%%.*}"
    local ld="-s -w" pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld="$ld -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ld="$ld -X $pkg.gitTreeState=clean"
    done
    gobuild -tags providerless -ldflags "$ld" -o "$1/kube" .
}

build_etcd() {
    gobuild -ldflags "-s -w" -o "$1/etcd" go.etcd.io/etcd/server/v3
    gobuild -ldflags "-s -w" -o "$1/etcdctl" go.etcd.io/etcd/etcdctl/v3
}

build_images() {
    gobuild -ldflags "-s -w" -o "$1/pause" ./pause
    gobuild -ldflags "-s -w" -o "$1/probe" ./probe
}

build_coredns() {
    gobuild -ldflags "-s -w" -o "$1/coredns" .
}

build_containerd() {
    local ld="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
    local cmd
    for cmd in containerd containerd-shim-runc-v2 ctr; do
        gobuild -ldflags "$ld" -o "$1/$cmd" "github.com/containerd/containerd/v2/cmd/$cmd"
    done
}

# One build at a time per cache (two clones, or up while a build runs): wait for the other.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

comps=("$@")
[ ${#comps[@]} -gt 0 ] || comps=(kube etcd containerd coredns images)
for comp in "${comps[@]}"; do
    case "$comp" in
    kube) build_one kube kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl ;;
    etcd) build_one etcd etcd etcdctl ;;
    containerd) build_one containerd containerd containerd-shim-runc-v2 ctr ;;
    images) build_one images pause probe ;;
    coredns) build_one coredns coredns ;;
    *) echo "build.sh: unknown component $comp (kube, etcd, containerd, coredns, images)" >&2; exit 2 ;;
    esac
done
