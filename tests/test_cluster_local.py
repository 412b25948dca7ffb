"""The local-cluster walkthrough of cluster/README.md, end to end: start, submit, stop.

This runs its own two-node cluster through ``cluster/local/start.sh`` on free ports — not the
session ``ray_cluster`` fixture — and stops exactly that cluster in a ``finally`` (the scripts
stop their own processes by pid and process group; ``ray stop`` would also kill the session
cluster and any other Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fixtures_infra import free_port

from mediator_ray.testing import Zoo

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "cluster" / "local"


def run(
    script: str, *args: str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LOCAL / script), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[dict[str, str]]:
    """start.sh on free ports; yields the environment the scripts need to reach it."""
    state_dir = tempfile.mkdtemp(prefix="mr-", dir="/tmp")  # short: Ray's socket paths live here
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session cluster
    env.update(
        {
            "RAY_BIN": str(Path(sys.executable).parent / "ray"),
            "RAY_PORT": str(free_port()),
            "DASHBOARD_PORT": str(free_port()),
            "RAY_CLIENT_PORT": str(free_port()),
            "HEAD_AGENT_PORT": str(free_port()),
            "WORKER_AGENT_PORT": str(free_port()),
            "OBJECT_STORE_BYTES": str(200_000_000),
            "STATE_DIR": state_dir,
        }
    )
    try:
        started = run("start.sh", env=env, timeout=150)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"dashboard http://127.0.0.1:{env['DASHBOARD_PORT']}" in started.stdout
        yield env
    finally:
        stopped = run("stop.sh", env=env, timeout=90)
        leftovers = subprocess.run(
            ["pgrep", "-f", state_dir], capture_output=True, text=True, check=False
        ).stdout.split()
        shutil.rmtree(state_dir, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not leftovers, f"processes of the test cluster survived stop.sh: {leftovers}"


def test_start_submit_merge_stop(
    local_cluster: dict[str, str], tiny_zoo: Zoo, tmp_path: Path
) -> None:
    config = {
        "base": str(tiny_zoo.base),
        "experts": [{"name": n, "uri": str(p)} for n, p in tiny_zoo.experts.items()],
        "method": "mediator",
        "output": str(tmp_path / "out"),
        "dtype": "float32",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    result = run("submit.sh", str(tmp_path / "merge.yaml"), env=local_cluster, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"merged → {tmp_path / 'out'}" in result.stdout  # the job's own log, streamed back

    manifest = json.loads((tmp_path / "out" / "mediator.json").read_text())
    routed = [layer["name"] for layer in manifest["layers"] if layer["action"] == "route"]
    assert routed == [f"block.{i}" for i in tiny_zoo.conflict_blocks]
    assert manifest["expert_names"] == list(tiny_zoo.experts)


def test_failed_job_propagates_its_exit_code(local_cluster: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"base": str(tmp_path)}))
    result = run("submit.sh", str(tmp_path / "bad.yaml"), env=local_cluster, timeout=240)
    # jobs/merge.py exits 2 on a bad config; `ray job submit` alone would say 1.
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "experts: Field required" in result.stdout + result.stderr


def test_submit_refuses_a_missing_config(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_BIN": str(Path(sys.executable).parent / "ray")}
    result = run("submit.sh", str(tmp_path / "nope.yaml"), env=env, timeout=30)
    assert result.returncode == 2 and "nope.yaml not found" in result.stderr
