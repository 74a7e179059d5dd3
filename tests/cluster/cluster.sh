#!/usr/bin/env bash
# The test cluster: a real single-node Kubernetes on this machine (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, containerd with Debian's runc and CNI plugins,
# kubelet, kube-proxy), built from source by build.sh and started by this script.
#
#   tests/cluster/cluster.sh up       build what is missing, start everything, wait for Ready
#   tests/cluster/cluster.sh down     stop it and remove everything `up` made
#   tests/cluster/cluster.sh status   versions, components, node
#   tests/cluster/cluster.sh import ARCHIVE   import an OCI archive (scripts/oci-image.sh)
#
# Containment (nothing leaves the machine, nothing of the machine is disturbed):
# - addresses: pods 10.215.0.0/24 on bridge kmbr0 (10.215.0.1), services 10.216.0.0/16, the
#   node 10.217.0.1 on a veth pair kmnode0/kmnode0p of its own. Each /16 gets an `unreachable` route, so a packet
#   for an address the cluster does not own fails locally. Nothing listens on the host's
#   other addresses: the API server and kubelet bind 10.217.0.1, the rest 127.0.0.1.
# - firewall: table `inet kmirror_cluster` of our own drops forwarding between kmbr0 and any
#   other interface; if the host did not forward before `up`, it also keeps every other
#   interface unforwarded (ip_forward must be 1 for service traffic between pods).
# - cgroups: everything runs below <the cgroup this script runs in>/kmirror-cluster, created by
#   `up` in every hierarchy; every directory `up` creates is recorded and only those (and what
#   the cluster made below them) are removed. Nothing else is moved, remounted or removed.
# - kernel tunables that the kubelet, kube-proxy or `up` may change are recorded before and
#   restored by `down`.
# - processes are stopped by the PIDs `up` recorded, and the containers by the processes
#   listed in the cluster's own cgroups, never by name.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=versions.env
. "$here/versions.env"

T="$root/target/cluster"     # what users and tests use: kubeconfig, bin/
S="$T/state"                 # everything a running cluster writes; removed by down
RUN="$T/run"                 # records of what up did: pids, sysctls, cgroups, host paths
LOGS="$T/logs"               # component logs; kept after down for post-mortems
PKI="$S/pki"
BIN="$T/bin"

NODE=kmirror-node
NODE_IP=10.217.0.1
POD_SUBNET=10.215.0.0/24
POD_GW=10.215.0.1
SERVICE_RANGE=10.216.0.0/16
DNS_IP=10.216.0.10
GUARDED=(10.215.0.0/16 10.216.0.0/16 10.217.0.0/16)
BRIDGE=kmbr0
DUMMY=kmnode0
NFT_TABLE=kmirror_cluster
ETCD_PORT=2379
PAUSE_IMAGE=docker.io/kmirror/pause:1
PROBE_IMAGE=docker.io/kmirror/probe:1 # the smoke tests' program (images/probe)
FIXTURE="$root/target/fixtures/go-app-static" # the shop workloads' program (make fixtures)
# Host paths other software may own: created (and later removed) only if absent.
HOST_DIRS=(/run/containerd /run/containerd/s /var/lib/cni /var/lib/cni/results)
SYSCTLS=(
    net.ipv4.ip_forward
    net.bridge.bridge-nf-call-iptables
    net.bridge.bridge-nf-call-ip6tables
    vm.overcommit_memory
    vm.panic_on_oom
    kernel.panic
    kernel.panic_on_oops
    kernel.keys.root_maxkeys
    kernel.keys.root_maxbytes
    net.netfilter.nf_conntrack_max
    net.netfilter.nf_conntrack_tcp_timeout_established
    net.netfilter.nf_conntrack_tcp_timeout_close_wait
    net.ipv4.conf.all.route_localnet
)
# Start order; down stops in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy)

