"""The merge driver: catalog → conflict pass → plan → build pass → commit.

The driver reads only headers and configs, holds only statistics and object references, and
never a model tensor. Tasks in flight are bounded (backpressure); each layer task retries on
worker failure; a rerun resumes from the ``_progress/`` records the tasks leave behind. The
manifest ``mediator.json`` is written last: a checkpoint without it does not exist.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import ray
from rich.console import Console

from mediator_ray import __version__
from mediator_ray.checkpoint import (
    MANIFEST_FILE,
    CheckpointCatalog,
    CheckpointWriter,
    check_compatible,
    open_checkpoint,
)
from mediator_ray.config import MergeConfig
from mediator_ray.errors import MediatorError
from mediator_ray.merge.conflict_stats import LayerConflict
from mediator_ray.merge.plan import LayerInfo, make_plan
from mediator_ray.merge.sparse_sizes import estimate_encoded_nbytes
from mediator_ray.pipeline.progress import MergeProgress
from mediator_ray.pipeline.report import conflicts_parquet, conflicts_png, summary_table
from mediator_ray.pipeline.resume import (
    FORMAT_VERSION,
    ProgressLog,
    build_fingerprint,
    input_fingerprint,
)
from mediator_ray.pipeline.spec import (
    BASE,
    PREVIOUS,
    JobContext,
    LayerResult,
    LayerTask,
    task_refs,
)
from mediator_ray.pipeline.tasks import fit_router_task, remote_build_task, remote_conflict_task
from mediator_ray.raysession import ensure_ray, task_options
from mediator_ray.storage import open_store

MANIFEST = MANIFEST_FILE
T = TypeVar("T")


@dataclass
class MergeOutcome:
    """What a finished merge returns to its caller (the manifest is the full record)."""

    output: str
    manifest: dict[str, Any]


def _unwrap(error: BaseException) -> BaseException:
    """A task's own MediatorError, not Ray's wrapper around it."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, MediatorError) else error


def run_bounded(
    items: Iterable[T],
    submit: Callable[[T], ray.ObjectRef],
    on_done: Callable[[T, Any], None],
    limit: int,
) -> None:
    """Submit ``items`` keeping at most ``limit`` tasks in flight; ``on_done`` per result."""
    pending: dict[ray.ObjectRef, T] = {}
    queue = iter(items)
    exhausted = False
    while True:
        while not exhausted and len(pending) < limit:
            item = next(queue, None)
            if item is None:
                exhausted = True
                break
            pending[submit(item)] = item
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            item = pending.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise _unwrap(e) from e
            on_done(item, value)


def _open_catalogs(config: MergeConfig) -> dict[str, CheckpointCatalog]:
    uris = {BASE: config.base} | {e.name: e.uri for e in config.experts}
    with ThreadPoolExecutor(max_workers=min(8, len(uris))) as pool:
        opened = pool.map(lambda uri: open_checkpoint(uri, config.storage), uris.values())
        return dict(zip(uris, opened, strict=True))


def _job_context(
    config: MergeConfig,
    n_shards: int,
    previous: tuple[str, int] | None = None,
    new_experts: tuple[str, ...] = (),
) -> JobContext:
    checkpoints = {BASE: config.base} | {e.name: e.uri for e in config.experts}
    if previous is not None:
        checkpoints[PREVIOUS] = previous[0]
    return JobContext(
        checkpoints=checkpoints,
        expert_names=tuple(config.expert_names),
        method=config.method,
        averaging_method=config.options.merge.method,
        method_options=config.options.method_options(),
        density=config.options.sparse.density,
        output=config.output,
        dtype=config.dtype,
        storage=config.storage,
        device=config.compute.device,
        n_shards=n_shards,
        previous_n=previous[1] if previous else 0,
        new_experts=new_experts,
    )


def _output_config(base: CheckpointCatalog, dtype: str) -> bytes:
    config = dict(base.config)
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    return (json.dumps(config, indent=2) + "\n").encode()


@dataclass(frozen=True)
class PreviousVersion:
    """A published Mediator checkpoint that an incremental merge extends with new experts."""

    uri: str
    manifest: dict[str, Any]


