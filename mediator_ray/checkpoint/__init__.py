"""Hugging Face safetensors checkpoints: header parsing, catalog, tensor reads, sharded writes."""

from mediator_ray.checkpoint.catalog import (
    CONFIG_FILE,
    CORE_CONFIG_FIELDS,
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    CheckpointCatalog,
    check_compatible,
    open_checkpoint,
)
from mediator_ray.checkpoint.layers import LayerGroup, LayerKind, classify, group_layers
from mediator_ray.checkpoint.reader import read_tensor, read_tensors, tensor_from_bytes
from mediator_ray.checkpoint.safetensors_format import (
    DTYPE_CODES,
    DTYPES,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorRef,
    parse_header,
    read_header,
)
from mediator_ray.checkpoint.writer import (
    DEFAULT_MARKER,
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointWriter,
    ShardRecord,
    plan_shards,
    save_checkpoint,
    serialize_tensors,
    shard_name,
)

__all__ = [
    "CONFIG_FILE",
    "CORE_CONFIG_FIELDS",
    "DEFAULT_MARKER",
    "DEFAULT_MAX_SHARD_BYTES",
    "DTYPES",
    "DTYPE_CODES",
    "INDEX_FILE",
    "MAX_HEADER_BYTES",
    "SINGLE_FILE",
    "TOKENIZER_FILES",
    "CheckpointCatalog",
    "CheckpointWriter",
    "LayerGroup",
    "LayerKind",
    "SafetensorsHeader",
    "ShardRecord",
    "TensorRef",
    "check_compatible",
    "classify",
    "group_layers",
    "open_checkpoint",
    "parse_header",
    "plan_shards",
    "read_header",
    "read_tensor",
    "read_tensors",
    "save_checkpoint",
    "serialize_tensors",
    "shard_name",
    "tensor_from_bytes",
]