log() { echo "cluster: $*" >&2; }
die() {
    log "$*"
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

sysctl_path() { echo "/proc/sys/${1//.//}"; }

# ---------------------------------------------------------------------------------------------
# cgroups

# The cgroup (v1 memory hierarchy) this script runs in: the workplace's, which the cluster must
# stay inside. The cluster's root is the same path below every hierarchy.
cgroup_root() {
    local mem
    mem="$(awk -F: '$2 == "memory" { print $3 }' /proc/self/cgroup)"
    [ -n "$mem" ] || mem="$(awk -F: '$1 == "0" { print $3 }' /proc/self/cgroup)"
    mem="${mem%/}"
    echo "$mem/kmirror-cluster"
}

hierarchies() { # every mounted cgroup hierarchy
    awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts
}

# Creates the cluster's cgroup root in every hierarchy, recording each directory it creates
# (parents included) in $RUN/cgroups, outermost first.
make_cgroups() {
    local cg h path part
    cg="$(cgroup_root)"
    : >"$RUN/cgroups"
    for h in $(hierarchies); do
        path="$h"
        for part in ${cg//\// }; do
            path="$path/$part"
            if [ ! -d "$path" ]; then
                mkdir "$path"
                echo "$path" >>"$RUN/cgroups"
                # A new v1 cpuset has no CPUs or memory nodes: take the parent's.
                if [ -f "$path/cpuset.cpus" ]; then
                    cat "$(dirname "$path")/cpuset.cpus" >"$path/cpuset.cpus"
                    cat "$(dirname "$path")/cpuset.mems" >"$path/cpuset.mems"
                fi
            fi
        done
        [ -d "$path/system" ] || mkdir "$path/system"
        if [ -f "$path/system/cpuset.cpus" ]; then
            cat "$path/cpuset.cpus" >"$path/system/cpuset.cpus"
            cat "$path/cpuset.mems" >"$path/system/cpuset.mems"
        fi
    done
}

# Moves the calling process into <root>/system in every hierarchy (used before exec).
enter_cgroups() {
    local cg h
    cg="$(cgroup_root)"
    for h in $(hierarchies); do
        echo "$BASHPID" >"$h$cg/system/cgroup.procs"
    done
}

cgroup_pids() { # every process in the cluster's cgroups (pids hierarchy, else memory)
    local cg h
    cg="$(cgroup_root)"
    for h in /sys/fs/cgroup/pids /sys/fs/cgroup/memory /sys/fs/cgroup/unified; do
        if [ -d "$h$cg" ]; then
            find "$h$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -un
            return 0
        fi
    done
}

remove_cgroups() {
    local cg h d
    cg="$(cgroup_root)"
    for h in $(hierarchies); do
        [ -d "$h$cg" ] || continue
        # Deepest first; everything below the cluster's root was made by the cluster.
        find "$h$cg" -mindepth 1 -depth -type d -print0 | while IFS= read -r -d '' d; do
            rmdir "$d" 2>/dev/null || log "cannot remove cgroup $d (processes left?)"
        done
    done
    if [ -f "$RUN/cgroups" ]; then
        tac "$RUN/cgroups" | while IFS= read -r d; do
            [ -d "$d" ] || continue
            rmdir "$d" 2>/dev/null || log "cannot remove cgroup $d (processes left?)"
        done
    fi
}

# ---------------------------------------------------------------------------------------------
# processes

pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }

alive() { # NAME: the recorded process runs (the one we started: same start time; no zombie)
    local pid stat
    pid="$(pid_of "$1")"
    [ -n "$pid" ] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }" # fields after the command name, from the state on
    [ "${stat%% *}" != Z ] &&
        [ "$(cut -d' ' -f20 <<<"$stat")" = "$(cat "$RUN/$1.start" 2>/dev/null)" ]
}

# start NAME CMD...: runs CMD in the cluster's cgroup, its own session, output to its log.
start() {
    local name="$1" pid
    shift
    (
        enter_cgroups
        exec setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1
    ) &
    pid=$!
    echo "$pid" >"$RUN/$name.pid"
    # The start time tells a recycled PID from ours.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        [ -r "/proc/$pid/stat" ] && break
        sleep 0.05
    done
    cut -d' ' -f22 "/proc/$pid/stat" >"$RUN/$name.start"
}

crashed() { # NAME: report a component that died, with its log's last lines
    log "$1 is not running; last lines of $LOGS/$1.log:"
    tail -n 20 "$LOGS/$1.log" >&2 || true
}

# wait_for NAME SECONDS CMD...: until CMD succeeds; fails early if NAME died.
wait_for() {
    local name="$1" secs="$2" deadline
    shift 2
    deadline=$(($(date +%s) + secs))
    until "$@" >/dev/null 2>&1; do
        alive "$name" || {
            crashed "$name"
            return 1
        }
        [ "$(date +%s)" -lt "$deadline" ] || {
            log "$name not ready after ${secs}s; last lines of $LOGS/$name.log:"
            tail -n 20 "$LOGS/$name.log" >&2 || true
            return 1
        }
        sleep 0.2
    done
}

