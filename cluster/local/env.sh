# Shared settings of the local-cluster scripts (sourced by start.sh, submit.sh, stop.sh).
# Every value can be overridden from the environment; the defaults are Ray's usual ports.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

RAY_PORT="${RAY_PORT:-6379}"                       # GCS (the cluster address is 127.0.0.1:RAY_PORT)
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"           # dashboard + job submission API
RAY_CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"        # ray:// client server of the head
HEAD_AGENT_PORT="${HEAD_AGENT_PORT:-52365}"        # dashboard agent (HTTP) of the head node
WORKER_AGENT_PORT="${WORKER_AGENT_PORT:-52366}"    # ... and of the worker node: one host, two agents
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-300000000}"   # per node; spills to disk beyond
NUM_CPUS="${NUM_CPUS:-1}"                          # per node
# Pid files, logs and Ray's temp dir. Short on purpose: Ray puts unix sockets below it and
# socket paths are limited to 107 bytes.
STATE_DIR="${STATE_DIR:-/tmp/mediator-ray-$RAY_PORT}"

# The ray CLI: RAY_BIN, else the project's .venv (scripts/bootstrap.sh), else PATH. Its folder
# goes first on PATH so the job's `python` is the interpreter that has mediator_ray and torch.
if [ -z "${RAY_BIN:-}" ]; then
  if [ -x "$REPO/.venv/bin/ray" ]; then RAY_BIN="$REPO/.venv/bin/ray"; else RAY_BIN="$(command -v ray || true)"; fi
fi
if [ -z "$RAY_BIN" ] || [ ! -x "$RAY_BIN" ]; then
  echo "error: ray not found; run scripts/bootstrap.sh or set RAY_BIN" >&2
  exit 2
fi
PATH="$(dirname "$RAY_BIN"):$PATH"
PYTHON="$(dirname "$RAY_BIN")/python"

# Loopback only: Ray must not advertise the machine's external address, and the local
# cluster has no token auth (nothing listens beyond 127.0.0.1).
export PATH RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# SIGTERM (stop.sh) tears a node down at once instead of draining it for Serve first.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"

DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"
