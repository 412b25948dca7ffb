"""Expert registry: experts announced on object storage, validated against one base model.

The scheduled batch merge reads it; ``mediator-ray registry add|list|remove`` writes it.
Names are resolved lazily (PEP 562) so that mounting the CLI sub-app does not import torch
(through the checkpoint and config modules) and ``mediator-ray --help`` stays instant.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mediator_ray.registry.fingerprint import base_fingerprint, fingerprint_payload
    from mediator_ray.registry.records import (
        RECORD_FILE,
        REGISTRY_FILE,
        ExpertRecord,
        RegistryError,
        RegistryInfo,
    )
    from mediator_ray.registry.registry import Registry, normalize_uri, validate_name

_EXPORTS = {
    "base_fingerprint": "fingerprint",
    "fingerprint_payload": "fingerprint",
    "RECORD_FILE": "records",
    "REGISTRY_FILE": "records",
    "ExpertRecord": "records",
    "RegistryError": "records",
    "RegistryInfo": "records",
    "Registry": "registry",
    "normalize_uri": "registry",
    "validate_name": "registry",
}

__all__ = [
    "RECORD_FILE",
    "REGISTRY_FILE",
    "ExpertRecord",
    "Registry",
    "RegistryError",
    "RegistryInfo",
    "base_fingerprint",
    "fingerprint_payload",
    "normalize_uri",
    "validate_name",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