stop_pid() { # PID SECONDS: SIGTERM, then SIGKILL after SECONDS
    local pid="$1" secs="$2" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < secs * 10; i++)); do
        [ -d "/proc/$pid" ] || return 0
        # A zombie of ours is gone for our purposes.
        [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" = Z ] && return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
# certificates and kubeconfigs (openssl; no network)

cert() { # NAME CN O [SAN]: a client or server certificate signed by the cluster's CA
    local name="$1" cn="$2" o="$3" san="${4:-}"
    local subj="/CN=$cn"
    [ -z "$o" ] || subj="/O=$o$subj"
    openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
    openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        if [ -n "$san" ]; then
            echo "extendedKeyUsage=serverAuth,clientAuth"
            echo "subjectAltName=$san"
        else
            echo "extendedKeyUsage=clientAuth"
        fi
    } >"$PKI/$name.ext"
    openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
        -CAcreateserial -days 30 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
}

kubeconfig() { # FILE CERT-NAME
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kmirror
  cluster:
    certificate-authority: $PKI/ca.crt
    server: https://$NODE_IP:6443
users:
- name: $2
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: kmirror
  context: {cluster: kmirror, user: $2}
current-context: kmirror
EOF
}

make_pki() {
    mkdir -p "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
        -days 30 -subj "/CN=kmirror-cluster-ca" 2>/dev/null
    cert apiserver kube-apiserver "" \
        "IP:$NODE_IP,IP:10.216.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
    cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
    cert admin kubernetes-admin system:masters
    cert controller-manager system:kube-controller-manager ""
    cert scheduler system:kube-scheduler ""
    cert kubelet "system:node:$NODE" system:nodes
    cert kube-proxy system:kube-proxy ""
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
    local c
    for c in admin controller-manager scheduler kubelet kube-proxy; do
        kubeconfig "$S/$c.kubeconfig" "$c"
    done
    cp "$S/admin.kubeconfig" "$T/kubeconfig"
}

# ---------------------------------------------------------------------------------------------
# host network

net_up() {
    # A veth pair whose peer stays here: this kernel has no dummy links, and the node address
    # must not be on an interface the machine owns.
    ip link add "$DUMMY" type veth peer name "${DUMMY}p"
    ip addr add "$NODE_IP/32" dev "$DUMMY"
    ip link set "${DUMMY}p" up
    ip link set "$DUMMY" up
    local r
    for r in "${GUARDED[@]}"; do ip route add unreachable "$r"; done
    local others=""
    # Forwarding was off: keep it off for every interface but the cluster's bridge.
    [ "$(awk '$1 == "net.ipv4.ip_forward" { print $2 }' "$RUN/sysctl.before")" = 1 ] ||
        others="iifname != \"$BRIDGE\" drop"
    nft -f - <<EOF
table inet $NFT_TABLE {
    chain forward {
        type filter hook forward priority filter - 10; policy accept;
        iifname "$BRIDGE" oifname != "$BRIDGE" drop
        oifname "$BRIDGE" iifname != "$BRIDGE" drop
        $others
    }
}
EOF
    echo 1 >"$(sysctl_path net.ipv4.ip_forward)"
    # Service traffic between two pods on the bridge: the reply is bridged, and only
    # br_netfilter lets conntrack undo the DNAT on it.
    echo 1 >"$(sysctl_path net.bridge.bridge-nf-call-iptables)"
}

net_down() {
    local r
    nft delete table inet "$NFT_TABLE" 2>/dev/null || true
    # kube-proxy's nftables tables (its mode keeps everything in these two).
    nft delete table ip kube-proxy 2>/dev/null || true
    nft delete table ip6 kube-proxy 2>/dev/null || true
    for r in "${GUARDED[@]}"; do ip route del unreachable "$r" 2>/dev/null || true; done
    ip link del "$DUMMY" 2>/dev/null || true
    ip link del "$BRIDGE" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
# configuration

write_configs() {
    mkdir -p "$S/cni/net.d" "$S/containerd" "$S/kubelet" "$S/pod-logs"
    # No host search domains or resolvers: nothing outside is reachable, CoreDNS answers all.
    echo "options ndots:5" >"$S/resolv.conf"

    cat >"$S/cni/net.d/10-kmirror.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "kmirror-cluster",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$POD_SUBNET", "gateway": "$POD_GW" }]],
        "routes": [{ "dst": "0.0.0.0/0" }],
        "dataDir": "$S/cni/ipam"
      }
    }
  ]
}
EOF

    cat >"$S/containerd/config.toml" <<EOF
