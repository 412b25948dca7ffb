"""A stable identity for a base model, computed from its catalog (headers only, no weights).

The registry must tell "the same base" from "another base" without reading gigabytes: two
checkpoints with the same architecture, core config fields, tensor names/dtypes/shapes and
shard sizes are, for merging purposes, the same base. The hash deliberately ignores where the
checkpoint lives (a copy of the base in another bucket has the same fingerprint) and does not
hash tensor data (that would cost a full read); a re-trained base with identical layout is the
one change it cannot see.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mediator_ray.checkpoint import CORE_CONFIG_FIELDS, CheckpointCatalog

#: Bumped whenever the hashed description changes, so old and new fingerprints never collide.
FINGERPRINT_VERSION = 1


def fingerprint_payload(catalog: CheckpointCatalog) -> dict[str, Any]:
    """The canonical description that :func:`base_fingerprint` hashes (handy for debugging)."""
    return {
        "version": FINGERPRINT_VERSION,
        "architecture": catalog.architecture,
        "model_type": catalog.model_type,
        "config": {key: catalog.config.get(key) for key in CORE_CONFIG_FIELDS},
        "tensors": sorted(
            [name, ref.dtype, list(ref.shape)] for name, ref in catalog.tensors.items()
        ),
        "files": {name: header.file_size for name, header in sorted(catalog.headers.items())},
    }


def base_fingerprint(catalog: CheckpointCatalog) -> str:
    """SHA-256 (hex) of the canonical JSON of :func:`fingerprint_payload`."""
    canonical = json.dumps(
        fingerprint_payload(catalog), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
