"""What a merge's layer tasks are, as plain data: job context, layer task, layer result.

The driver builds and reads these without importing torch (~1.2 s and ~110 MB it would pay
for nothing: it never holds a tensor); :mod:`mediator_ray.pipeline.work` does the torch work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from mediator_ray.checkpoint.catalog import CheckpointCatalog
from mediator_ray.checkpoint.layers import LayerGroup
from mediator_ray.checkpoint.safetensors_format import TensorRef
from mediator_ray.checkpoint.writer import ShardRecord, shard_name
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
def cached_store(uri: str, storage: StorageOptions) -> ObjectStore:
    """One store (and boto3 client) per URI per worker process, reused across tasks."""
    return open_store(uri, storage)


def sparse_file(expert: str, index: int) -> str:
    """Where the sparse expert ``expert`` of layer ``index`` lives in the checkpoint."""
    return f"experts/{expert}/sparse-{index + 1:05d}.safetensors"


def dense_file(ctx: JobContext, index: int) -> str:
    """The HF shard holding layer ``index`` of the dense part."""
    return shard_name(index + 1, ctx.n_shards)


def task_refs(
    layer: LayerGroup, catalogs: Mapping[str, CheckpointCatalog]
) -> dict[str, tuple[TensorRef, ...]]:
    """The layer's tensor refs in each checkpoint (same names, each checkpoint's offsets)."""
    return {
        name: tuple(catalog.tensors[t] for t in layer.tensor_names)
        for name, catalog in catalogs.items()
    }