version = 3
root = "$S/containerd/root"
state = "$S/containerd/state"
[grpc]
  address = "$S/containerd/containerd.sock"
[ttrpc]
  address = "$S/containerd/containerd.sock.ttrpc"
[plugins.'io.containerd.internal.v1.opt']
  path = "$S/containerd/opt"
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  netns_mounts_under_state_dir = true
  enable_cdi = false
  # The workplace runs us without CAP_SYS_RESOURCE, so no process here may lower its
  # oom_score_adj (the kubelet asks -998 for sandboxes): keep containers at containerd's.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$S/cni/net.d"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      SystemdCgroup = false
      BinaryName = "/usr/sbin/runc"
      Root = "$S/runc"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF

    cat >"$S/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: $(cgroup_root)
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
resolvConf: $S/resolv.conf
containerRuntimeEndpoint: unix://$S/containerd/containerd.sock
imageServiceEndpoint: unix://$S/containerd/containerd.sock
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
podLogsDir: $S/pod-logs
serializeImagePulls: false
protectKernelDefaults: false
# Otherwise the kubelet creates iptables chains (KUBE-FIREWALL, canaries) in the machine's own
# ip/ip6 filter, nat and mangle tables, and nothing removes them.
makeIPTablesUtilChains: false
EOF

    cat >"$S/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $S/kube-proxy.kubeconfig}
hostnameOverride: $NODE
mode: nftables
clusterCIDR: 10.215.0.0/16
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$NODE_IP/32"]
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
EOF
}

# ---------------------------------------------------------------------------------------------
# commands

kctl() { "$BIN/kubectl" --kubeconfig "$T/kubeconfig" "$@"; }

running() { [ -f "$RUN/etcd.pid" ] || ip link show "$DUMMY" >/dev/null 2>&1; }

