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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from mediator_ray.checkpoint import (
    CheckpointWriter,
    ShardRecord,
    read_tensors,
)
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
from mediator_ray.pipeline.spec import (
    BASE,
    PREVIOUS,
    SPARSE_KEY_SEPARATOR,
    JobContext,
    LayerResult,
    LayerTask,
    cached_store,
    dense_file,
    sparse_file,
)


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


def fetch_layer(ctx: JobContext, task: LayerTask) -> LayerInputs:
    """Read the layer's tensors from every checkpoint, checkpoints in parallel."""

    def fetch(checkpoint: str) -> tuple[str, dict[str, np.ndarray], int]:
        store = cached_store(ctx.checkpoints[checkpoint], ctx.storage)
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


def build_layer(ctx: JobContext, task: LayerTask, action: str, inputs: LayerInputs) -> LayerResult:
    """Merge one layer (average) or split it into dense + sparse experts (route); write it."""
    start = time.perf_counter()
    device = task_device(ctx)
    tensors = inputs.tensors(task, device)
    base = tensors[BASE]
    out_dtype = dtype_from_name(ctx.dtype)
    out_store = cached_store(ctx.output, ctx.storage)
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