def incremental_plan(config: MergeConfig, previous: PreviousVersion) -> tuple[str, ...] | None:
    """The experts to add when ``config`` only extends ``previous``, else None (full merge).

    Extending needs what the previous version already knows to be enough: a Mediator merge
    of the same base whose experts (same names and URIs) lead ``config``'s list, plain
    averaging of low-conflict layers, and the ``deviation`` metric, whose sufficient
    statistics the manifest records.
    """
    m = previous.manifest
    old = {e["name"]: e["uri"] for e in m.get("experts", [])}
    current = [(e.name, e.uri) for e in config.experts]
    extends = (
        config.method == "mediator"
        and m.get("method") == "mediator"
        and m.get("base") == config.base
        and config.options.plan.metric == "deviation"
        and config.options.merge.method == "linear"
        and config.options.weights is None
        and 0 < len(old) < len(current)
        and list(old.items()) == current[: len(old)]
        and all(layer.get("conflict") for layer in m.get("layers", []))
    )
    return tuple(name for name, _ in current[len(old) :]) if extends else None


def run_merge(
    config: MergeConfig,
    *,
    console: Console | None = None,
    show_progress: bool = True,
    previous: PreviousVersion | None = None,
) -> MergeOutcome:
    """Run one merge job end to end; raises a MediatorError before any task on bad input.

    With ``previous`` (a published version whose experts lead ``config``'s), layers are
    scored from the previous statistics plus the new experts, and averaged layers are built
    from the previous dense layer plus the new experts: the old experts are read only for
    routed layers. Anything else falls back to a full merge.
    """
    started = time.perf_counter()
    console = console or Console(stderr=True)

    # 1. Catalog (headers only) and validation: everything that can fail early, fails here.
    catalogs = _open_catalogs(config)
    base = catalogs[BASE]
    check_compatible(base, {e: catalogs[e] for e in config.expert_names})
    new_experts = incremental_plan(config, previous) if previous else None
    previous_stats: dict[str, LayerConflict] = {}
    if previous is not None and new_experts is not None:
        catalogs[PREVIOUS] = open_checkpoint(previous.uri, config.storage)
        previous_stats = {
            layer["name"]: LayerConflict(**layer["conflict"])
            for layer in previous.manifest["layers"]
        }
    out_store = open_store(config.output, config.storage)
    writer = CheckpointWriter(out_store, marker=MANIFEST)
    writer.begin()  # the output is invalid from here until the manifest is written

    ensure_ray()
    full_sources = {name: catalogs[name] for name in (BASE, *config.expert_names)}
    tasks = [
        LayerTask(i, layer, task_refs(layer, full_sources)) for i, layer in enumerate(base.layers)
    ]
    incremental_tasks: dict[str, LayerTask] = {}
    if new_experts:
        sources = {name: catalogs[name] for name in (BASE, PREVIOUS, *new_experts)}
        incremental_tasks = {
            t.layer.name: LayerTask(t.index, t.layer, task_refs(t.layer, sources))
            for t in tasks
            if t.layer.name in previous_stats
        }
    ctx = _job_context(
        config,
        n_shards=len(tasks),
        previous=(previous.uri, len(config.experts) - len(new_experts)) if new_experts else None,
        new_experts=new_experts or (),
    )
    ctx_ref = ray.put(ctx)
    file_sizes = {
        name: {file: header.file_size for file, header in catalog.headers.items()}
        for name, catalog in catalogs.items()
    }
    input_fps = {t.layer.name: input_fingerprint(ctx, t, file_sizes) for t in tasks}
    incremental_fps = {
        name: input_fingerprint(ctx, t, file_sizes) for name, t in incremental_tasks.items()
    }
    progress_log = ProgressLog(out_store)
    options = task_options(config)
    limit = config.compute.tasks_in_flight
    bytes_fetched = 0
    conflicts: dict[str, LayerConflict] = {}
    cached_inputs: dict[str, ray.ObjectRef] = {}

    def scoring_task(t: LayerTask) -> tuple[LayerTask, str]:
        name = t.layer.name
        if name in incremental_tasks:
            return incremental_tasks[name], incremental_fps[name]
        return t, input_fps[name]

    with MergeProgress(console, enabled=show_progress) as progress:
        # 2. Conflict pass (mediator only): statistics per layer, inputs kept for the build.
        plan = None
        if config.method == "mediator":
            phase = progress.phase("conflict", len(tasks))
            todo = []
            for t in tasks:
                recorded = progress_log.conflict(t.layer.name, scoring_task(t)[1])
                if recorded is None:
                    todo.append(t)
                else:
                    conflicts[t.layer.name] = recorded
                    progress.advance(phase)
            conflict_remote = remote_conflict_task(options)

            def submit_conflict(t: LayerTask) -> ray.ObjectRef:
                task, fingerprint = scoring_task(t)
                stats_ref, inputs_ref = conflict_remote.remote(
                    ctx_ref,
                    task,
                    fingerprint,
                    config.compute.cache_inputs,
                    previous_stats.get(t.layer.name) if task is not t else None,
                )
                cached_inputs[t.layer.name] = inputs_ref
                return stats_ref

            def conflict_done(t: LayerTask, value: tuple[LayerConflict, int]) -> None:
                nonlocal bytes_fetched
                conflicts[t.layer.name], fetched = value
                bytes_fetched += fetched
                progress.advance(phase, fetched)

            run_bounded(todo, submit_conflict, conflict_done, limit)
            plan = make_plan(_layer_infos(config, base, tasks, conflicts), config.options.plan)

        # 3. Build pass: every layer merged or decomposed and written by its task.
        actions = {t.layer.name: plan.action(t.layer.name) if plan else "average" for t in tasks}
        results: dict[str, LayerResult] = {}
        phase = progress.phase("build", len(tasks))
        build_remote = remote_build_task(options)

        def submit_build(t: LayerTask) -> ray.ObjectRef:
            name = t.layer.name
            cached = cached_inputs.pop(name, None)
            if name in incremental_tasks and actions[name] == "average":
                t, fingerprint = incremental_tasks[name], incremental_fps[name]
            else:  # routed layers need every expert in full: incremental inputs do not do
                fingerprint = input_fps[name]
                cached = cached if name not in incremental_tasks else None
            return build_remote.remote(
                ctx_ref,
                t,
                actions[name],
                build_fingerprint(ctx, fingerprint, actions[name]),
                cached,
            )

        def build_done(t: LayerTask, result: LayerResult) -> None:
            nonlocal bytes_fetched
            results[t.layer.name] = result
            bytes_fetched += result.bytes_fetched
            progress.advance(phase, result.bytes_fetched)

        run_bounded(tasks, submit_build, build_done, limit)

    # 4. Commit: indexes, config, report, then the manifest last.
    bytes_fetched += sum(c.store.stats.bytes_read for c in catalogs.values())  # headers, configs
    manifest = _manifest(config, catalogs, tasks, plan, conflicts, results, bytes_fetched, started)
    extra: dict[str, bytes] = {"config.json": _output_config(base, config.dtype)}
    for expert in config.expert_names:
        weight_map = {
            f"{name}": results[t.layer.name].sparse[expert].file
            for t in tasks
            if actions[t.layer.name] == "route"
            for name in t.layer.tensor_names
            if name in _sparse_tensor_names(results[t.layer.name], expert)
        }
        if weight_map:
            extra[f"experts/{expert}/index.json"] = (
                json.dumps({"format": "mediator-sparse", "weight_map": weight_map}, indent=1)
            ).encode()
    if config.method == "mediator":
        extra["report/conflicts.parquet"] = conflicts_parquet(manifest)
        extra["report/conflicts.png"] = conflicts_png(manifest)
    writer.write_metadata([r.dense for r in results.values()], copy_from=base, extra_files=extra)

    # 5. Router: fitted on the written dense model when experts carry calibration prompts.
    if config.method == "mediator" and config.calibration:
        routed_blocks = [
            t.layer.index
            for t in tasks
            if actions[t.layer.name] == "route" and t.layer.kind == "block"
        ]
        manifest["router"] = _fit_router(config, routed_blocks, options)
    writer.publish((json.dumps(manifest, indent=1) + "\n").encode())
    if show_progress:
        console.print(summary_table(manifest))
    return MergeOutcome(config.output, manifest)


