"""The merge options that a config names, kept free of torch.

The driver validates a config (and a CLI reports a bad one) without importing torch, whose
import costs ~1.2 s and ~110 MB; :mod:`mediator_ray.merge.methods` and
:mod:`mediator_ray.merge.conflict` implement what these options select.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from mediator_ray.errors import ConfigError

ConflictMetric = Literal["deviation", "sign", "cosine"]
MethodName = Literal["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"]
METHOD_NAMES: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


@dataclass(frozen=True)
class TaskArithmeticSpec:
    """One row of mergekit's registry for a generalized task arithmetic method."""

    consensus: bool
    sparsification: Literal["magnitude", "random"] | None
    default_normalize: bool
    default_rescale: bool


_TASK_ARITHMETIC: dict[str, TaskArithmeticSpec] = {
    "task_arithmetic": TaskArithmeticSpec(False, None, False, False),
    "ties": TaskArithmeticSpec(True, "magnitude", True, False),
    "dare_ties": TaskArithmeticSpec(True, "random", False, True),
    "dare_linear": TaskArithmeticSpec(False, "random", False, True),
}


class MethodOptions(BaseModel):
    """Options of the baseline methods, named as in mergekit where mergekit has the option.

    ``density`` and ``drop_rate`` reconcile our config with mergekit's single ``density``:
    ``density`` is what TIES keeps (mergekit ``ties`` ``density``, default 0.2 here, mergekit's
    own default 1.0 means "keep all"); ``drop_rate`` is what DARE drops, so mergekit
    ``dare_*`` ``density`` = 1 − ``drop_rate`` (default 0.9 → 0.1). Each method reads only its
    own field. Either may be one value for all experts or one per expert, like mergekit's
    per-model parameters. ``normalize``/``rescale`` left as None take mergekit's default for the
    method.
    """

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    weights: list[float] | None = None
    lambda_: float = Field(1.0, alias="lambda")
    density: Fraction | list[Fraction] = 0.2
    drop_rate: Fraction | list[Fraction] = 0.9
    normalize: bool | None = None
    rescale: bool | None = None
    int8_mask: bool = False
    base_weight: float | None = None
    seed: int = 0

    def expert_weights(self, n: int) -> list[float]:
        """w_i for n experts (all 1 when ``weights`` is unset)."""
        if self.weights is None:
            return [1.0] * n
        if len(self.weights) != n:
            raise ConfigError(f"weights: {len(self.weights)} values given for {n} experts")
        return list(self.weights)

    def keep_densities(self, method: str, n: int) -> list[float]:
        """mergekit's ``density`` (fraction of delta entries kept) per expert for ``method``."""
        spec = task_arithmetic_spec(method)
        if spec.sparsification == "magnitude":
            return _per_expert(self.density, n, "density")
        if spec.sparsification == "random":
            # Rounded so drop_rate 0.9 gives exactly mergekit's density 0.1 (1 - 0.9 does not).
            return [round(1.0 - p, 12) for p in _per_expert(self.drop_rate, n, "drop_rate")]
        return [1.0] * n

    def resolved_normalize(self, method: str) -> bool:
        """``normalize``, or mergekit's default for ``method``."""
        if self.normalize is not None:
            return self.normalize
        return task_arithmetic_spec(method).default_normalize

    def resolved_rescale(self, method: str) -> bool:
        """``rescale``, or mergekit's default for ``method`` (true for DARE only)."""
        if self.rescale is not None:
            return self.rescale
        return task_arithmetic_spec(method).default_rescale


def _per_expert(value: float | list[float], n: int, field: str) -> list[float]:
    if isinstance(value, list):
        if len(value) != n:
            raise ConfigError(f"{field}: {len(value)} values given for {n} experts")
        return list(value)
    return [value] * n


def check_method(method: str) -> None:
    if method not in METHOD_NAMES:
        raise ConfigError(
            f"method: unknown merge method {method!r}; expected one of {list(METHOD_NAMES)}"
        )


# linear is not task arithmetic, but answers the same questions: no sparsification, normalize.
_LINEAR_DEFAULTS = TaskArithmeticSpec(False, None, True, False)


def task_arithmetic_spec(method: str) -> TaskArithmeticSpec:
    """mergekit's registry row for ``method`` (linear's defaults for linear)."""
    check_method(method)
    return _LINEAR_DEFAULTS if method == "linear" else _TASK_ARITHMETIC[method]
