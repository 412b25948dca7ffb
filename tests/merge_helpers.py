"""Helpers shared by the merge-job tests: configs for a zoo, reading outputs back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load

from mediator_ray.config import MergeConfig, parse_config
from mediator_ray.merge import decode_sparse
from mediator_ray.pipeline import run_merge
from mediator_ray.storage import ObjectStore, open_store
from mediator_ray.testing import Zoo, sample_prompts


def zoo_config(
    zoo: Zoo,
    output: str,
    method: str = "mediator",
    *,
    base: str | None = None,
    experts: dict[str, str] | None = None,
    **overrides: Any,
) -> MergeConfig:
    """A merge config over ``zoo`` (or the same names at other URIs, e.g. on S3)."""
    uris = experts or {name: str(path) for name, path in zoo.experts.items()}
    data: dict[str, Any] = {
        "base": base or str(zoo.base),
        "experts": [{"name": name, "uri": uri} for name, uri in uris.items()],
        "method": method,
        "output": output,
        "dtype": "float32",
    }
    data.update(overrides)
    return parse_config(data, source="test")


def read_checkpoint_tensors(store: ObjectStore) -> dict[str, torch.Tensor]:
    """Every tensor of the HF checkpoint (dense part) in ``store``, via its index."""
    index = json.loads(store.read_text("model.safetensors.index.json"))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load(store.read(file)))
    return tensors


def read_sparse_expert(store: ObjectStore, expert: str) -> dict[str, dict[str, torch.Tensor]]:
    """tensor name → its encoded sparse fields, for one expert of a Mediator checkpoint."""
    index = json.loads(store.read_text(f"experts/{expert}/index.json"))
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(set(index["weight_map"].values())):
        for key, value in load(store.read(file)).items():
            name, _, field = key.partition("::")
            fields.setdefault(name, {})[field] = value
    return fields


def decoded_sparse(store: ObjectStore, expert: str) -> dict[str, Any]:
    return {name: decode_sparse(enc) for name, enc in read_sparse_expert(store, expert).items()}


def object_bytes(uri: str, skip: tuple[str, ...] = ("mediator.json", "_progress/")) -> dict:
    """Every object of an output except run-specific ones (manifest times, progress logs)."""
    store = open_store(uri)
    return {k: store.read(k) for k in store.list() if not k.startswith(skip)}


def manifest(uri: str | Path) -> dict[str, Any]:
    return json.loads(open_store(str(uri)).read_text("mediator.json"))


def write_calibration(folder: Path, zoo: Zoo, n: int = 60) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    uris = {}
    for name in zoo.experts:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in sample_prompts(name, n)))
        uris[name] = str(path)
    return uris


def merge_with(
    zoo: Zoo, out: Path, calibration: dict[str, str] | None, density: float, **plan: object
) -> Path:
    options = {"sparse": {"density": density}} | ({"plan": plan} if plan else {})
    config = zoo_config(zoo, str(out), options=options)
    data = config.model_dump(mode="json", by_alias=True)
    if calibration:
        for expert in data["experts"]:
            expert["calibration"] = calibration[expert["name"]]
    run_merge(parse_config(data), show_progress=False)
    return out