cmd_up() {
    [ "$(id -u)" = 0 ] || die "up needs root (it creates links, routes, cgroups)"
    local t0 missing=""
    t0="$(now)"
    # Debian's packages the cluster uses as they are (runc, CNI plugins) or drives (nft).
    for c in nftables:nft openssl:openssl curl:curl runc:/usr/sbin/runc \
        containernetworking-plugins:/usr/lib/cni/bridge; do
        command -v "${c#*:}" >/dev/null || missing="$missing ${c%%:*}"
    done
    if [ -n "$missing" ]; then
        log "installing$missing"
        apt-get update -qq
        # shellcheck disable=SC2086 # one package per word
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
    if running; then
        if [ -f "$RUN/etcd.pid" ] && cmd_status >/dev/null 2>&1; then
            log "already running"
            echo "export KUBECONFIG=$T/kubeconfig"
            return 0
        fi
        die "a cluster is half up (or another clone's runs: link $DUMMY exists); run 'make cluster-down' in the clone that started it"
    fi
    "$here/build.sh"
    [ -x "$FIXTURE" ] || die "$FIXTURE is missing: run 'make fixtures' (make cluster-up does)"
    # The image's tag follows the fixture's content, so a changed fixture is a new image.
    FIXTURE_TAG="$(sha256sum "$FIXTURE" | cut -c1-12)"
    local tb
    tb="$(now)"
    log "binaries ready ($(since "$t0")s)"

    rm -rf "$S" "$RUN"
    mkdir -p "$S" "$RUN" "$LOGS"
    # A failed up leaves nothing behind (KMIRROR_CLUSTER_KEEP=1 keeps it for a post-mortem).
    trap 'rc=$?; if [ $rc != 0 ] && [ "${KMIRROR_CLUSTER_KEEP:-}" != 1 ]; then
        log "up failed; removing what it made (logs stay in $LOGS)"; cmd_down; fi' EXIT
    rm -f "$LOGS"/*.log
    local k d
    for k in "${SYSCTLS[@]}"; do
        [ -r "$(sysctl_path "$k")" ] && echo "$k $(cat "$(sysctl_path "$k")")"
    done >"$RUN/sysctl.before"
    for d in "${HOST_DIRS[@]}"; do [ -e "$d" ] || echo "$d"; done >"$RUN/hostdirs"
    nft list tables >"$T/nft-tables.before"
    make_cgroups
    net_up
    make_pki
    write_configs

    start etcd "$BIN/etcd" --name "$NODE" --data-dir "$S/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster "$NODE=http://127.0.0.1:2380" \
        --quota-backend-bytes 1073741824 --log-level warn
    wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"

    start kube-apiserver "$BIN/kube-apiserver" \
        --advertise-address "$NODE_IP" --bind-address "$NODE_IP" --secure-port 6443 \
        --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
        --service-cluster-ip-range "$SERVICE_RANGE" \
        --client-ca-file "$PKI/ca.crt" \
        --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
        --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
        --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types InternalIP \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
        --authorization-mode Node,RBAC --allow-privileged=true \
        --cert-dir "$S/apiserver" --profiling=false
    wait_for kube-apiserver 90 kctl get --raw /readyz
    log "API server ready ($(since "$tb")s)"

    start kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig "$S/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$S/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$S/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --leader-elect=false \
        --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
        --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
        --use-service-account-credentials=true \
        --allocate-node-cidrs=true --cluster-cidr 10.215.0.0/16 --node-cidr-mask-size 24 \
        --service-cluster-ip-range "$SERVICE_RANGE"
    start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$S/scheduler.kubeconfig" \
        --authentication-kubeconfig "$S/scheduler.kubeconfig" \
        --authorization-kubeconfig "$S/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --leader-elect=false

    # containerd finds containerd-shim-runc-v2 on PATH.
    PATH="$BIN:$PATH" start containerd "$BIN/containerd" --config "$S/containerd/config.toml"
    wait_for containerd 30 "$BIN/ctr" -a "$S/containerd/containerd.sock" version
    import_binary "$PAUSE_IMAGE" pause
    import_binary "$PROBE_IMAGE" probe

    start kubelet "$BIN/kubelet" --config "$S/kubelet.yaml" --kubeconfig "$S/kubelet.kubeconfig" \
        --root-dir "$S/kubelet" --cert-dir "$S/kubelet/pki" \
        --hostname-override "$NODE" --node-ip "$NODE_IP"
    start kube-proxy "$BIN/kube-proxy" --config "$S/kube-proxy.yaml"
    wait_for kubelet 120 node_ready
    log "node $NODE Ready ($(since "$tb")s after the binaries; $(since "$t0")s in all)"

    import_binary "docker.io/kmirror/coredns:$COREDNS_VERSION" coredns
    sed -e "s/@COREDNS_VERSION@/$COREDNS_VERSION/g" -e "s/@DNS_IP@/$DNS_IP/g" \
        "$here/manifests/coredns.yaml" | kctl apply -f - >/dev/null
    wait_for kubelet 90 kctl -n kube-system wait --for=condition=Available --timeout=2s deployment/coredns
    log "CoreDNS ready ($(since "$t0")s in all)"

    # The shop workloads, from the project's static Go fixture.
    import_binary "docker.io/kmirror/go-app:$FIXTURE_TAG" go-app "$FIXTURE"
    sed -e "s/@FIXTURE_TAG@/$FIXTURE_TAG/g" "$here/manifests/shop.yaml" | kctl apply -f - >/dev/null
    wait_for kubelet 90 kctl -n shop rollout status deployment/web --timeout=2s
    wait_for kubelet 90 kctl -n shop rollout status statefulset/db --timeout=2s
    wait_for kubelet 90 kctl -n shop wait --for=condition=Ready pod/duo --timeout=2s
    wait_for kubelet 90 kctl -n shop wait --for=condition=Complete job/warmup --timeout=2s
    log "shop workloads running ($(since "$t0")s in all)"
    echo "export KUBECONFIG=$T/kubeconfig"
}

node_ready() {
    [ "$(kctl get node "$NODE" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

# import_binary IMAGE NAME [FILE]: an image holding only a static binary (FILE, default
# bin/NAME) as /NAME.
import_binary() {
    local dir
    dir="$(mktemp -d)"
    cp "$(readlink -f "${3:-$BIN/$2}")" "$dir/$2"
    "$root/scripts/oci-image.sh" --entrypoint "/$2" "$1" "$dir" "$S/$2.tar" >/dev/null
    rm -rf "$dir"
    cmd_import "$S/$2.tar"
}

cmd_import() {
    [ -f "${1:-}" ] || die "usage: cluster.sh import ARCHIVE (an OCI archive, see scripts/oci-image.sh)"
    local err
    # ctr warns on every call that cgroup v1 is deprecated: show its errors only.
    err="$("$BIN/ctr" -a "$S/containerd/containerd.sock" -n k8s.io images import "$1" 2>&1 >/dev/null)" || {
        echo "$err" >&2
        die "cannot import $1 into the cluster's containerd"
    }
}

cmd_down() {
    [ "$(id -u)" = 0 ] || die "down needs root"
    local t0 c pid
    t0="$(now)"
    # Control plane and node agents first (reverse start order), by their recorded PIDs.
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        c="${COMPONENTS[i]}"
        if alive "$c"; then
            local t1
            t1="$(now)"
            # kube-apiserver sometimes lingers after shutting its controllers down; its data
            # is in etcd, which stops cleanly after it, and down deletes it all anyway.
            if [ "$c" = kube-apiserver ]; then stop_pid "$(pid_of "$c")" 1; else stop_pid "$(pid_of "$c")" 10; fi
            log "stopped $c ($(since "$t1")s)"
        fi
    done
    # What is left in the cluster's own cgroups: container processes and their shims. They get
    # SIGTERM first and up to the workloads' grace period (2 s) to exit on their own, as the
    # kubelet would give them, then SIGKILL.
    pid="$(cgroup_pids)"
    if [ -n "$pid" ]; then
        local t1
        t1="$(now)"
        # shellcheck disable=SC2086 # one PID per word
        kill -TERM $pid 2>/dev/null || true
        for _ in $(seq 20); do
            [ -n "$(cgroup_pids)" ] || break
            sleep 0.1
        done
        log "stopped the containers ($(since "$t1")s; $(cgroup_pids | wc -w) needed SIGKILL)"
    fi
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pid="$(cgroup_pids)"
        [ -n "$pid" ] || break
        # shellcheck disable=SC2086 # one PID per word
        kill -KILL $pid 2>/dev/null || true
        sleep 0.2
    done
    # Shims listen in containerd's fixed /run/containerd/s, named by the sha256 of
    # "<containerd address>/<namespace>/<shim id>" (containerd pkg/shim SocketAddress); a killed
    # shim leaves its socket. The shim ids are among the task bundles' names.
    local b sock
    for b in "$S"/containerd/state/io.containerd.runtime.v2.task/k8s.io/*; do
        [ -d "$b" ] || continue
        for sock in "$S/containerd/containerd.sock/k8s.io/${b##*/}" \
            "$S/containerd/containerd.sock/k8s.io/${b##*/}/debug"; do
            rm -f "/run/containerd/s/$(printf %s "$sock" | sha256sum | cut -d' ' -f1)"
        done
    done
    # Mounts under the state directory (pod volumes, netns, rootfs), deepest first.
    if [ -d "$S" ]; then
        awk -v s="$S" 'index($5, s"/") == 1 || $5 == s { print $5 }' /proc/self/mountinfo |
            sort -r | while IFS= read -r m; do umount -l "$m" 2>/dev/null || log "cannot unmount $m"; done
    fi
    net_down
    remove_cgroups
    if [ -f "$RUN/sysctl.before" ]; then
        while read -r k v; do
            [ "$(cat "$(sysctl_path "$k")" 2>/dev/null)" = "$v" ] || echo "$v" >"$(sysctl_path "$k")"
        done <"$RUN/sysctl.before"
    fi
    # libcni keeps each attachment's result in its fixed /var/lib/cni/results, named after
    # the network; host-local's state is in $S. Shims leave their sockets in containerd's
    # fixed /run/containerd/s. Both directories go if up made them.
    local f id
    for f in /var/lib/cni/results/kmirror-cluster-*; do
        [ -e "$f" ] || continue
        id="${f#/var/lib/cni/results/kmirror-cluster-}"
        id="${id%-*}"
        # containerd's loopback attachment of the same sandbox.
        rm -f "$f" "/var/lib/cni/results/cni-loopback-$id-lo"
    done
    # Emptied of the cluster's files above; a directory something else has put files in since
    # stays (and leftovers reports it).
    if [ -f "$RUN/hostdirs" ]; then
        tac "$RUN/hostdirs" | while IFS= read -r d; do
            [ ! -d "$d" ] || rmdir "$d" || log "$d is not empty; left in place"
        done
    fi
    rm -rf "$S" "$RUN" "$T/kubeconfig"
    log "down ($(since "$t0")s)"
    leftovers >&2 || log "down left the above behind"
}

