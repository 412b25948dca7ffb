#!/usr/bin/env bash
# Start a two-node Ray cluster on this machine, loopback only: a head (with the dashboard, which
# `ray job submit` talks to) and one worker node, one CPU each by default.
#
#   cluster/local/start.sh             # then: cluster/local/submit.sh merge.yaml
#   RAY_PORT=6390 DASHBOARD_PORT=8275 cluster/local/start.sh   # a second cluster beside a first
#
# Each node is one blocking process in a session of its own (`ray start --head --block`, and
# worker_node.py); stop.sh stops exactly those sessions (never `ray stop`, which would kill
# every Ray cluster on the machine).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [ -f "$STATE_DIR/head.pid" ] && kill -0 "$(cat "$STATE_DIR/head.pid")" 2>/dev/null; then
  echo "error: a local cluster is already running from $STATE_DIR (cluster/local/stop.sh stops it)" >&2
  exit 2
fi
mkdir -p "$STATE_DIR"
rm -f "$STATE_DIR"/*.pid
# A half-started cluster is torn down rather than left running.
trap 'status=$?; if [ "$status" -ne 0 ]; then "$REPO/cluster/local/stop.sh" >/dev/null; fi' EXIT

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    for role in head worker; do
      if [ -f "$STATE_DIR/$role.pid" ] && ! kill -0 "$(cat "$STATE_DIR/$role.pid")" 2>/dev/null; then
        echo "error: the $role node exited; its log ($STATE_DIR/$role.log):" >&2
        tail -n 30 "$STATE_DIR/$role.log" >&2
        exit 1
      fi
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "error: timed out waiting for $what; logs in $STATE_DIR" >&2
      exit 1
    fi
    sleep 0.5
  done
}

alive_nodes() {  # alive_nodes N: the dashboard reports at least N alive nodes
  "$PYTHON" - "$DASHBOARD_URL" "$1" <<'PY'
import json, sys, urllib.request
url, want = sys.argv[1], int(sys.argv[2])
with urllib.request.urlopen(f"{url}/nodes?view=summary", timeout=5) as r:
    nodes = json.load(r)["data"]["summary"]
alive = [n for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"]
sys.exit(0 if len(alive) >= want else 1)
PY
}

setsid "$RAY_BIN" start --head --block --disable-usage-stats \
  --node-ip-address 127.0.0.1 \
  --num-cpus "$NUM_CPUS" --object-store-memory "$OBJECT_STORE_BYTES" \
  --temp-dir "$STATE_DIR/ray" \
  --port "$RAY_PORT" \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
  --ray-client-server-port "$RAY_CLIENT_PORT" \
  --dashboard-agent-listen-port "$HEAD_AGENT_PORT" \
  >"$STATE_DIR/head.log" 2>&1 </dev/null &
echo $! >"$STATE_DIR/head.pid"
# The worker only needs the GCS; the dashboard comes up meanwhile.
wait_for 60 "the head's GCS on 127.0.0.1:$RAY_PORT" bash -c "</dev/tcp/127.0.0.1/$RAY_PORT"

# The worker node joins through worker_node.py, not `ray start --address`: see its docstring.
setsid "$PYTHON" "$REPO/cluster/local/worker_node.py" \
  --address "127.0.0.1:$RAY_PORT" \
  --num-cpus "$NUM_CPUS" --object-store-memory "$OBJECT_STORE_BYTES" \
  --dashboard-agent-listen-port "$WORKER_AGENT_PORT" --temp-dir "$STATE_DIR/ray" \
  >"$STATE_DIR/worker.log" 2>&1 </dev/null &
echo $! >"$STATE_DIR/worker.pid"
wait_for 90 "both nodes to be alive (dashboard $DASHBOARD_URL)" alive_nodes 2

echo "Ray cluster up: address 127.0.0.1:$RAY_PORT, dashboard $DASHBOARD_URL (2 nodes, state in $STATE_DIR)"
echo "  submit a merge:  DASHBOARD_PORT=$DASHBOARD_PORT cluster/local/submit.sh merge.yaml"
echo "  stop it:         RAY_PORT=$RAY_PORT cluster/local/stop.sh"
