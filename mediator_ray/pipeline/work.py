"""What one layer task does, as plain functions: fetch, score, build, write.

Ray-free on purpose — :mod:`mediator_ray.pipeline.tasks` only wraps these — so the per-layer
work can be tested and profiled without a cluster, and the tensor math stays in
:mod:`mediator_ray.merge`. Each function returns small metadata; tensors travel only between
storage, this process and (for cached inputs) Ray's object store.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from mediator_ray.checkpoint import (
    CheckpointCatalog,
    CheckpointWriter,
    ShardRecord,
    TensorRef,
    read_tensors,
    shard_name,
)
from mediator_ray.checkpoint.layers import LayerGroup
from mediator_ray.merge import (
    LayerConflict,
    cast_output,
    decompose,
    dtype_from_name,
    encode_sparse,
    encoded_nbytes,
    extend_conflict,
    extend_dense_expert,
    layer_conflict,
    merge_layer,
    reconstruction_error,
    select_device,
)
from mediator_ray.merge.options import MethodOptions
from mediator_ray.storage import ObjectStore, StorageOptions, open_store

BASE = "base"
#: The previous version's dense part, in an incremental merge.
PREVIOUS = "__previous__"
#: Separates a tensor name from the field of its sparse encoding inside a sparse-expert file.
SPARSE_KEY_SEPARATOR = "::"


@dataclass(frozen=True)
class JobContext:
    """Everything a layer task needs besides its own layer; shipped to workers once."""

    checkpoints: dict[str, str]  # "base" and expert names → URI
    expert_names: tuple[str, ...]
    method: str
    averaging_method: str  # for a mediator merge: how averaged layers are merged
    method_options: MethodOptions
    density: float
    output: str
    dtype: str
    storage: StorageOptions
    device: str
    n_shards: int
    # Incremental merge: experts already in the previous version, and the ones being added.
    previous_n: int = 0
    new_experts: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerTask:
    """One layer of the merge: its group, its shard number and its byte ranges per checkpoint."""

    index: int  # 0-based position among all layers; the dense shard is number index + 1
    layer: LayerGroup
    refs: dict[str, tuple[TensorRef, ...]]  # "base" / expert name → refs, same tensor order

    @property
    def input_bytes(self) -> int:
        return sum(ref.nbytes for refs in self.refs.values() for ref in refs)


@dataclass
class LayerInputs:
    """A layer's fetched tensors as raw bytes (numpy, so Ray stores them zero-copy)."""

    raw: dict[str, dict[str, np.ndarray]]
    bytes_fetched: int

    def tensors(self, task: LayerTask, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors per checkpoint: views of the fetched buffers on CPU, copies on a GPU.

        No copy on CPU: the buffers may be read-only (Ray's object store), and the merge math
        only ever reads its inputs, so a copy would only cost memory (N + 1 layers' worth)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for checkpoint, refs in task.refs.items():
            arrays = self.raw[checkpoint]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer: never written
                out[checkpoint] = {
                    ref.name: torch.from_numpy(arrays[ref.name])
                    .view(ref.torch_dtype)
                    .reshape(ref.shape)
                    .to(device)
                    for ref in refs
                }
        return out


@dataclass
class LayerResult:
    """What a build task reports back: files written and per-layer numbers for the manifest."""

    name: str
    action: str
    dense: ShardRecord
    sparse: dict[str, ShardRecord] = field(default_factory=dict)
    sparse_bytes: dict[str, int] = field(default_factory=dict)
    recon_errors: dict[str, float] = field(default_factory=dict)
    bytes_fetched: int = 0  # by the build task itself (0 when inputs came from the cache)
    seconds: float = 0.0
    skipped: bool = False
    node_id: str = ""  # the Ray node that built the layer


@lru_cache(maxsize=64)
def _store(uri: str, storage: StorageOptions) -> ObjectStore:
    """One store (and boto3 client) per URI per worker process, reused across tasks."""
    return open_store(uri, storage)


def fetch_layer(ctx: JobContext, task: LayerTask) -> LayerInputs:
    """Read the layer's tensors from every checkpoint, checkpoints in parallel."""

    def fetch(checkpoint: str) -> tuple[str, dict[str, np.ndarray], int]:
        store = _store(ctx.checkpoints[checkpoint], ctx.storage)
        refs = task.refs[checkpoint]
        tensors = read_tensors(store, refs)
        raw = {name: t.reshape(-1).view(torch.uint8).numpy() for name, t in tensors.items()}
        return checkpoint, raw, sum(ref.nbytes for ref in refs)

    with ThreadPoolExecutor(max_workers=len(task.refs), thread_name_prefix="fetch") as pool:
        results = list(pool.map(fetch, task.refs))
    return LayerInputs(
        raw={checkpoint: raw for checkpoint, raw, _ in results},
        bytes_fetched=sum(n for _, _, n in results),
    )


def task_device(ctx: JobContext) -> torch.device:
    """cuda when this task was given a GPU (Ray sets the visible devices), else cpu."""
    try:
        import ray

        gpus = bool(ray.get_gpu_ids()) if ray.is_initialized() else False
    except Exception:  # outside Ray: no GPUs were assigned
        gpus = False
    return select_device(ctx.device, gpus_assigned=gpus)  # type: ignore[arg-type]


def score_layer(
    ctx: JobContext,
    task: LayerTask,
    inputs: LayerInputs,
    previous: LayerConflict | None = None,
) -> LayerConflict:
    """Conflict statistics of the layer (floating-point tensors only).

    With ``previous`` (an incremental merge) the layer is rescored from the previous
    version's statistics, its dense layer and the new experts — the old experts are not read.
    """
    tensors = inputs.tensors(task, task_device(ctx))
    floating = [name for name, t in tensors[BASE].items() if t.is_floating_point()]
    base = {name: tensors[BASE][name] for name in floating}
    if previous is not None:
        mean = {name: tensors[PREVIOUS][name] for name in floating}
        new = [{name: tensors[e][name] for name in floating} for e in ctx.new_experts]
        return extend_conflict(previous, base, mean, new)
    experts = [{name: tensors[e][name] for name in floating} for e in ctx.expert_names]
    return layer_conflict(base, experts)


def sparse_file(expert: str, index: int) -> str:
    """Where the sparse expert ``expert`` of layer ``index`` lives in the checkpoint."""
    return f"experts/{expert}/sparse-{index + 1:05d}.safetensors"


def dense_file(ctx: JobContext, index: int) -> str:
    """The HF shard holding layer ``index`` of the dense part."""
    return shard_name(index + 1, ctx.n_shards)


def build_layer(ctx: JobContext, task: LayerTask, action: str, inputs: LayerInputs) -> LayerResult:
    """Merge one layer (average) or split it into dense + sparse experts (route); write it."""
    start = time.perf_counter()
    device = task_device(ctx)
    tensors = inputs.tensors(task, device)
    base = tensors[BASE]
    out_dtype = dtype_from_name(ctx.dtype)
    out_store = _store(ctx.output, ctx.storage)
    writer = CheckpointWriter(out_store)
    metadata = {"layer": task.layer.name, "action": action}

    if action == "average" and PREVIOUS in tensors:  # incremental: extend the old mean
        dense = {
            name: cast_output(
                extend_dense_expert(
                    tensors[PREVIOUS][name],
                    ctx.previous_n,
                    [tensors[e][name] for e in ctx.new_experts],
                ),
                out_dtype,
            )
            if t.is_floating_point()
            else t
            for name, t in base.items()
        }
        record = writer.write_shard(dense_file(ctx, task.index), dense, metadata)
        return LayerResult(task.layer.name, action, record, seconds=time.perf_counter() - start)

    experts = [tensors[e] for e in ctx.expert_names]
    if action == "average":
        method = ctx.method if ctx.method != "mediator" else ctx.averaging_method
        dense = merge_layer(method, base, experts, ctx.method_options, out_dtype)
        record = writer.write_shard(dense_file(ctx, task.index), dense, metadata)
        return LayerResult(
            task.layer.name,
            action,
            record,
            seconds=time.perf_counter() - start,
        )

    if action != "route":
        raise ValueError(f"layer {task.layer.name}: unknown action {action!r}")
    dense_out: dict[str, torch.Tensor] = {}
    sparse_out: dict[str, dict[str, torch.Tensor]] = {e: {} for e in ctx.expert_names}
    residual_sq = dict.fromkeys(ctx.expert_names, 0.0)
    spread_sq = dict.fromkeys(ctx.expert_names, 0.0)
    for name, base_tensor in base.items():
        thetas = [e[name] for e in experts]
        if not base_tensor.is_floating_point():  # integer buffers: shared, never routed
            merged = merge_layer(
                "linear", {name: base_tensor}, [{name: t} for t in thetas], ctx.method_options
            )
            dense_out[name] = merged[name]
            continue
        dense, entries = decompose(thetas, ctx.density)
        dense_out[name] = cast_output(dense, out_dtype)
        for expert, theta, entry in zip(ctx.expert_names, thetas, entries, strict=True):
            encoded = encode_sparse(entry, out_dtype)
            for key, value in encoded.items():
                sparse_out[expert][f"{name}{SPARSE_KEY_SEPARATOR}{key}"] = value
            spread = float(torch.linalg.vector_norm(theta.float() - dense, dtype=torch.float64))
            error = reconstruction_error(theta, dense, entry)
            residual_sq[expert] += (error * spread) ** 2
            spread_sq[expert] += spread**2

    record = writer.write_shard(dense_file(ctx, task.index), dense_out, metadata)
    sparse_records: dict[str, ShardRecord] = {}
    sparse_bytes: dict[str, int] = {}
    for expert, encoded_tensors in sparse_out.items():
        sparse_meta = {**metadata, "format": "mediator-sparse", "expert": expert}
        sparse_records[expert] = writer.write_shard(
            sparse_file(expert, task.index), encoded_tensors, sparse_meta
        )
        sparse_bytes[expert] = encoded_nbytes(encoded_tensors)
    return LayerResult(
        task.layer.name,
        action,
        record,
        sparse=sparse_records,
        sparse_bytes=sparse_bytes,
        recon_errors={
            e: math.sqrt(residual_sq[e] / spread_sq[e]) if spread_sq[e] > 0 else 0.0
            for e in ctx.expert_names
        },
        seconds=time.perf_counter() - start,
    )


def task_refs(
    layer: LayerGroup, catalogs: Mapping[str, CheckpointCatalog]
) -> dict[str, tuple[TensorRef, ...]]:
    """The layer's tensor refs in each checkpoint (same names, each checkpoint's offsets)."""
    return {
        name: tuple(catalog.tensors[t] for t in layer.tensor_names)
        for name, catalog in catalogs.items()
    }
