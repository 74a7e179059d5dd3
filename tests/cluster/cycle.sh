#!/usr/bin/env bash
# The test cluster's whole cycle (needs root; builds what is missing first): up, the smoke
# suite, down, and a check that down left nothing (processes, mounts, links, routes, nftables
# tables, cgroups, state); then up again, which must come back Ready with CoreDNS and pass the
# smoke suite again, and down again with nothing left. Prints the time of each step.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
c="$here/cluster.sh"
failed=0
step() { # NAME CMD...
    local name="$1" t0 rc=0
    shift
    t0=$(date +%s.%N)
    "$@" || rc=$?
    awk -v n="$name" -v r="$([ $rc = 0 ] && echo ok || echo FAILED)" -v a="$t0" -v b="$(date +%s.%N)" \
        'BEGIN { printf "cycle: %s: %s (%.1fs)\n", n, r, b - a }'
    [ $rc = 0 ] || failed=$((failed + 1))
    return 0
}
# A cluster left running by someone else is not ours to cycle.
if "$c" status >/dev/null 2>&1; then
    echo "cycle: a cluster is running; run 'make cluster-down' first" >&2
    exit 1
fi
"$here/build.sh"
# A component that dies is reported by status, with its log's last lines, and down still
# removes everything. kube-scheduler stands in for any component: SIGKILL by its recorded PID.
crash_reported() {
    local pid out
    pid="$(cat "$here/../../target/cluster/run/kube-scheduler.pid")" || return 1
    kill -KILL "$pid"
    while [ -d "/proc/$pid" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]; do sleep 0.1; done
    if out="$("$c" status 2>&1)"; then
        echo "status succeeded with a dead kube-scheduler:"
        echo "$out"
        return 1
    fi
    echo "$out" | grep -E 'kube-scheduler|last lines'
    grep -q '^kube-scheduler: NOT RUNNING$' <<<"$out" &&
        grep -q 'kube-scheduler is not running; last lines of .*/kube-scheduler.log:' <<<"$out"
}
total=0
for round in 1 2; do
    step "up ($round)" "$c" up
    step "smoke ($round)" "$here/smoke.sh"
    if [ $round = 2 ]; then step "a crashed component is reported" crash_reported; total=$((total + 1)); fi
    step "down ($round)" "$c" down
    step "nothing left ($round)" "$c" leftovers
done
total=$((total + 8))
echo "cluster cycle: $((total - failed)) passed, $failed failed"
[ $failed = 0 ]
