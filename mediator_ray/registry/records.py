"""What the registry stores: one JSON object per expert and one describing the registry's base.

Layout below the registry prefix (a local folder or ``s3://bucket/prefix``)::

    registry.json            RegistryInfo: the base every expert was validated against
    <name>/expert.json       ExpertRecord: one announced expert

``expert.json`` is the single object that announces an expert: it is written last, in one
atomic PUT, only after every check passed, so a reader never sees a half-registered expert.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from mediator_ray.errors import MediatorError

REGISTRY_FILE = "registry.json"
RECORD_FILE = "expert.json"


class RegistryError(MediatorError):
    """A registry operation was refused: bad name, duplicate, unknown expert, wrong base."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Record(BaseModel):
    # Unknown fields are ignored so an older reader can list a registry a newer writer filled.
    model_config = ConfigDict(extra="ignore", frozen=True)


class RegistryInfo(_Record):
    """``registry.json``: the registry's base, fixed at its first ``add`` (or ``create``)."""

    base_uri: str
    base_fingerprint: str = Field(description="see mediator_ray.registry.fingerprint")
    created_at: datetime = Field(default_factory=utc_now)


class ExpertRecord(_Record):
    """``<name>/expert.json``: an expert announced for the next batch merge."""

    name: str
    uri: str
    base_fingerprint: str = Field(description="fingerprint of the base it was validated against")
    calibration: str | None = Field(None, description="JSONL of {'prompt': ...} lines")
    created_at: datetime = Field(default_factory=utc_now)
