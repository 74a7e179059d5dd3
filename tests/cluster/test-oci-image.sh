#!/usr/bin/env bash
# Tests scripts/oci-image.sh: the archive is a valid OCI layout whose every digest and size
# match the bytes they name, the config's diff_id is the layer's, the layer holds DIR's files
# (contents, modes, symlinks) under clean names, the name is normalised as Kubernetes does,
# a bad reference is refused, and the same DIR gives the same bytes twice. When the cluster's
# containerd is built (target/cluster/bin/ctr), the archive is also imported into a private,
# throw-away containerd and must be listed under its full name.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/rootfs/bin" "$work/rootfs/etc"
printf 'hello from the image\n' >"$work/rootfs/etc/greeting"
printf '#!/bin/sh\necho hi\n' >"$work/rootfs/bin/hi"
chmod 755 "$work/rootfs/bin/hi"
ln -s ../etc/greeting "$work/rootfs/bin/greeting-link"

out="$("$root/scripts/oci-image.sh" --entrypoint /bin/hi --entrypoint 'a "quoted" arg' \
    kmirror/test-img:1 "$work/rootfs" "$work/a.tar")"
[ "$out" = "$work/a.tar" ] || { echo "FAIL: printed '$out', not the archive path"; exit 1; }
touch -d '2001-01-01' "$work/rootfs/etc/greeting" # times must not matter
"$root/scripts/oci-image.sh" --entrypoint /bin/hi --entrypoint 'a "quoted" arg' \
    kmirror/test-img:1 "$work/rootfs" "$work/b.tar" >/dev/null
cmp "$work/a.tar" "$work/b.tar" || { echo "FAIL: same directory, different archives"; exit 1; }

python3 - "$work/a.tar" <<'PY'
import hashlib, io, json, sys, tarfile
outer = tarfile.open(sys.argv[1])
files = {m.name: outer.extractfile(m).read() for m in outer.getmembers() if m.isfile()}
assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}, files["oci-layout"]
def blob(desc):
    algo, hexd = desc["digest"].split(":")
    data = files[f"blobs/{algo}/{hexd}"]
    assert algo == "sha256" and hashlib.sha256(data).hexdigest() == hexd, desc
    assert len(data) == desc["size"], desc
    return data
index = json.loads(files["index.json"])
[mdesc] = index["manifests"]
ann = mdesc["annotations"]
assert ann["io.containerd.image.name"] == "docker.io/kmirror/test-img:1", ann
assert ann["org.opencontainers.image.ref.name"] == "1", ann
manifest = json.loads(blob(mdesc))
config = json.loads(blob(manifest["config"]))
[ldesc] = manifest["layers"]
layer = blob(ldesc)
assert ldesc["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()], config
assert config["config"]["Entrypoint"] == ["/bin/hi", 'a "quoted" arg'], config
assert config["os"] == "linux" and config["architecture"] == "amd64"
members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(layer)).getmembers()}
assert sorted(members) == ["bin", "bin/greeting-link", "bin/hi", "etc", "etc/greeting"], sorted(members)
lt = tarfile.open(fileobj=io.BytesIO(layer))
assert lt.extractfile("etc/greeting").read() == b"hello from the image\n"
assert members["bin/hi"].mode & 0o777 == 0o755
assert members["bin/greeting-link"].issym() and members["bin/greeting-link"].linkname == "../etc/greeting"
assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in members.values())
PY

# Names are normalised as Kubernetes normalises a pod's image.
for case in "pause:3 docker.io/library/pause:3" "registry.local:5000/x/y:v1 registry.local:5000/x/y:v1"; do
    read -r ref want <<<"$case"
    "$root/scripts/oci-image.sh" "$ref" "$work/rootfs" "$work/n.tar" >/dev/null
    tar -xOf "$work/n.tar" index.json | grep -qF "\"io.containerd.image.name\":\"$want\"" ||
        { echo "FAIL: $ref not named $want"; exit 1; }
done
for bad in "no-tag" "Upper/case:1" "x:bad tag"; do
    if "$root/scripts/oci-image.sh" "$bad" "$work/rootfs" "$work/bad.tar" 2>/dev/null; then
        echo "FAIL: '$bad' was accepted"; exit 1
    fi
done

ctr="$root/target/cluster/bin/ctr" containerd="$root/target/cluster/bin/containerd"
if [ -x "$ctr" ] && [ -x "$containerd" ] && [ "$(id -u)" = 0 ]; then
    # A throw-away containerd of its own (root, state, socket under $work): nothing shared.
    cat >"$work/containerd.toml" <<TOML
version = 3
root = "$work/c/root"
state = "$work/c/state"
[grpc]
  address = "$work/c/sock"
[plugins.'io.containerd.internal.v1.opt']
  path = "$work/c/opt"
TOML
    # containerd makes /run/containerd (its shims' fixed socket directory) whatever its config
    # says: remove it again if it was not there before.
    run_existed=0
    [ ! -e /run/containerd ] || run_existed=1
    "$containerd" --config "$work/containerd.toml" >"$work/containerd.log" 2>&1 &
    cpid=$!
    trap 'kill $cpid 2>/dev/null; wait $cpid 2>/dev/null; rm -rf "$work"
        [ $run_existed = 1 ] || rmdir /run/containerd 2>/dev/null || true' EXIT
    for _ in $(seq 100); do [ -S "$work/c/sock" ] && break; sleep 0.1; done
    "$ctr" -a "$work/c/sock" -n k8s.io images import "$work/a.tar" >/dev/null 2>"$work/ctr.err" ||
        { echo "FAIL: import"; cat "$work/ctr.err"; exit 1; }
    images="$("$ctr" -a "$work/c/sock" -n k8s.io images ls -q 2>/dev/null)"
    grep -qx docker.io/kmirror/test-img:1 <<<"$images" ||
        { echo "FAIL: not imported: $images"; tail "$work/containerd.log"; exit 1; }
    echo "oci-image: imported into a private containerd"
else
    echo "oci-image: containerd not built (tests/cluster/build.sh containerd); import not tried"
fi
echo "oci-image: ok"
