#!/usr/bin/env bash
# Smoke tests on the running test cluster (make cluster-up first; needs root). Each check
# prints PASS or FAIL; the last line counts them.
#
# - the node is Ready with the pinned Kubernetes version;
# - a Deployment (2 replicas) behind a Service, a pod and a Job run; the Job completes;
# - a pod resolves the Service by its cluster DNS name to its ClusterIP and gets an answer
#   through it (CoreDNS, kube-proxy), with `kubectl exec`;
# - `kubectl logs` shows the request; `kubectl port-forward` reaches the Service from here;
# - containment: from a pod, an address under the cluster's `unreachable` routes fails on this
#   machine (no route to host), and a listener on another interface of this machine (a scratch
#   network namespace standing in for "outside"), which this machine itself reaches, is not
#   reached from the pod: forwarding from the cluster bridge to other interfaces is dropped.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=versions.env
. "$here/versions.env"
T="$root/target/cluster"
BIN="$T/bin"
NS=kmirror-smoke
OUT_NS=kmcl-smoke-out OUT_HOST=10.217.200.1 OUT_ADDR=10.217.200.2
passed=0 failed=0
k() { "$BIN/kubectl" --kubeconfig "$T/kubeconfig" "$@"; }

check_out="$(mktemp)"
check() { # NAME CMD...: runs CMD (in this shell: it may record PIDs); PASS if it succeeds
    local name="$1"
    shift
    if "$@" >"$check_out" 2>&1; then
        echo "PASS $name"
        passed=$((passed + 1))
    else
        echo "FAIL $name"
        tail -n 15 "$check_out" | sed "s/^/    /"
        failed=$((failed + 1))
    fi
}

pf_pid="" out_pid=""
cleanup() {
    [ -z "$pf_pid" ] || kill "$pf_pid" 2>/dev/null
    [ -z "$out_pid" ] || kill "$out_pid" 2>/dev/null
    ip netns del "$OUT_NS" 2>/dev/null
    ip link del kmclo0 2>/dev/null
    k delete namespace "$NS" --wait=false >/dev/null 2>&1
    rm -f "$check_out"
}
trap cleanup EXIT

node_version() {
    [ "$(k get node kmirror-node -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status} {.status.nodeInfo.kubeletVersion}')" = "True $KUBERNETES_VERSION" ]
}
check "node Ready with $KUBERNETES_VERSION" node_version

get_all() {
    local out
    out="$(k get nodes,pods -A)" || return 1
    echo "$out"
    grep -q '^node/kmirror-node *Ready' <<<"$out" && grep -q '^kube-system *pod/coredns-.* Running' <<<"$out"
}
check "kubectl get nodes,pods -A" get_all

k delete namespace "$NS" --ignore-not-found --wait=true >/dev/null
k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: $NS}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: $NS}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: kmirror/probe:1
        imagePullPolicy: Never
        command: ["/probe", "serve", ":8080"]
        ports: [{containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: $NS}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: $NS}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: kmirror/probe:1
    imagePullPolicy: Never
    command: ["/probe", "sleep"]
---
apiVersion: batch/v1
kind: Job
metadata: {name: once, namespace: $NS}
spec:
  backoffLimit: 3
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: once
        image: kmirror/probe:1
        imagePullPolicy: Never
        command: ["/probe", "get", "http://web.$NS.svc.cluster.local/"]
YAML

check "Deployment with 2 replicas available" k -n "$NS" rollout status deployment/web --timeout=90s
check "pod Running and Ready" k -n "$NS" wait --for=condition=Ready pod/client --timeout=90s
check "Job completes (DNS name and ClusterIP from a pod)" \
    k -n "$NS" wait --for=condition=Complete job/once --timeout=90s

resolves_to_clusterip() {
    local ip got
    ip="$(k -n "$NS" get service web -o 'jsonpath={.spec.clusterIP}')"
    got="$(k -n "$NS" exec client -- /probe resolve "web.$NS.svc.cluster.local")" || return 1
    echo "service $ip, resolved $got"
    [ "$got" = "$ip" ]
}
check "cluster DNS resolves the Service to its ClusterIP (kubectl exec)" resolves_to_clusterip

through_clusterip() {
    local out
    out="$(k -n "$NS" exec client -- /probe get "http://web.$NS.svc.cluster.local/")" || return 1
    echo "$out"
    grep -q '^hello from web-' <<<"$out"
}
check "a pod reaches the Service through its ClusterIP (kube-proxy)" through_clusterip

logs_show_request() {
    local out
    out="$(k -n "$NS" logs -l app=web --tail=-1)" || return 1
    echo "$out"
    grep -q 'request from 10\.215\.0\.[0-9]*:[0-9]* for /' <<<"$out"
}
check "kubectl logs shows the requests" logs_show_request

port_forward() {
    local log port out
    log="$(mktemp)"
    k -n "$NS" port-forward service/web 0:80 >"$log" 2>&1 &
    pf_pid=$!
    for _ in $(seq 100); do
        port="$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$log")"
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { cat "$log"; return 1; }
    out="$(curl -sS --max-time 10 "http://127.0.0.1:$port/")"
    echo "$out"
    kill "$pf_pid"
    pf_pid=""
    rm -f "$log"
    grep -q '^hello from web-' <<<"$out"
}
check "kubectl port-forward reaches the Service" port_forward

