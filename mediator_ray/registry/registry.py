"""The expert registry: experts announced on object storage for the next scheduled merge.

A registry is a prefix on a store (see :mod:`mediator_ray.registry.records` for the layout).
Teams ``add`` fine-tuned experts as they finish; a scheduled job lists them and merges the new
ones. Because that job runs unattended, every check happens at ``add`` time, where a person
is watching: the name is a valid folder name, the name is free, the checkpoint is readable
and matches the registry's base. If any check fails nothing is written, so a registry only
ever holds experts that the merge will accept.

``<name>/expert.json`` is the one object that announces an expert, written with the store's
create-if-absent PUT: of two clients adding the same name at the same moment exactly one
wins, the other gets the duplicate-name error. ``registry.json`` is created the same way, so
two first ``add``s naming different bases cannot both fix the registry's base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import ValidationError

from mediator_ray.checkpoint import CheckpointCatalog, check_compatible, open_checkpoint
from mediator_ray.config import ExpertSpec
from mediator_ray.errors import (
    CheckpointFormatError,
    IncompatibleCheckpointError,
    ObjectNotFoundError,
    StorageError,
)
from mediator_ray.registry.fingerprint import base_fingerprint
from mediator_ray.registry.records import (
    RECORD_FILE,
    REGISTRY_FILE,
    ExpertRecord,
    RegistryError,
    RegistryInfo,
)
from mediator_ray.storage import ObjectStore, StorageOptions, open_store

_RECORD_KEY = re.compile(rf"^([^/]+)/{re.escape(RECORD_FILE)}$")


def normalize_uri(uri: str) -> str:
    """Local paths become absolute: records are read later, from another working directory."""
    if "://" in uri:
        return uri.rstrip("/")
    return str(Path(uri).expanduser().absolute())


def validate_name(name: str) -> str:
    """The merge config's expert-name rule (the name becomes a folder in both places)."""
    try:
        ExpertSpec(name=name, uri="-")
    except ValidationError as e:
        message = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise RegistryError(message) from None
    return name


