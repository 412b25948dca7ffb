"""The Ray tasks of a merge: thin wrappers that add resumability around :mod:`work`.

``conflict_task`` fetches a layer once, scores it and hands the fetched bytes back as a second
return value that stays in Ray's object store (spilling to disk when it is full) until the
build pass consumes it — so each input byte is fetched from storage once per merge.
``build_task`` merges or decomposes the layer and writes its shards straight to the output.
Both record their result under ``_progress/`` before returning, so an interrupted job can
resume from what the workers finished, whatever happened to the driver.

The torch work (:mod:`work`, :mod:`mediator_ray.router.checkpoint`) is imported inside the
tasks: the driver imports this module to submit them and must not import torch (see
:func:`mediator_ray.raysession.ensure_ray`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray

from mediator_ray.merge.conflict_stats import LayerConflict
from mediator_ray.pipeline.resume import ProgressLog
from mediator_ray.pipeline.spec import JobContext, LayerResult, LayerTask, cached_store

if TYPE_CHECKING:
    from mediator_ray.pipeline.work import LayerInputs


def _progress(ctx: JobContext) -> ProgressLog:
    return ProgressLog(cached_store(ctx.output, ctx.storage))


def conflict_task(
    ctx: JobContext,
    task: LayerTask,
    fingerprint: str,
    keep_inputs: bool,
    previous: LayerConflict | None = None,
) -> tuple[tuple[LayerConflict, int], LayerInputs | None]:
    """((conflict stats, bytes fetched), inputs to keep for the build pass or None).

    ``previous``: the layer's statistics in the previous version (incremental merge).
    """
    from mediator_ray.pipeline.work import fetch_layer, score_layer

    inputs = fetch_layer(ctx, task)
    conflict = score_layer(ctx, task, inputs, previous)
    _progress(ctx).save_conflict(task.layer.name, fingerprint, conflict)
    return (conflict, inputs.bytes_fetched), (inputs if keep_inputs else None)


def build_task(
    ctx: JobContext,
    task: LayerTask,
    action: str,
    fingerprint: str,
    inputs: LayerInputs | None,
) -> LayerResult:
    """Build one layer unless a verified result of the same fingerprint already exists."""
    from mediator_ray.pipeline.work import build_layer, fetch_layer

    progress = _progress(ctx)
    done = progress.built(task.layer.name, fingerprint)
    if done is not None:
        return done
    fetched_here = inputs is None
    if inputs is None:
        inputs = fetch_layer(ctx, task)
    result = build_layer(ctx, task, action, inputs)
    result.bytes_fetched = inputs.bytes_fetched if fetched_here else 0
    result.node_id = ray.get_runtime_context().get_node_id()
    progress.save_built(task.layer.name, fingerprint, result)
    return result


def remote_conflict_task(options: dict) -> ray.remote_function.RemoteFunction:
    return ray.remote(num_returns=2, **options)(conflict_task)


def remote_build_task(options: dict) -> ray.remote_function.RemoteFunction:
    return ray.remote(**options)(build_task)


def fit_router_task(*args: Any, **kwargs: Any) -> tuple[dict[str, bytes], dict]:
    """:func:`mediator_ray.router.checkpoint.fit_checkpoint_router`, imported in the worker."""
    from mediator_ray.router.checkpoint import fit_checkpoint_router

    return fit_checkpoint_router(*args, **kwargs)
