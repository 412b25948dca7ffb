"""Hugging Face safetensors checkpoints: header parsing, catalog, tensor reads, sharded writes.

Names load their submodule on first use (:mod:`mediator_ray.lazy_exports`): reading
headers and writing indexes, all a merge driver does, import no torch.
"""

from mediator_ray.lazy_exports import lazy_exports

_EXPORTS = {
    "CONFIG_FILE": "catalog",
    "CORE_CONFIG_FIELDS": "catalog",
    "INDEX_FILE": "catalog",
    "MANIFEST_FILE": "catalog",
    "SINGLE_FILE": "catalog",
    "TOKENIZER_FILES": "catalog",
    "CheckpointCatalog": "catalog",
    "check_compatible": "catalog",
    "open_checkpoint": "catalog",
    "read_manifest": "catalog",
    "LayerGroup": "layers",
    "LayerKind": "layers",
    "classify": "layers",
    "group_layers": "layers",
    "read_tensor": "reader",
    "read_tensors": "reader",
    "tensor_from_bytes": "reader",
    "DTYPE_CODES": "safetensors_format",
    "DTYPES": "safetensors_format",
    "HEADER_PROBE_BYTES": "safetensors_format",
    "MAX_HEADER_BYTES": "safetensors_format",
    "SafetensorsHeader": "safetensors_format",
    "TensorRef": "safetensors_format",
    "header_read_bytes": "safetensors_format",
    "parse_header": "safetensors_format",
    "read_header": "safetensors_format",
    "DEFAULT_MARKER": "writer",
    "DEFAULT_MAX_SHARD_BYTES": "writer",
    "CheckpointWriter": "writer",
    "ShardRecord": "writer",
    "plan_shards": "writer",
    "save_checkpoint": "writer",
    "serialize_tensors": "writer",
    "shard_name": "writer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
