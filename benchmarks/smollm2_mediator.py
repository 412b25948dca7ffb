"""Shared inputs of the runtime and serving benchmarks: merged checkpoints of real SmolLM2-135M.

``merge_vs_mergekit.build_inputs`` gives a base + 4 planted experts of the real SmolLM2-135M
(bf16). Here they are merged once with our own job (``run_merge``) and cached under
``benchmarks/.cache/``:

* ``mediator_checkpoint()``: ``method: mediator`` with the default options (route_fraction
  0.25, density 0.1, bf16) and a calibration JSONL per expert, so the merge fits a router.
  Expert i "owns" the zoo's task i (``TASKS``): its calibration prompts are
  ``sample_prompts(TASKS[i], …)``, and requests use fresh prompts of the same tasks.
* ``averaged_checkpoint()``: the same experts merged with ``method: linear`` — the plain
  averaged model that Mediator is compared against (no router, no sparse experts).

Each merged folder is keyed by its recipe and has a marker written last (after the merge
published its own manifest), so an interrupted build is redone rather than reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # when imported from outside benchmarks/
    sys.path.insert(0, str(HERE))

import merge_vs_mergekit as mvm  # noqa: E402  (a sibling script, not a package)

from mediator_ray import __version__  # noqa: E402
from mediator_ray.testing.zoo import sample_prompts  # noqa: E402

CACHE = mvm.CACHE
EXPERTS: tuple[str, ...] = mvm.EXPERTS
#: Expert i is calibrated on (and asked) the zoo's task i.
TASKS: tuple[str, ...] = ("math", "code", "chat", "json")
TASK_OF: dict[str, str] = dict(zip(EXPERTS, TASKS, strict=True))
CALIBRATION_PROMPTS = 64  # per expert; the router holds out 20 % of them
CALIBRATION_SEED = 0
#: Request prompts come from another seed, so they are not calibration prompts.
REQUEST_SEED = 1000

#: Set before Ray is imported (it is imported lazily, below): keep a local Ray on 127.0.0.1,
#: never report usage, never reach a model hub.
ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # a private local cluster; no token to hand around
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars
}
for _key, _value in ENV.items():
    os.environ.setdefault(_key, _value)


@dataclass(frozen=True)
class Merged:
    """A merged checkpoint and the inputs it was merged from."""

    checkpoint: Path
    method: str
    base: Path
    experts: dict[str, Path]


def request_prompts(n: int, seed: int = REQUEST_SEED) -> list[tuple[str, str]]:
    """``n`` (task, prompt) pairs cycling over ``TASKS`` — fresh prompts, not calibration ones."""
    per_task = -(-n // len(TASKS))
    pools = {task: sample_prompts(task, per_task, seed=seed) for task in TASKS}
    return [
        (TASKS[i % len(TASKS)], pools[TASKS[i % len(TASKS)]][i // len(TASKS)]) for i in range(n)
    ]


@contextmanager
def local_ray(num_cpus: int | None = None) -> Iterator[None]:
    """A private local Ray on 127.0.0.1 for the block, unless one is already initialised.

    ``address="local"`` and a private temp dir: a bare ``ray.init()`` would attach to
    whatever cluster the last ``ray start`` on this shared machine recorded, or to the one
    in ``RAY_ADDRESS``, instead of starting our own. The temp dir is short because Ray's
    Unix socket paths below it are limited to 107 characters."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _temp_dir=temp,
        logging_level="WARNING",
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _write_calibration(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    uris = {}
    for expert, task in TASK_OF.items():
        prompts = sample_prompts(task, CALIBRATION_PROMPTS, seed=CALIBRATION_SEED)
        path = folder / f"{expert}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        uris[expert] = str(path)
    return uris


def merged_checkpoint(method: str, cache: Path = CACHE) -> Merged:
    """Merge the 4 SmolLM2 experts with ``method`` (cached; the marker is written last).

    ``mediator`` gets calibration prompts (so a router is fitted); any other method is an
    ordinary merge with its default options (``linear``: the plain average)."""
    from mediator_ray.config import parse_config
    from mediator_ray.pipeline import run_merge

    inputs = mvm.build_inputs(cache)
    recipe: dict[str, Any] = {
        "inputs": inputs.base.parent.name,
        "method": method,
        "options": {},  # the defaults: route_fraction 0.25, density 0.1 for mediator
        "dtype": "bfloat16",
        "calibration": [CALIBRATION_PROMPTS, CALIBRATION_SEED, TASKS]
        if method == "mediator"
        else None,
        "version": __version__,
    }
    key = hashlib.blake2b(json.dumps(recipe).encode(), digest_size=4).hexdigest()
    root = cache / f"smollm2-{method}-{key}"
    merged = Merged(root / "checkpoint", method, inputs.base, dict(inputs.experts))
    marker = root / "bench.json"
    if marker.exists():
        return merged
    shutil.rmtree(root, ignore_errors=True)
    print(f"merging 4 SmolLM2 experts ({method}) into {merged.checkpoint} ...", file=sys.stderr)
    calibration = _write_calibration(root / "calibration") if method == "mediator" else {}
    config = parse_config(
        {
            "base": str(inputs.base),
            "experts": [
                {
                    "name": e,
                    "uri": str(p),
                    **({"calibration": calibration[e]} if calibration else {}),
                }
                for e, p in inputs.experts.items()
            ],
            "method": method,
            "output": str(merged.checkpoint),
            "dtype": recipe["dtype"],
        },
        source=f"{method} benchmark checkpoint",
    )
    with local_ray():
        run_merge(config, show_progress=False)
    marker.write_text(json.dumps(recipe) + "\n")
    return merged


def mediator_checkpoint(cache: Path = CACHE) -> Merged:
    """The Mediator checkpoint (default options, with a router) of the 4 SmolLM2 experts."""
    return merged_checkpoint("mediator", cache)


def averaged_checkpoint(cache: Path = CACHE) -> Merged:
    """The plain average (``linear``) of the same 4 experts: no router, no sparse experts."""
    return merged_checkpoint("linear", cache)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, shared storages (tied weights) once — the
    same accounting as ``MediatorModel.resident_bytes()["model"]``."""
    seen: dict[int, int] = {}
    for t in [p.data for p in model.parameters()] + list(model.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
