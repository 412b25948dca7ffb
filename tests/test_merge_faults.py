"""Faults during a merge, for real: SIGKILL a Ray worker mid-task; SIGKILL the job's driver.

Both are bounded: each test makes at most three attempts to land its kill inside the merge
and fails (rather than skips) if it never does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from merge_helpers import manifest, object_bytes, zoo_config

from mediator_ray.pipeline import run_merge
from mediator_ray.testing import Zoo, ZooSpec, build_zoo

pytestmark = pytest.mark.usefixtures("ray_cluster")
REPO = Path(__file__).resolve().parents[1]
# Layers big enough (~12 MB of input per layer task) that tasks are in flight long enough
# to be killed, small enough that the whole file runs in seconds.
FAULT_SPEC = ZooSpec(num_layers=6, hidden_size=256, intermediate_size=512, conflict_blocks=(1, 4))


@pytest.fixture(scope="module")
def fault_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return build_zoo(tmp_path_factory.mktemp("fault-zoo"), FAULT_SPEC)


@pytest.fixture(scope="module")
def reference(fault_zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("fault-ref") / "out"
    run_merge(zoo_config(fault_zoo, str(out)), show_progress=False)
    return object_bytes(str(out))


def ray_task_pids(*task_names: str) -> list[int]:
    """PIDs of Ray workers currently executing one of ``task_names`` (from their proctitle)."""
    wanted = tuple(f"ray::{name}".encode() for name in task_names)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if cmdline.startswith(wanted):
            pids.append(int(entry))
    return pids


class WorkerKiller(threading.Thread):
    """Kills the first worker seen running a layer task, once."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and not self.killed and time.monotonic() < deadline:
            for pid in ray_task_pids("build_task", "conflict_task"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.killed.append(pid)
                break
            time.sleep(0.005)


def test_worker_killed_mid_merge_job_finishes_identically(
    fault_zoo: Zoo, reference: dict[str, bytes], tmp_path: Path
) -> None:
    for attempt in range(3):
        out = tmp_path / f"attempt-{attempt}"
        killer = WorkerKiller()
        killer.start()
        try:
            m = run_merge(zoo_config(fault_zoo, str(out)), show_progress=False).manifest
        finally:
            killer.stop.set()
            killer.join()
        if killer.killed:
            break
    assert killer.killed, "no layer task was caught running in three merges"
    assert m["stats"]["layers_resumed"] == 0  # a fresh output: every layer was built
    assert object_bytes(str(out)) == reference


def _shard_identity(out: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in out.rglob("*.safetensors")
    }


def _layers_recorded(out: Path) -> set[str]:
    folder = out / "_progress" / "build"
    return {p.stem for p in folder.glob("*.json")} if folder.exists() else set()


def test_job_killed_mid_merge_resumes_without_rewriting_finished_shards(
    fault_zoo: Zoo, reference: dict[str, bytes], tmp_path: Path
) -> None:
    config = zoo_config(fault_zoo, str(tmp_path / "out")).model_dump(mode="json", by_alias=True)
    config["compute"]["tasks_in_flight"] = 1  # one layer at a time: a clean point to cut
    config_path = tmp_path / "merge.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "jobs/merge.py", "--config", str(config_path), "--no-progress"]
    out = tmp_path / "out"

    for _attempt in range(3):
        job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while len(_layers_recorded(out)) < 2 and job.poll() is None:
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.01)
        if job.poll() is None:
            job.send_signal(signal.SIGKILL)
            job.wait()
            break
        assert (out / "mediator.json").exists(), job.stderr.read().decode()  # type: ignore[union-attr]
        for p in out.iterdir():  # finished before the kill: start over
            subprocess.run(["rm", "-rf", str(p)], check=True)
    assert job.returncode == -signal.SIGKILL
    assert not (out / "mediator.json").exists()  # killed: no checkpoint committed

    time.sleep(2.0)  # let Ray cancel what the dead driver had in flight
    finished = _layers_recorded(out)
    shards_before = _shard_identity(out)
    assert finished

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    m = manifest(out)
    assert m["stats"]["layers_resumed"] >= len(finished)
    assert object_bytes(str(out)) == reference
    shards_after = _shard_identity(out)
    for layer in m["layers"]:
        if layer["name"] in finished:
            files = [layer["dense_file"]["file"]]
            files += [f["file"] for f in layer["sparse_files"].values()]
            for file in files:
                assert shards_after[file] == shards_before[file], f"{file} was rewritten"
