"""The router options of a merge config, kept free of torch (see ``lazy_exports``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RouterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    heldout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    top1_fraction: float = Field(0.95, gt=0.0, le=1.0)
    ood_fraction: float = Field(0.995, gt=0.0, le=1.0)
    top_k: int = Field(2, ge=1)
    resolution: float = Field(0.05, ge=0.0, lt=1.0)
    hidden: int = Field(0, ge=0, description="0: linear classifier")
    outlier_exposure: bool = True
    feature_layer: int | None = None
    max_length: int = 256
    seed: int = 0
