#!/usr/bin/env bash
# The kernel matrix: boots Debian's own kernels under qemu (software emulation: these machines
# have no KVM) and runs kmirror's core end-to-end subset inside each, against local pods built
# in the guest. Prints one line per kernel with the passed/failed counts and the fallbacks in
# use; exits non-zero if any kernel fails.
#
#   KERNELS="5.10 6.1 6.12" tests/kernels/matrix.sh      (make kernel-matrix)
#   KERNELS=6.1 ONLY=incoming tests/kernels/matrix.sh     (only the subset entries naming it)
#
# The guest sees this machine's root file system read-only over 9p (the test binaries, the
# fixtures, python3, ip, ...), with fresh /proc, /sys, /dev and temp dirs of its own: the same
# tests as on the host, on another kernel. Kernel packages are cached outside the clone.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

KERNELS=${KERNELS:-"5.10 6.1 6.12"}
CACHE=${KMIRROR_KERNEL_CACHE:-/var/cache/kmirror/kernels}
WORK=$root/target/kernels
# Wall-clock bound of one guest (boot, tests, power-off) under emulation.
GUEST_TIMEOUT=${GUEST_TIMEOUT:-1500}
# The end-to-end tests run in each guest, by test binary and name filter: outgoing TCP/UDP, DNS,
# environment and files (static Go), the thread-pidfd fallback, and incoming steal and mirror.
SUBSET=(
  "outgoing_dns_env_files go_static_reaches_pod_services_by_cluster_name"
  "outgoing_dns_env_files refused_pod_destination_keeps_its_errno"
  "outgoing_dns_env_files a_refused_socket_can_connect_again"
  "outgoing_dns_env_files unconnected_udp_sendto_reaches_the_pod"
  "outgoing_dns_env_files pod_environment_is_merged"
  "outgoing_dns_env_files read_mode_serves_the_pod_filesystem"
  "kernels sockets_are_intercepted_without_thread_pidfds"
  "incoming steal_answers_from_the_local_app_and_fails_open"
  "incoming mirror_copies_every_request_to_the_go_app"
  "incoming clsact_fallback_steals_cleans_up_and_fails_open"
  "matrix every_runtime_sees_the_pod_the_same_way"
)

