"""``mediator-ray demo --serve``: the README's main job, as a user runs it, in its own process.

The command starts its own local Ray on 127.0.0.1 (``RAY_ADDRESS`` removed) and its own Serve
instance, reuses the session's trained zoo (copied into its work folder, so nothing retrains),
merges with every method, prints the quality table and routed generations, then serves the
Mediator checkpoint and queries it over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mediator_ray.quality.tiny_zoo import TrainedZoo

pytestmark = pytest.mark.timeout(600)
CLI = Path(sys.executable).parent / "mediator-ray"


def test_demo_merges_scores_routes_and_serves(trained_zoo: TrainedZoo, tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    shutil.copytree(trained_zoo.root, workdir / "tiny-zoo")
    ray_tmp = tempfile.mkdtemp(prefix="rd-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_TMPDIR": ray_tmp,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "COLUMNS": "200",
    }
    try:
        run = subprocess.run(
            [str(CLI), "demo", "--serve", "--examples", "8", "--workdir", str(workdir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=540,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "reusing the trained zoo" in out
    for system in ("linear", "ties", "mediator (router)", "experts (own task)"):
        assert system in out, system
    # two routed generations per task, each naming the mix it was routed to
    assert len(re.findall(r"routed (top1|topk|ood|dense) to", out)) == 8, out[-3000:]
    # the served answers came back over HTTP with their routing
    assert len(re.findall(r"POST /v1/completions \(\w+\) → .* mix ", out)) == 4, out[-3000:]
    assert "Serve shut down" in out
    manifest = json.loads((workdir / "merges" / "mediator" / "mediator.json").read_text())
    assert manifest["router"]["heldout_accuracy"] > 0.5