# Everything up makes, as it is now: prints what is left and fails if anything is.
leftovers() {
    local found=0 cg h d
    cg="$(cgroup_root)"
    if pgrep -f "^$BIN/|$S/" >/dev/null; then
        echo "processes:"; pgrep -af "^$BIN/|$S/"; found=1
    fi
    if grep -qF " $T/" /proc/self/mountinfo; then
        echo "mounts:"; grep -F " $T/" /proc/self/mountinfo; found=1
    fi
    for d in "$BRIDGE" "$DUMMY" "${DUMMY}p"; do
        if ip link show "$d" >/dev/null 2>&1; then echo "link: $d"; found=1; fi
    done
    if ip route show type unreachable | grep -qE '^10\.21[567]\.'; then
        echo "routes:"; ip route show type unreachable | grep -E '^10\.21[567]\.'; found=1
    fi
    if nft list tables | grep -qE "inet $NFT_TABLE\$|kube-proxy\$"; then
        echo "nftables:"; nft list tables | grep -E "inet $NFT_TABLE\$|kube-proxy\$"; found=1
    fi
    # Tables that appeared while the cluster ran (none should: nothing here uses iptables).
    if [ -f "$T/nft-tables.before" ] && ! diff <(sort "$T/nft-tables.before") <(nft list tables | sort) | grep '^>'; then
        :
    elif [ -f "$T/nft-tables.before" ]; then
        echo "(nftables tables above appeared since up)"; found=1
    fi
    for h in $(hierarchies); do
        if [ -d "$h$cg" ]; then echo "cgroup: $h$cg"; found=1; fi
    done
    for d in "$S" "$RUN" /var/lib/cni/results/kmirror-cluster-*; do
        if [ -e "$d" ]; then echo "file: $d"; found=1; fi
    done
    return $found
}

