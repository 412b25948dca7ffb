"""A layer's conflict scores and the sufficient statistics behind them (no torch).

What the conflict pass returns to the driver, what the plan reads and what the manifest and
the incremental merge keep; computed by :mod:`mediator_ray.merge.conflict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mediator_ray.merge.options import ConflictMetric


@dataclass(frozen=True)
class LayerConflict:
    """Conflict scores of one layer and the statistics they came from.

    ``sum_sq_norms`` (Σ_i ‖τ_i‖²), ``norm_sq_of_sum`` (‖Σ_i τ_i‖²) and ``n_experts`` are the
    sufficient statistics of ``deviation`` = (Σ‖τ_i‖² − ‖Στ_i‖²/N) / Σ‖τ_i‖²; with Σ_i τ_i
    (recoverable from the averaged layer) they let :func:`extend_conflict` rescore the layer
    when experts are added, without reading the old experts again. ``sign`` and ``cosine`` need
    every expert and are NaN after such a rescore.
    """

    n_experts: int
    numel: int
    deviation: float
    sign: float
    cosine: float
    tau_norms: list[float]
    sum_sq_norms: float
    norm_sq_of_sum: float

    def score(self, metric: ConflictMetric) -> float:
        """The named metric's value."""
        if metric not in ("deviation", "sign", "cosine"):
            raise ValueError(f"metric: expected deviation, sign or cosine, got {metric!r}")
        return float(getattr(self, metric))

    def to_dict(self) -> dict[str, object]:
        """Plain-Python form for manifests, Ray return values and Parquet rows."""
        return asdict(self)


def deviation_from_stats(sum_sq_norms: float, norm_sq_of_sum: float, n_experts: int) -> float:
    """(Σ‖τ_i‖² − ‖Στ_i‖²/N) / Σ‖τ_i‖², 0 for an all-zero layer, clamped at 0.

    Subtracting two large numbers loses precision when experts nearly agree, which is why
    :func:`layer_conflict` computes the numerator directly; this form is for rescoring.
    """
    if sum_sq_norms <= 0 or n_experts <= 1:
        return 0.0
    return max(0.0, (sum_sq_norms - norm_sq_of_sum / n_experts) / sum_sq_norms)