def _fit_router(config: MergeConfig, routed_blocks: list[int], options: dict[str, Any]) -> dict:
    fit = ray.remote(**{**options, "max_retries": config.compute.max_retries})(fit_router_task)
    try:
        files, summary = ray.get(
            fit.remote(
                config.output,
                config.calibration,
                config.expert_names,
                routed_blocks,
                config.router,
                config.storage,
            )
        )
    except ray.exceptions.RayTaskError as e:
        raise _unwrap(e) from e
    out_store = open_store(config.output, config.storage)
    for key, data in files.items():
        out_store.write(key, data)
    return summary


def _sparse_tensor_names(result: LayerResult, expert: str) -> set[str]:
    record = result.sparse.get(expert)
    if record is None:
        return set()
    return {key.split("::", 1)[0] for key in record.tensor_names}


def _layer_infos(
    config: MergeConfig,
    base: CheckpointCatalog,
    tasks: Sequence[LayerTask],
    conflicts: dict[str, LayerConflict],
) -> list[LayerInfo]:
    itemsize = config.output_itemsize
    density = config.options.sparse.density
    n_experts = len(config.experts)
    infos = []
    for t in tasks:
        refs = [base.tensors[name] for name in t.layer.tensor_names]
        infos.append(
            LayerInfo(
                name=t.layer.name,
                kind=t.layer.kind,
                score=conflicts[t.layer.name].score(config.options.plan.metric),
                nbytes=sum(ref.numel * itemsize for ref in refs),
                routed_extra_bytes=n_experts
                * sum(estimate_encoded_nbytes(ref.shape, density, itemsize) for ref in refs),
            )
        )
    return infos