cmd_status() {
    local c rc=0
    echo "versions: kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION, containerd $CONTAINERD_VERSION," \
        "runc $(/usr/sbin/runc --version 2>/dev/null | awk 'NR==1 { print $3 }'), CNI plugins $CNI_PLUGINS_DEBIAN (Debian)"
    if [ ! -d "$RUN" ]; then
        echo "cluster: down"
        return 3
    fi
    for c in "${COMPONENTS[@]}"; do
        if alive "$c"; then
            echo "$c: running (pid $(pid_of "$c"))"
        elif [ -f "$RUN/$c.pid" ]; then
            echo "$c: NOT RUNNING"
            crashed "$c"
            rc=1
        else
            echo "$c: not started"
            rc=1
        fi
    done
    # Every process of the cluster is in its cgroups: components, shims, containers.
    local pids
    pids="$(cgroup_pids | paste -sd, -)"
    if [ -n "$pids" ]; then
        # RSS counts the multi-call binary's shared pages once per process; PSS splits them.
        local pss
        pss="$(for p in ${pids//,/ }; do cat "/proc/$p/smaps_rollup" 2>/dev/null; done |
            awk '/^Pss:/ { s += $2 } END { printf "%.0f", s / 1024 }')"
        ps -o rss= -p "$pids" | awk -v pss="$pss" '{ s += $1; n++ }
            END { printf "memory: %.0f MiB RSS, %s MiB PSS, in %d processes\n", s / 1024, pss, n }'
    fi
    if alive kube-apiserver; then
        kctl get nodes -o wide 2>&1 || rc=1
        kctl get pods -A -o wide 2>&1 || rc=1
    fi
    echo "export KUBECONFIG=$T/kubeconfig"
    return $rc
}

# Sourced (by tests), define the functions only.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0
case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
leftovers) leftovers ;;
import)
    shift
    cmd_import "$@"
    ;;
*)
    echo "usage: $0 up|down|status|import ARCHIVE" >&2
    exit 2
    ;;
esac
