#!/usr/bin/env bash
# Packs a directory (a root file system, e.g. one static binary) into an OCI image archive that
# `ctr -n k8s.io images import` (and so `make cluster-import IMAGE=...`) takes: no registry, no
# Docker. Usage:
#
#   scripts/oci-image.sh [--entrypoint ARG]... [--env K=V]... NAME:TAG DIR [ARCHIVE]
#
# NAME without a registry is normalised as Kubernetes does (kmirror/pause -> docker.io/kmirror/
# pause, busybox -> docker.io/library/busybox), so a pod's `image: kmirror/pause:1` finds it.
# ARCHIVE defaults to target/images/<name>_<tag>.tar; its path is printed on stdout. The archive
# is reproducible: the same DIR contents give the same bytes (owners 0:0, times 0, sorted).
# Layout: one uncompressed layer; a config whose rootfs.diff_ids is the layer's sha256; a
# manifest; index.json whose manifest carries io.containerd.image.name; oci-layout.
set -euo pipefail

usage() {
    echo "usage: $0 [--entrypoint ARG]... [--env K=V]... NAME:TAG DIR [ARCHIVE]" >&2
    exit 2
}

# A JSON string; refuses control characters rather than escaping them (none are expected).
json_str() {
    local s="$1"
    if [[ "$s" =~ [[:cntrl:]] ]]; then
        echo "oci-image.sh: control character in '$s'" >&2
        exit 2
    fi
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "$s"
}

json_list() { # ARG...: a JSON array of strings
    local out="" a
    for a in "$@"; do out="$out${out:+,}$(json_str "$a")"; done
    printf '[%s]' "$out"
}

entrypoint=()
env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
while [ $# -gt 0 ]; do
    case "$1" in
    --entrypoint) [ $# -ge 2 ] || usage; entrypoint+=("$2"); shift 2 ;;
    --env) [ $# -ge 2 ] || usage; env+=("$2"); shift 2 ;;
    --) shift; break ;;
    -*) usage ;;
    *) break ;;
    esac
done
if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
ref="$1" dir="$2"

# NAME:TAG, lower-case path components as the distribution reference grammar allows.
if ! [[ "$ref" =~ ^([a-z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*:([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$ ]]; then
    echo "oci-image.sh: '$ref' is not NAME:TAG (lower-case name, a tag is required: an imported" \
        "image cannot be pulled again, so give it a tag other than 'latest' and refer to it" \
        "with imagePullPolicy: Never or IfNotPresent)" >&2
    exit 2
fi
name="${ref%:*}" tag="${ref##*:}"
first="${name%%/*}"
if [[ "$name" != */* ]]; then
    full="docker.io/library/$name:$tag"
elif [[ "$first" == *.* || "$first" == *:* || "$first" == localhost ]]; then
    full="$name:$tag"
else
    full="docker.io/$name:$tag"
fi
[ -d "$dir" ] || { echo "oci-image.sh: $dir is not a directory" >&2; exit 2; }

root="$(cd "$(dirname "$0")/.." && pwd)"
archive="${3:-$root/target/images/${name//\//_}_$tag.tar}"
mkdir -p "$(dirname "$archive")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
blobs="$work/layout/blobs/sha256"
mkdir -p "$blobs"

# Reproducible tar of DIR's contents, names relative to DIR without a leading "./".
tarball() { # SRC-DIR OUT [NAMES from stdin, NUL-separated]
    tar -C "$1" --null --no-recursion -T - --sort=none --format=posix \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$2"
}
( cd "$dir" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z ) | tarball "$dir" "$work/layer.tar"

add_blob() { # FILE: moves it into blobs/, prints "<digest> <size>"
    local d s
    d="$(sha256sum "$1" | cut -d' ' -f1)"
    s="$(stat -c %s "$1")"
    mv "$1" "$blobs/$d"
    echo "$d $s"
}

read -r layer_digest layer_size < <(add_blob "$work/layer.tar")
cfg="{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{\"Env\":$(json_list "${env[@]}")"
[ ${#entrypoint[@]} -eq 0 ] || cfg="$cfg,\"Entrypoint\":$(json_list "${entrypoint[@]}")"
cfg="$cfg},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$layer_digest\"]}}"
printf '%s' "$cfg" >"$work/config.json"
read -r cfg_digest cfg_size < <(add_blob "$work/config.json")

printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$cfg_digest\",\"size\":$cfg_size},\
\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$layer_digest\",\"size\":$layer_size}]}" \
    >"$work/manifest.json"
read -r man_digest man_size < <(add_blob "$work/manifest.json")

printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\
\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$man_digest\",\"size\":$man_size,\
\"annotations\":{\"io.containerd.image.name\":$(json_str "$full"),\"org.opencontainers.image.ref.name\":$(json_str "$tag")}}]}" \
    >"$work/layout/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$work/layout/oci-layout"

( cd "$work/layout" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z ) | tarball "$work/layout" "$archive.tmp"
mv "$archive.tmp" "$archive"
echo "$archive"