class Registry:
    """One registry prefix: ``add``, ``list``, ``get``, ``remove`` experts of one base."""

    def __init__(self, uri: str, storage_options: StorageOptions | None = None):
        self.uri = normalize_uri(uri)
        self.storage_options = storage_options
        self.store: ObjectStore = open_store(self.uri, storage_options)

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # ---- the base ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls, uri: str, base_uri: str, storage_options: StorageOptions | None = None
    ) -> Registry:
        """Fix the registry's base up front; idempotent for the same base, an error otherwise."""
        registry = cls(uri, storage_options)
        base_uri = normalize_uri(base_uri)
        fingerprint = base_fingerprint(registry._open(base_uri, "base", None))
        info = registry.info() or registry._create_info(base_uri, fingerprint)
        if info.base_fingerprint != fingerprint:
            raise RegistryError(registry._other_base_message(base_uri, fingerprint, info))
        return registry

    def info(self) -> RegistryInfo | None:
        """``registry.json``, or None for a registry that has no expert yet."""
        try:
            text = self.store.read_text(REGISTRY_FILE)
        except ObjectNotFoundError:
            return None
        try:
            return RegistryInfo.model_validate_json(text)
        except ValidationError as e:
            raise RegistryError(f"{self.store.url(REGISTRY_FILE)} is not valid: {e}") from None

    def _create_info(self, base_uri: str, fingerprint: str) -> RegistryInfo:
        """Fix the base unless another client just did; returns whichever base is recorded."""
        info = RegistryInfo(base_uri=base_uri, base_fingerprint=fingerprint)
        data = (info.model_dump_json(indent=2) + "\n").encode("utf-8")
        if self.store.write_if(REGISTRY_FILE, data, None):
            return info
        recorded = self.info()
        if recorded is None:  # created and deleted in between: nothing sane to do but stop
            raise RegistryError(f"{self.store.url(REGISTRY_FILE)} changed while being created")
        return recorded

    def _open(self, uri: str, what: str, expert: str | None) -> CheckpointCatalog:
        try:
            return open_checkpoint(uri, self.storage_options)
        except (CheckpointFormatError, StorageError) as e:
            subject = f"cannot register expert {expert!r}: " if expert else ""
            raise RegistryError(f"{subject}{what} {uri} is not readable: {e}") from e

    def _other_base_message(self, base_uri: str, fingerprint: str, info: RegistryInfo) -> str:
        return (
            f"base {base_uri} (fingerprint {fingerprint[:12]}) is not the base of registry "
            f"{self.uri}: {info.base_uri} (fingerprint {info.base_fingerprint[:12]}); "
            "a registry holds experts of one base model"
        )

    def _resolve_base(
        self, name: str, base_uri: str | None, info: RegistryInfo | None
    ) -> tuple[CheckpointCatalog, str]:
        """The catalog and fingerprint of the base ``name`` is checked against."""
        if base_uri is None:
            if info is None:
                raise RegistryError(
                    f"cannot register expert {name!r}: registry {self.uri} has no base yet; "
                    "pass the base model (--base) with the first expert"
                )
            base_uri = info.base_uri
        base = self._open(normalize_uri(base_uri), "base", name)
        fingerprint = base_fingerprint(base)
        if info is not None and fingerprint != info.base_fingerprint:
            if normalize_uri(base_uri) == info.base_uri:
                raise RegistryError(
                    f"cannot register expert {name!r}: the registry's base {info.base_uri} "
                    f"changed since it was recorded (fingerprint {info.base_fingerprint[:12]}, "
                    f"now {fingerprint[:12]})"
                )
            raise RegistryError(
                f"cannot register expert {name!r}: "
                + self._other_base_message(base.uri, fingerprint, info)
            )
        return base, fingerprint

    # ---- experts ----------------------------------------------------------------------------
    def add(
        self,
        name: str,
        model_uri: str,
        base_uri: str | None = None,
        calibration: str | None = None,
    ) -> ExpertRecord:
        """Validate an expert against the registry's base and announce it.

        ``base_uri`` is required for the first expert (it fixes the registry's base) and
        optional afterwards; when given it must be the same base (by fingerprint). Raises
        :class:`RegistryError` (or :class:`IncompatibleCheckpointError` for a checkpoint that
        does not fit the base) and writes nothing unless every check passes.
        """
        try:
            validate_name(name)
        except RegistryError as e:
            raise RegistryError(f"cannot register expert: {e}") from None
        if self.store.exists(f"{name}/{RECORD_FILE}"):
            existing = self.get(name)
            raise RegistryError(
                f"cannot register expert {name!r}: the name is taken in registry {self.uri} "
                f"(model {existing.uri}, added {existing.created_at:%Y-%m-%d %H:%M:%S} UTC); "
                "remove it first or choose another name"
            )
        info = self.info()
        base, fingerprint = self._resolve_base(name, base_uri, info)
        model_uri = normalize_uri(model_uri)
        expert = self._open(model_uri, "model", name)
        try:
            check_compatible(base, {name: expert})
        except IncompatibleCheckpointError as e:
            error = IncompatibleCheckpointError(f"cannot register: {e}")
            error.problems = getattr(e, "problems", [])  # type: ignore[attr-defined]
            raise error from None
        if calibration is not None:
            calibration = normalize_uri(calibration)
            self._check_exists(name, calibration)

        record = ExpertRecord(
            name=name, uri=model_uri, base_fingerprint=fingerprint, calibration=calibration
        )
        if info is None:
            recorded = self._create_info(base.uri, fingerprint)
            if recorded.base_fingerprint != fingerprint:  # another first add won the race
                raise RegistryError(
                    f"cannot register expert {name!r}: "
                    + self._other_base_message(base.uri, fingerprint, recorded)
                )
        data = (record.model_dump_json(indent=2) + "\n").encode("utf-8")
        if not self.store.write_if(f"{name}/{RECORD_FILE}", data, None):
            raise RegistryError(
                f"cannot register expert {name!r}: the name was taken in registry {self.uri} "
                "while this expert was being checked; remove it first or choose another name"
            )
        return record

    def _check_exists(self, name: str, uri: str) -> None:
        parent, _, key = uri.rpartition("/")
        try:
            open_store(parent or ".", self.storage_options).size(key)
        except StorageError as e:
            raise RegistryError(
                f"cannot register expert {name!r}: calibration data {uri} is not readable: {e}"
            ) from e

    def get(self, name: str) -> ExpertRecord:
        """The record of ``name``; :class:`RegistryError` naming the known experts if absent."""
        validate_name(name)
        key = f"{name}/{RECORD_FILE}"
        try:
            text = self.store.read_text(key)
        except ObjectNotFoundError:
            known = ", ".join(record.name for record in self.list()) or "none"
            raise RegistryError(
                f"no expert {name!r} in registry {self.uri} (registered: {known})"
            ) from None
        return self._parse(key, text)

    def list(self) -> list[ExpertRecord]:
        """Every announced expert, oldest first (ties by name): the order a batch merges them."""
        records = []
        for key in self.store.list():
            match = _RECORD_KEY.match(key)
            if match is None:
                continue
            record = self._parse(key, self.store.read_text(key))
            if record.name != match.group(1):
                raise RegistryError(
                    f"{self.store.url(key)}: record names expert {record.name!r} "
                    f"but lives in folder {match.group(1)!r}"
                )
            records.append(record)
        return sorted(records, key=lambda record: (record.created_at, record.name))

    def remove(self, name: str) -> ExpertRecord:
        """Withdraw ``name`` (its checkpoint is untouched); returns the removed record."""
        record = self.get(name)
        self.store.delete(f"{name}/{RECORD_FILE}")
        return record

    def _parse(self, key: str, text: str) -> ExpertRecord:
        try:
            return ExpertRecord.model_validate(json.loads(text))
        except (ValueError, ValidationError) as e:
            raise RegistryError(f"{self.store.url(key)} is not a valid expert record: {e}") from e
