#!/usr/bin/env bash
# The cluster part of `make test` (needs root): builds what is missing, then
# - when a test cluster already runs (`make cluster-up`), runs the smoke suite on it and leaves
#   it running;
# - when none runs, runs the whole cycle (cycle.sh: up, smoke, down, nothing left, twice), so
#   the machine ends as it started.
# A cluster that is half up (a component died) fails here with `status`'s report: it is not
# ours to repair or remove.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/build.sh"
rc=0
"$here/cluster.sh" status >/dev/null 2>&1 || rc=$?
case $rc in
0)
    echo "cluster: reusing the running test cluster (make cluster-down stops it)" >&2
    exec "$here/smoke.sh"
    ;;
3) exec "$here/cycle.sh" ;;
*)
    "$here/cluster.sh" status >&2 || true
    echo "cluster: the test cluster is half up; fix it or run 'make cluster-down', then test again" >&2
    exit 1
    ;;
esac
