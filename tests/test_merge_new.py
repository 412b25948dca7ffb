"""Scheduled batch merging: register → merge-new → new version, served without failures;
idempotent reruns, one publisher among concurrent runs, a killed run recovered."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from merge_helpers import read_checkpoint_tensors, zoo_config

from mediator_ray.pipeline import run_merge
from mediator_ray.registry import Registry
from mediator_ray.registry.merge_new import merge_new_experts
from mediator_ray.registry.versions import POINTER, VersionedOutput
from mediator_ray.storage import LocalStore, copy_tree
from mediator_ray.testing import Zoo, sample_prompts

pytestmark = pytest.mark.usefixtures("ray_cluster")
REPO = Path(__file__).resolve().parents[1]
TEMPLATE = {"dtype": "float32"}


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def setup(tiny_zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("merge-new")
    registry = Registry(str(folder / "registry"))
    for name in ("math", "code", "chat"):
        registry.add(name, str(tiny_zoo.experts[name]), base_uri=str(tiny_zoo.base))
    return {"folder": folder, "registry": registry, "output": folder / "mediator"}


def test_register_merge_new_and_serving_reloads_without_failed_requests(
    setup: dict, tiny_zoo: Zoo, serve_url: str
) -> None:
    from ray import serve

    from mediator_ray.serve import app

    output: Path = setup["output"]
    first = merge_new_experts(str(setup["folder"] / "registry"), str(output), TEMPLATE)
    assert first.status == "published" and first.version == 1 and not first.incremental
    assert first.experts == ["math", "code", "chat"]

    serve.run(
        app(
            {
                "checkpoint": str(output),
                "model_name": "m",
                "num_cpus": 0.25,
                "device": "cpu",
                "reload_interval_s": 0.3,
            }
        ),
        name="versions",
        route_prefix="/versions",
    )
    url = f"{serve_url}/versions/v1/completions"
    seen: list[tuple[int, int | None]] = []
    stop = threading.Event()

    def traffic() -> None:
        deadline = time.monotonic() + 120
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            body = {"prompt": sample_prompts("code", 1, seed=900 + i)[0], "max_tokens": 2}
            r = requests.post(url, json=body, timeout=60)
            version = r.json().get("mediator", {}).get("version") if r.ok else None
            seen.append((r.status_code, version))
            i += 1

    client = threading.Thread(target=traffic)
    client.start()
    try:
        while not seen:
            time.sleep(0.05)
        setup["registry"].add("json", str(tiny_zoo.experts["json"]))
        second = merge_new_experts(str(setup["folder"] / "registry"), str(output), TEMPLATE)
        assert second.status == "published" and second.version == 2
        assert second.new_experts == ["json"] and second.incremental
        assert 0 < second.bytes_fetched < second.full_merge_bytes
        deadline = time.monotonic() + 60
        while not seen or seen[-1][1] != 2:
            assert time.monotonic() < deadline, "serving never reloaded to version 2"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        client.join()
        serve.delete("versions")
    statuses = [status for status, _ in seen]
    assert statuses == [200] * len(seen)
    versions = [v for _, v in seen]
    assert versions[0] == 1 and versions[-1] == 2
    assert versions == sorted(versions)  # never back to the old version once swapped


def test_incremental_version_equals_a_full_merge(setup: dict, tiny_zoo: Zoo, tmp_path) -> None:
    full = tmp_path / "full"
    run_merge(zoo_config(tiny_zoo, str(full)), show_progress=False)  # same 4 experts, in order
    incremental = setup["output"] / "versions" / "0002"
    ours = read_checkpoint_tensors(LocalStore(str(incremental)))
    reference = read_checkpoint_tensors(LocalStore(str(full)))
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6)


def test_rerun_with_nothing_new_writes_nothing(setup: dict) -> None:
    before = snapshot(setup["output"])
    result = merge_new_experts(str(setup["folder"] / "registry"), str(setup["output"]), TEMPLATE)
    assert result.status == "nothing-new" and result.version == 2
    assert snapshot(setup["output"]) == before


def _copy_expert(source: Path, target: Path) -> str:
    copy_tree(LocalStore(str(source)), LocalStore(str(target)))
    return str(target)


def test_two_concurrent_runs_publish_exactly_once(setup: dict, tiny_zoo: Zoo) -> None:
    setup["registry"].add("math2", _copy_expert(tiny_zoo.experts["math"], setup["folder"] / "m2"))
    barrier = threading.Barrier(2)

    def run(_: int):
        barrier.wait()
        return merge_new_experts(str(setup["folder"] / "registry"), str(setup["output"]), TEMPLATE)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(2)))
    assert sorted(r.status for r in results) == ["busy", "published"]
    pointer, _ = VersionedOutput(LocalStore(str(setup["output"]))).latest()
    assert pointer is not None and pointer.version == 3 and "math2" in pointer.experts


def test_killed_run_leaves_the_previous_version_and_the_next_run_completes(
    setup: dict, tiny_zoo: Zoo
) -> None:
    output: Path = setup["output"]
    setup["registry"].add("code2", _copy_expert(tiny_zoo.experts["code"], setup["folder"] / "c2"))
    pointer_before = (output / POINTER).read_bytes()
    command = [
        sys.executable,
        "jobs/merge_new_experts.py",
        "--registry",
        str(setup["folder"] / "registry"),
        "--output",
        str(output),
        "--retain",
        "2",
        "--lease-ttl",
        "3",
        "--no-progress",
    ]
    progress = output / "versions" / "0004" / "_progress" / "build"
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (progress.exists() and len(list(progress.glob("*.json"))) >= 2):
        assert job.poll() is None, job.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert (output / POINTER).read_bytes() == pointer_before  # version 3 still serves
    assert (output / "versions" / "0003" / "mediator.json").exists()
    assert not (output / "versions" / "0004" / "mediator.json").exists()

    lease = (output / "_lease.json").read_text() if (output / "_lease.json").exists() else None
    busy = merge_new_experts(str(setup["folder"] / "registry"), str(output), TEMPLATE)
    assert busy.status == "busy", (lease, time.time())  # the dead run's lease is still valid
    expires_at = json.loads((output / "_lease.json").read_text())["expires_at"]
    time.sleep(max(0.0, expires_at - time.time()) + 0.2)
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert b"published version 4" in rerun.stderr, rerun.stderr.decode()
    pointer, _ = VersionedOutput(LocalStore(str(output))).latest()
    assert pointer is not None and pointer.version == 4 and "code2" in pointer.experts
    assert sorted(p.name for p in (output / "versions").iterdir()) == ["0003", "0004"]  # retain 2