def _manifest(
    config: MergeConfig,
    catalogs: dict[str, CheckpointCatalog],
    tasks: Sequence[LayerTask],
    plan: Any,
    conflicts: dict[str, LayerConflict],
    results: dict[str, LayerResult],
    bytes_fetched: int,
    started: float,
) -> dict[str, Any]:
    sparse_bytes = {
        expert: sum(r.sparse[expert].file_size for r in results.values() if expert in r.sparse)
        for expert in config.expert_names
    }
    dense_bytes = sum(r.dense.file_size for r in results.values())
    layers = []
    for t in tasks:
        result = results[t.layer.name]
        conflict = conflicts.get(t.layer.name)
        layers.append(
            {
                "name": t.layer.name,
                "kind": t.layer.kind,
                "index": t.layer.index,
                "action": result.action,
                "tensors": list(t.layer.tensor_names),
                "dense_file": {"file": result.dense.file, "sha256": result.dense.sha256},
                "sparse_files": {
                    e: {"file": rec.file, "sha256": rec.sha256} for e, rec in result.sparse.items()
                },
                "conflict": conflict.to_dict() if conflict else None,
                "recon_errors": result.recon_errors,
                "node_id": result.node_id,
            }
        )
    return {
        "format": "mediator",
        "format_version": FORMAT_VERSION,
        "mediator_ray_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": config.method,
        "base": config.base,
        "experts": [e.model_dump() for e in config.experts],
        "expert_names": config.expert_names,
        "output": config.output,
        "dtype": config.dtype,
        "options": config.options.model_dump(mode="json", by_alias=True),
        "plan": plan.to_dict() if plan else {"metric": None, "rule": "all layers merged"},
        "sparse": {
            "density": config.options.sparse.density if config.method == "mediator" else None,
            "encoding": "csr-uint16 or bitmap, values in the output dtype",
            "key_separator": "::",
        },
        "layers": layers,
        "sizes": {
            "base_bytes": catalogs[BASE].total_bytes,
            "dense_bytes": dense_bytes,
            "sparse_bytes": sparse_bytes,
            "total_bytes": dense_bytes + sum(sparse_bytes.values()),
        },
        "stats": {
            # What a full merge reads: base + every expert (an incremental one reads less).
            "input_bytes": sum(c.total_bytes for n, c in catalogs.items() if n != PREVIOUS),
            "incremental_from": catalogs[PREVIOUS].uri if PREVIOUS in catalogs else None,
            "bytes_fetched": bytes_fetched,  # headers and configs included
            "layers_resumed": sum(r.skipped for r in results.values()),
            "seconds": round(time.perf_counter() - started, 3),
        },
    }