suite_of() {
  case "$1" in
    5.10) echo bullseye ;;
    6.1) echo bookworm ;;
    6.12) echo trixie ;;
    *) echo "kernel-matrix: no Debian suite known for kernel $1 (known: 5.10 6.1 6.12)" >&2; return 1 ;;
  esac
}

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
if ((${#need[@]})); then
  echo "kernel-matrix: installing ${need[*]}"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# A private apt configuration that knows every suite the kernels come from (all of them,
# whatever KERNELS says: two runs at once, from two clones or with different KERNELS, share
# this directory and must not rewrite it under each other). The apt steps below also hold
# its lock.
apt_dir=$CACHE/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$CACHE/debs"
exec 8>"$apt_dir/.lock"
flock 8
sources=$apt_dir/sources.list
for k in 5.10 6.1 6.12; do
  echo "deb http://deb.debian.org/debian $(suite_of "$k") main"
done | sort -u > "$sources.new"
mv "$sources.new" "$sources"
APT=(-o "Dir::Etc::SourceList=$sources" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir" -o Dir::State::Status=/dev/null
     -o APT::Architecture=amd64 -o Debug::NoLocking=1)
if [[ ! -f $apt_dir/updated ]] || ! cmp -s "$sources" "$apt_dir/updated"; then
  apt-get "${APT[@]}" update -qq
  cp "$sources" "$apt_dir/updated"
fi

flock -u 8

# The test binaries, built once on the host.
cargo build -q --workspace
mapfile -t built < <(cargo test -q --no-run --message-format=json -p kmirror-suite \
  --test outgoing_dns_env_files --test kernels --test incoming --test matrix 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])')
declare -A binary
for entry in "${built[@]}"; do binary[${entry%% *}]=${entry#* }; done

modules=(virtio_pci 9pnet_virtio 9p veth sch_ingress cls_bpf)
failed_kernels=0
summary=()
for k in $KERNELS; do
  suite=$(suite_of "$k")
  flock 8
  version=$(apt-cache "${APT[@]}" show linux-image-amd64 | awk -v k="$k" '
    /^Version:/ { v = $2 } /^Depends:/ && index(v, k ".") == 1 { print $2; exit }')
  [[ -n $version ]] || { echo "kernel-matrix: no linux-image-amd64 $k in $suite" >&2; exit 1; }
  kdir=$CACHE/$version
  if [[ ! -f $kdir/ready ]]; then
    echo "kernel-matrix: fetching $version from $suite"
    rm -rf "$kdir" && mkdir -p "$kdir"
    (cd "$CACHE/debs" && apt-get "${APT[@]}" download -qq "$version" 2>&1 | grep -v unsandboxed || true)
    dpkg-deb -x "$CACHE"/debs/"$version"_*.deb "$kdir/root"
    # Debian 13 installs modules under /usr/lib (merged /usr); depmod and modprobe look in /lib.
    [[ -e $kdir/root/lib ]] || ln -s usr/lib "$kdir/root/lib"
    touch "$kdir/ready"
  fi
  flock -u 8
  kver=$(ls "$kdir/root/lib/modules")
  depmod -b "$kdir/root" "$kver"

  # The initramfs: busybox, the init script, and the modules (decompressed: busybox's insmod
  # passes the file to the kernel as it is) in load order.
  gdir=$WORK/$k
  rm -rf "$gdir" && mkdir -p "$gdir/initramfs/bin" "$gdir/initramfs/modules"
  for d in proc sys dev host; do mkdir -p "$gdir/initramfs/$d"; done
  cp /bin/busybox "$gdir/initramfs/bin/busybox"
  cp tests/kernels/guest-init.sh "$gdir/initramfs/init"
  : > "$gdir/initramfs/modules.order"
  for m in "${modules[@]}"; do
    modprobe -d "$kdir/root" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
  done | awk '!seen[$0]++' | while read -r path; do
    name=$(basename "$path"); name=${name%.xz}; name=${name%.zst}
    case "$path" in
      *.xz) xz -dc "$path" > "$gdir/initramfs/modules/$name" ;;
      *.zst) zstd -qdc "$path" > "$gdir/initramfs/modules/$name" ;;
      *) cp "$path" "$gdir/initramfs/modules/$name" ;;
    esac
    echo "$name" >> "$gdir/initramfs/modules.order"
  done
  (cd "$gdir/initramfs" && find . | cpio -o -H newc --quiet | gzip -1) > "$gdir/initramfs.cpio.gz"

  # The plan the guest runs: which kernel features it has, then the subset (or, where kmirror
  # must refuse, that it refuses with a reason).
  plan=$gdir/plan.sh
  {
    echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp RUST_BACKTRACE=1"
    echo "export KMIRROR_RUNTIMES='go static (Debian Go),c static (musl)' KMIRROR_MIRROR_REQUESTS=20 KMIRROR_MIRROR_CLIENTS=5"
    echo "cd '$root'"
    echo "ip link set lo up"
    echo "echo '--- features'; target/debug/kmirror features; features=\$?"
    echo "if [ \$features -ne 0 ]; then"
    echo "  out=\$(target/debug/kmirror run --target pid/1 -- /bin/true 2>&1); rc=\$?"
    echo "  echo \"\$out\""
    echo "  if [ \$rc -ne 0 ] && echo \"\$out\" | grep -q 'Linux 5.19 or later'; then echo 'kmirror-guest: 1 passed, 0 failed'; else echo 'kmirror-guest: 0 passed, 1 failed'; fi"
    echo "  exit 0"
    echo "fi"
    for entry in "${SUBSET[@]}"; do
      [[ -z ${ONLY:-} || $entry == *"$ONLY"* ]] || continue
      test=${entry%% *} filter=${entry#* }
      echo "echo '--- $test $filter'; ${binary[$test]} --test-threads=1 --color never '$filter' 2>&1"
    done
  } > "$plan"

  log=$gdir/console.log
  echo "kernel-matrix: booting $version under qemu (timeout ${GUEST_TIMEOUT}s)"
  started=$(date +%s)
  timeout "$GUEST_TIMEOUT" qemu-system-x86_64 -machine q35 -cpu max -smp 2 -m 3072 \
    -nographic -no-reboot -monitor none -serial "file:$log" \
    -kernel "$kdir/root/boot/vmlinuz-$kver" -initrd "$gdir/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet kmirror.plan=$plan kmirror.root=$root" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    >/dev/null 2>&1 || true
  took=$(( $(date +%s) - started ))
  results=$(grep -aE '^(test result: |kmirror-guest: [0-9]+ passed)' "$log" || true)
  passed=$(grep -oE '[0-9]+ passed' <<<"$results" | awk '{s+=$1} END {print s+0}')
  failed=$(grep -oE '[0-9]+ failed' <<<"$results" | awk '{s+=$1} END {print s+0}')
  fallbacks=$(grep -a ' fallback' "$log" | awk -F'  +' '{print $1}' | paste -sd, - || true)
  missing=$(grep -a ' MISSING' "$log" | awk -F'  +' '{print $1}' | paste -sd, - || true)
  ran=$(grep -acE '^--- ' "$log" || true)
  if ! grep -aq 'kmirror-guest: plan exited' "$log"; then
    line="kernel $k ($kver): DID NOT FINISH in ${took}s (see $log)"
    failed_kernels=$((failed_kernels + 1))
  else
    line="kernel $k ($kver): $passed passed, $failed failed in ${took}s; fallbacks: ${fallbacks:-none}${missing:+; kmirror refuses: missing $missing}"
    if [[ $failed -ne 0 || $passed -eq 0 ]]; then failed_kernels=$((failed_kernels + 1)); fi
  fi
  echo "$line"
  summary+=("$line")
done

echo "kernel-matrix summary:"
printf '  %s\n' "${summary[@]}"
exit $(( failed_kernels > 0 ))
