#!/usr/bin/env bash
# Submit a merge job to the local cluster and wait for it; exits 0 only if the job succeeded
# (with the entrypoint's own exit code when it failed, else 1).
#
#   cluster/local/submit.sh merge.yaml          # or an s3:// URI
#
# The repository is uploaded as the job's working dir, without the heavy folders (.venv,
# data, benchmark caches, .git). A local config path is made absolute, because the job runs
# in its own copy of the working dir; paths inside the config should be absolute or s3://.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [extra jobs/merge.py args]" >&2
  exit 2
fi
CONFIG=$1
shift
case "$CONFIG" in
  s3://* | file://*) ;;
  *)
    if [ ! -f "$CONFIG" ]; then
      echo "error: config $CONFIG not found" >&2
      exit 2
    fi
    CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
    ;;
esac

RUNTIME_ENV=$(
  cat <<JSON
{"working_dir": "$REPO",
 "excludes": [".git", ".venv", "/data", "/benchmarks", "*.egg-info", "__pycache__",
              ".ruff_cache", ".pytest_cache", "*.safetensors"]}
JSON
)
JOB_ID="${JOB_ID:-merge-$(date +%Y%m%d-%H%M%S)-$$}"

set +e
"$RAY_BIN" job submit --address "$DASHBOARD_URL" --submission-id "$JOB_ID" \
  --runtime-env-json "$RUNTIME_ENV" \
  -- python jobs/merge.py --config "$CONFIG" --no-progress "$@"
rc=$?
set -e

# `ray job submit` exits 1 for a failed job and 0 for a stopped one: ask for the real outcome
# and hand back the entrypoint's own exit code.
"$PYTHON" - "$DASHBOARD_URL" "$JOB_ID" "$rc" <<'PY'
import sys

from ray.job_submission import JobStatus, JobSubmissionClient

url, job_id, submit_rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
info = JobSubmissionClient(url).get_job_info(job_id)
if info.status == JobStatus.SUCCEEDED:
    sys.exit(0)
first_line = (info.message or "").strip().splitlines()[:1]
print(f"job {job_id} {info.status}: {' '.join(first_line)}", file=sys.stderr)
sys.exit(info.driver_exit_code or submit_rc or 1)
PY