unreachable_fails_locally() {
    local out
    # 10.216.255.254: in the service range, no such Service; the host's unreachable route
    # answers at once.
    if out="$(k -n "$NS" exec client -- /probe dial 10.216.255.254:80 5 2>&1)"; then
        echo "connected: $out"
        return 1
    fi
    echo "$out"
    grep -q 'no route to host' <<<"$out"
}
check "containment: an unowned address under the cluster's ranges fails locally" unreachable_fails_locally

forward_dropped() {
    local out
    ip netns add "$OUT_NS"
    ip link add kmclo0 type veth peer name kmclo1 netns "$OUT_NS"
    ip addr add "$OUT_HOST/30" dev kmclo0
    ip link set kmclo0 up
    ip -n "$OUT_NS" addr add "$OUT_ADDR/30" dev kmclo1
    ip -n "$OUT_NS" link set kmclo1 up
    ip -n "$OUT_NS" link set lo up
    ip -n "$OUT_NS" route add default via "$OUT_HOST"
    ip netns exec "$OUT_NS" "$BIN/probe" serve "$OUT_ADDR:8080" >/dev/null 2>&1 &
    out_pid=$!
    # The listener is there: this machine reaches it.
    for _ in $(seq 50); do
        "$BIN/probe" dial "$OUT_ADDR:8080" 1 >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$BIN/probe" dial "$OUT_ADDR:8080" 2 || return 1
    # A pod does not: the bridge may not forward to another interface.
    if out="$(k -n "$NS" exec client -- /probe dial "$OUT_ADDR:8080" 3 2>&1)"; then
        echo "pod connected to another interface: $out"
        return 1
    fi
    echo "from the pod: $out"
}
check "containment: forwarding from the cluster bridge to another interface is dropped" forward_dropped

# The shop workloads that up starts (manifests/shop.yaml).
shop_running() {
    local out
    out="$(k -n shop get pods -o 'jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.containerStatuses[*].ready}{"\n"}{end}')"
    echo "$out"
    # Every pod Running with every container ready, or the Job's (an attempt may have failed
    # before the web Service had endpoints; the Job retries).
    # Pods of the CronJob's runs (report-...) come and go; shop_cronjob checks one.
    ! grep -vE ' Running true( true)*$|^warmup-|^report-' <<<"$out" &&
        [ "$(grep -c '^web-.* Running' <<<"$out")" = 2 ] && grep -q '^db-0 Running' <<<"$out" &&
        grep -q '^duo Running true true$' <<<"$out" && grep -q '^warmup-.* Succeeded' <<<"$out"
}
check "shop: Deployment (2), StatefulSet, two-container pod running; Job succeeded" shop_running

shop_env_and_files() {
    local env secret file token
    env="$(k -n shop exec deployment/web -- /go-app env SHOP_GREETING)" &&
        secret="$(k -n shop exec deployment/web -- /go-app env SHOP_API_TOKEN)" &&
        file="$(k -n shop exec deployment/web -- /go-app cat /etc/shop/app.conf)" &&
        token="$(k -n shop exec deployment/web -- /go-app cat /var/run/secrets/kubernetes.io/serviceaccount/token)" ||
        return 1
    printf '%s\n' "$env" "$secret" "$file" "$token"
    [ "$env" = "env=hello from the shop config map" ] && [ "$secret" = "env=s3cr3t-from-the-shop-secret" ] &&
        grep -q '^currency = EUR$' <<<"$file" &&
        grep -qE '^eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$' <<<"$token" # a JWT
}
check "shop: env from ConfigMap and Secret, ConfigMap file, service-account token" shop_env_and_files

shop_names() {
    local db_ip got duo
    db_ip="$(k -n shop get pod db-0 -o 'jsonpath={.status.podIP}')"
    got="$(k -n "$NS" exec client -- /probe resolve db-0.db.shop.svc.cluster.local)" || return 1
    echo "db-0 is $db_ip, resolved $got"
    [ "$got" = "$db_ip" ] || return 1
    # The two containers of duo share the pod's network: the helper reaches the app on localhost.
    duo="$(k -n shop exec duo -c helper -- /go-app get http://127.0.0.1:8080/duo)" || return 1
    echo "$duo"
    k -n "$NS" exec client -- /probe get http://duo.shop.svc.cluster.local/ >/dev/null
}
check "shop: StatefulSet pod by DNS name, two-container pod by localhost and Service" shop_names

# A run of the CronJob, started now rather than waiting for its schedule: its template works,
# and its pod reached the web Service by name.
shop_cronjob() {
    local job="report-smoke-$$" out
    k -n shop create job "$job" --from=cronjob/report || return 1
    k -n shop wait --for=condition=Complete --timeout=60s "job/$job" || {
        k -n shop describe "job/$job"
        k -n shop delete job "$job" --wait=false
        return 1
    }
    out="$(k -n shop logs "job/$job")"
    echo "$out"
    k -n shop delete job "$job" --wait=false >/dev/null
    [ "$(k -n shop get cronjob report -o 'jsonpath={.spec.schedule}')" = "*/5 * * * *" ] &&
        grep -q '^status=200$' <<<"$out" && grep -q '^body=local-app /report$' <<<"$out"
}
check "shop: a run of the CronJob completes and reached the web Service" shop_cronjob

echo "cluster smoke: $passed passed, $failed failed"
[ "$failed" = 0 ]
