"""The merge config (``merge.yaml``): pydantic models, loading from a path or S3, clear errors.

The shape is a contract users and docs rely on::

    base: s3://models/base
    experts:
      - {name: math, uri: s3://models/math, calibration: s3://data/math.jsonl}
    method: mediator            # or linear | task_arithmetic | ties | dare_ties | dare_linear
    options: {conflict: {metric: deviation}, plan: {route_fraction: 0.25}, sparse: {density: 0.1}}
    output: s3://models/mediator-out
    dtype: bfloat16

Every validation failure becomes a :class:`ConfigError` whose lines start with the dotted
path of the offending key (``experts.1.uri: Field required``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mediator_ray.errors import ConfigError, StorageError
from mediator_ray.merge.options import ConflictMetric, MethodName, MethodOptions
from mediator_ray.merge.plan import PlanOptions
from mediator_ray.router.options import RouterOptions
from mediator_ray.storage import StorageOptions, open_store

MERGE_METHODS: tuple[str, ...] = (
    "mediator",
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
)
OutputDtype = Literal["bfloat16", "float16", "float32"]
#: Bytes per element of each output dtype (the driver sizes the plan without torch).
OUTPUT_ITEMSIZE: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
_EXPERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertSpec(_Strict):
    """One fine-tuned expert: a name (used in paths and routing), its checkpoint, its prompts."""

    name: str
    uri: str
    calibration: str | None = Field(None, description="JSONL of {'prompt': ...} lines")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not _EXPERT_NAME.match(name) or name in {".", ".."}:
            raise ValueError(
                f"{name!r} is not a valid expert name (letters, digits, '_', '.', '-'; "
                "at most 64 characters; it becomes a folder name)"
            )
        return name


class ConflictOptions(_Strict):
    metric: ConflictMetric = "deviation"


class SparseOptions(_Strict):
    density: float = Field(0.1, gt=0.0, le=1.0, description="fraction of entries kept per tensor")


class AveragingOptions(_Strict):
    """How a Mediator checkpoint merges its low-conflict layers (METHOD.md §3)."""

    method: MethodName = "linear"


class MergeOptions(MethodOptions):
    """``options:`` — the Mediator sections plus the baseline methods' parameters."""

    conflict: ConflictOptions = ConflictOptions()
    plan: PlanOptions = PlanOptions()
    sparse: SparseOptions = SparseOptions()
    merge: AveragingOptions = AveragingOptions()

    @model_validator(mode="after")
    def _one_metric(self) -> MergeOptions:
        """``conflict.metric`` decides the plan; ``plan.metric`` may only repeat it."""
        if "metric" in self.plan.model_fields_set and self.plan.metric != self.conflict.metric:
            raise ValueError(
                f"plan.metric ({self.plan.metric}) differs from conflict.metric "
                f"({self.conflict.metric}); set the metric once, under conflict"
            )
        object.__setattr__(
            self, "plan", self.plan.model_copy(update={"metric": self.conflict.metric})
        )
        return self

    def method_options(self) -> MethodOptions:
        """The baseline-method fields alone, as the merge math takes them."""
        return MethodOptions(
            **self.model_dump(include=set(MethodOptions.model_fields), by_alias=True)
        )


class ComputeOptions(_Strict):
    """Where and how wide the Ray tasks run."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus_per_task: float = Field(0.0, ge=0.0, description="Ray num_gpus of each layer task")
    cpus_per_task: float = Field(1.0, gt=0.0)
    tasks_in_flight: int = Field(4, ge=1, le=1024, description="backpressure bound")
    memory_per_task: int | None = Field(None, gt=0, description="Ray memory (bytes) per task")
    max_retries: int = Field(3, ge=0, le=20, description="retries of a failed layer task")
    cache_inputs: bool = Field(
        True,
        description="keep each layer's fetched inputs in Ray's object store between the "
        "conflict and build passes, so every input byte is fetched once",
    )


class MergeConfig(_Strict):
    """A whole merge job."""

    base: str
    experts: list[ExpertSpec] = Field(min_length=1)
    method: Literal["mediator", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"] = (
        "mediator"
    )
    options: MergeOptions = MergeOptions()
    output: str
    dtype: OutputDtype = "bfloat16"
    storage: StorageOptions = StorageOptions()
    compute: ComputeOptions = ComputeOptions()
    router: RouterOptions = RouterOptions()

    @property
    def output_itemsize(self) -> int:
        """Bytes per element of the output dtype."""
        return OUTPUT_ITEMSIZE[self.dtype]

    @model_validator(mode="after")
    def _consistent(self) -> MergeConfig:
        names = [e.name for e in self.experts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"experts: duplicate names {duplicates}")
        if self.method == "mediator" and len(self.experts) < 2:
            raise ValueError("experts: mediator needs at least 2 experts")
        uris = {self.base.rstrip("/"): "base"} | {e.uri.rstrip("/"): e.name for e in self.experts}
        if self.output.rstrip("/") in uris:
            raise ValueError(
                f"output: {self.output} is also the input {uris[self.output.rstrip('/')]!r}"
            )
        with_prompts = [e.name for e in self.experts if e.calibration]
        if with_prompts and len(with_prompts) != len(self.experts):
            without = [e.name for e in self.experts if not e.calibration]
            raise ValueError(
                f"experts: calibration given for {with_prompts} but not for {without}; "
                "the router needs prompts for every expert (or none)"
            )
        weights = self.options.weights
        if weights is not None and len(weights) != len(self.experts):
            raise ValueError(
                f"options.weights: {len(weights)} values for {len(self.experts)} experts"
            )
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def calibration(self) -> dict[str, str]:
        """Expert name → calibration prompts URI (empty when the router is not fitted)."""
        return {e.name: e.calibration for e in self.experts if e.calibration}


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid merge config {source}:"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<dict>") -> MergeConfig:
    """Validate a loaded mapping; :class:`ConfigError` names every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid merge config {source}: expected a mapping at the top level")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(uri: str, storage: StorageOptions | None = None) -> MergeConfig:
    """Read and validate a YAML config from a local path, ``file://`` or ``s3://`` URI."""
    parent, _, key = uri.rstrip("/").rpartition("/")
    try:
        text = open_store(parent or ".", storage).read_text(key)
    except StorageError as e:
        raise ConfigError(f"cannot read merge config {uri}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"merge config {uri} is not valid YAML: {e}") from None
    return parse_config(data, uri)
