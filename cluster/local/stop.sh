#!/usr/bin/env bash
# Stop the cluster start.sh started (the same RAY_PORT / STATE_DIR), and nothing else.
#
# SIGTERM to each node's leader process (`ray start --block`, worker_node.py) makes it shut
# down the Ray processes it spawned. start.sh ran each leader with setsid, so every process of
# a node (raylet, GCS, dashboard, Ray workers) is in the session whose id is the leader's pid:
# after a grace period whatever is left of those sessions is SIGKILLed by pid. Unlike
# `ray stop`, which kills Ray processes by name, other Ray clusters on the machine are left alone.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
GRACE_SECONDS="${GRACE_SECONDS:-15}"

session_pids() {  # session_pids SID...: pids of the processes in these sessions
  ps -eo pid=,sid= | awk -v sids=" $* " 'index(sids, " " $2 " ") { print $1 }'
}

leaders=()
for role in worker head; do
  if [ -f "$STATE_DIR/$role.pid" ]; then
    leaders+=("$(cat "$STATE_DIR/$role.pid")")
  fi
done
if [ ${#leaders[@]} -eq 0 ]; then
  echo "no local cluster recorded in $STATE_DIR"
  exit 0
fi

kill -TERM "${leaders[@]}" 2>/dev/null
deadline=$((SECONDS + GRACE_SECONDS))
while [ -n "$(session_pids "${leaders[@]}")" ] && [ "$SECONDS" -lt "$deadline" ]; do
  sleep 0.2
done
left="$(session_pids "${leaders[@]}")"
if [ -n "$left" ]; then
  # shellcheck disable=SC2086  # one pid per word
  kill -KILL $left 2>/dev/null
fi
rm -f "$STATE_DIR/worker.pid" "$STATE_DIR/head.pid"
echo "stopped the local cluster (sessions ${leaders[*]})"
exit 0
