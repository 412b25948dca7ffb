"""Scheduled batch merging: fold newly registered experts into a new Mediator version.

One run: read the registry and the latest published version; if some registered experts are
not in it, take the output's lease, merge base + old experts + new experts into
``versions/<latest+1>/`` — incrementally, reusing the previous version's statistics and
dense layers where the method allows — then move ``LATEST.json`` by compare-and-swap and prune
old versions. A run with nothing new writes nothing. A run that dies leaves the previous
version serving; the next run reuses the same version folder and resumes it from its
``_progress/`` records.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.console import Console

from mediator_ray.config import parse_config
from mediator_ray.pipeline import MANIFEST, run_merge
from mediator_ray.pipeline.driver import PreviousVersion
from mediator_ray.registry.records import RegistryError
from mediator_ray.registry.registry import Registry
from mediator_ray.registry.versions import Lease, Pointer, VersionedOutput, version_path
from mediator_ray.storage import StorageOptions, open_store

Status = Literal["nothing-new", "busy", "published", "superseded"]


@dataclass
class MergeNewResult:
    status: Status
    version: int | None = None
    experts: list[str] = field(default_factory=list)
    new_experts: list[str] = field(default_factory=list)
    bytes_fetched: int = 0
    full_merge_bytes: int = 0
    incremental: bool = False
    pruned: list[int] = field(default_factory=list)


def merge_new_experts(
    registry_uri: str,
    output_uri: str,
    template: dict[str, Any] | None = None,
    *,
    retain: int = 3,
    lease_ttl_s: float = 120.0,
    storage: StorageOptions | None = None,
    console: Console | None = None,
    show_progress: bool = False,
) -> MergeNewResult:
    """See the module docstring. ``template``: merge-config keys other than base, experts,
    method and output (options, dtype, compute, storage, router)."""
    if retain < 1:
        raise RegistryError(f"retain must be at least 1, got {retain}")
    registry = Registry(registry_uri, storage)
    info = registry.info()
    if info is None:
        raise RegistryError(f"{registry_uri} is not a registry (no registry.json): add an expert")
    root = open_store(output_uri, storage)
    versions = VersionedOutput(root)

    pointer, _ = versions.latest()
    if not _new_records(registry, pointer):
        return MergeNewResult(
            "nothing-new", pointer.version if pointer else None, pointer.experts if pointer else []
        )

    lease = Lease(root, lease_ttl_s)
    if not lease.acquire():
        return MergeNewResult("busy", pointer.version if pointer else None)
    try:
        pointer, tag = versions.latest()  # again, now that no one else can publish
        new_records = _new_records(registry, pointer)
        if not new_records:
            return MergeNewResult("nothing-new", pointer.version if pointer else None)
        previous = _previous(root, pointer)
        old = previous.manifest["experts"] if previous else []
        experts = [
            {"name": e["name"], "uri": e["uri"], "calibration": e.get("calibration")} for e in old
        ] + [{"name": r.name, "uri": r.uri, "calibration": r.calibration} for r in new_records]
        number = (pointer.version if pointer else 0) + 1
        config = parse_config(
            {
                **(template or {}),
                "base": info.base_uri,
                "experts": experts,
                "method": "mediator",
                "output": f"{root.uri}/{version_path(number)}",
            },
            source=f"merge-new of {registry_uri}",
        )
        outcome = run_merge(config, previous=previous, console=console, show_progress=show_progress)
        names = [e["name"] for e in experts]
        published = versions.publish(Pointer(number, version_path(number), names, time.time()), tag)
        stats = outcome.manifest["stats"]
        result = MergeNewResult(
            "published" if published else "superseded",
            number,
            names,
            [r.name for r in new_records],
            stats["bytes_fetched"],
            stats["input_bytes"],
            stats["incremental_from"] is not None,
        )
        if published:
            result.pruned = versions.prune(retain, protect=number)
        return result
    finally:
        lease.release()


def _new_records(registry: Registry, pointer: Pointer | None) -> list:
    known = set(pointer.experts) if pointer else set()
    return [r for r in registry.list() if r.name not in known]


def _previous(root: Any, pointer: Pointer | None) -> PreviousVersion | None:
    if pointer is None:
        return None
    uri = f"{root.uri}/{pointer.path}"
    manifest = json.loads(open_store(uri, root.options).read_text(MANIFEST))
    return PreviousVersion(uri, manifest)
