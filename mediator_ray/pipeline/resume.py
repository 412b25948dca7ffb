"""Progress records that make an interrupted merge resumable.

Every finished layer leaves a small JSON record under ``_progress/`` in the output: the
conflict pass its statistics, the build pass the shards it wrote with their sha256. A record
counts only if its *fingerprint* — a hash of everything that determines the layer's output
(input byte ranges and file sizes, method, options, dtype, action) — matches the current job,
and, for shards, only if the objects still hash to what was recorded. A rerun therefore skips
exactly the work that is already done and correct, and redoes anything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from mediator_ray.checkpoint import CheckpointWriter, ShardRecord
from mediator_ray.errors import ObjectNotFoundError
from mediator_ray.merge.conflict_stats import LayerConflict
from mediator_ray.pipeline.spec import JobContext, LayerResult, LayerTask
from mediator_ray.storage import ObjectStore

FORMAT_VERSION = 1
PROGRESS_PREFIX = "_progress"


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def input_fingerprint(
    ctx: JobContext, task: LayerTask, file_sizes: dict[str, dict[str, int]]
) -> str:
    """Identity of a layer's inputs: every checkpoint's URI, byte ranges and file sizes."""
    return _digest(
        {
            "version": FORMAT_VERSION,
            "layer": task.layer.name,
            "inputs": {
                name: {
                    "uri": ctx.checkpoints[name],
                    "refs": [dataclasses.astuple(ref) for ref in refs],
                    "sizes": {ref.file: file_sizes[name][ref.file] for ref in refs},
                }
                for name, refs in task.refs.items()
            },
        }
    )


def build_fingerprint(ctx: JobContext, inputs_fingerprint: str, action: str) -> str:
    """Identity of a layer's outputs: its inputs plus everything the build depends on."""
    return _digest(
        {
            "inputs": inputs_fingerprint,
            "action": action,
            "method": ctx.method,
            "averaging": ctx.averaging_method,
            "options": ctx.method_options.model_dump(mode="json"),
            "density": ctx.density if action == "route" else None,
            "dtype": ctx.dtype,
            "experts": list(ctx.expert_names),
            "n_shards": ctx.n_shards,
        }
    )


class ProgressLog:
    """Reads and writes the ``_progress/`` records of one output."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self.writer = CheckpointWriter(store)

    def _key(self, phase: str, layer: str) -> str:
        return f"{PROGRESS_PREFIX}/{phase}/{layer}.json"

    def _load(self, phase: str, layer: str, fingerprint: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self.store.read_text(self._key(phase, layer)))
        except (ObjectNotFoundError, json.JSONDecodeError):
            return None
        return record if record.get("fingerprint") == fingerprint else None

    def _save(self, phase: str, layer: str, fingerprint: str, body: dict[str, Any]) -> None:
        payload = {"fingerprint": fingerprint, **body}
        self.store.write_text(self._key(phase, layer), json.dumps(payload, indent=1))

    # ---- conflict pass -----------------------------------------------------------------------
    def conflict(self, layer: str, fingerprint: str) -> LayerConflict | None:
        record = self._load("conflict", layer, fingerprint)
        return LayerConflict(**record["conflict"]) if record else None

    def save_conflict(self, layer: str, fingerprint: str, conflict: LayerConflict) -> None:
        self._save("conflict", layer, fingerprint, {"conflict": conflict.to_dict()})

    # ---- build pass --------------------------------------------------------------------------
    def built(self, layer: str, fingerprint: str) -> LayerResult | None:
        """The recorded result, if its fingerprint matches and every shard is intact."""
        record = self._load("build", layer, fingerprint)
        if record is None:
            return None
        result = result_from_dict(record["result"])
        shards = [result.dense, *result.sparse.values()]
        if not all(self.writer.shard_is_current(shard) for shard in shards):
            return None
        result.skipped = True
        result.bytes_fetched = 0
        result.seconds = 0.0
        return result

    def save_built(self, layer: str, fingerprint: str, result: LayerResult) -> None:
        self._save("build", layer, fingerprint, {"result": dataclasses.asdict(result)})


def result_from_dict(data: dict[str, Any]) -> LayerResult:
    def shard(d: dict[str, Any]) -> ShardRecord:
        return ShardRecord(**{**d, "tensor_names": tuple(d["tensor_names"])})

    return LayerResult(
        **{
            **data,
            "dense": shard(data["dense"]),
            "sparse": {k: shard(v) for k, v in data["sparse"].items()},
        }
    )
