"""The layer plan (METHOD.md §2): average low-conflict layers, route high-conflict ones.

A pure, deterministic function of the layers' scores so the plan can be recomputed from the
manifest and checked. Equal scores are broken by layer order (earlier layer first).

Rules (exactly one is active):

- ``route_fraction`` r: route the ⌈r·L⌉ highest-scoring of the L candidate layers.
- ``threshold_alpha`` α: route candidates with score > μ + α·σ, where μ and σ (population
  standard deviation) are taken over the transformer *blocks'* scores.
- ``memory_budget_bytes`` B: route the k highest-scoring candidates for the largest k such that
  the checkpoint (all layers' dense bytes + the routed layers' extra bytes) is ≤ B. The routed set
  is a prefix of the ranking: a layer is never skipped in favour of a lower-scoring, smaller one.

Candidates are the blocks, plus the non-block groups (embeddings, final norm, lm_head, other)
when ``route_embeddings`` is true.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mediator_ray.merge.options import ConflictMetric

LayerKind = Literal["embedding", "block", "norm", "lm_head", "other"]
LayerAction = Literal["average", "route"]

_RULE_FIELDS = ("route_fraction", "threshold_alpha", "memory_budget_bytes")


class PlanOptions(BaseModel):
    """How to choose routed layers. Giving ``threshold_alpha`` or ``memory_budget_bytes``
    switches off the default ``route_fraction``; giving two rules explicitly is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: ConflictMetric = "deviation"
    route_fraction: float | None = Field(0.25, ge=0.0, le=1.0)
    threshold_alpha: float | None = None
    memory_budget_bytes: int | None = Field(None, ge=0)
    route_embeddings: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_rule_yields(cls, data: Any) -> Any:
        """The default route_fraction applies only when no other rule was asked for."""
        if isinstance(data, dict) and "route_fraction" not in data:
            others = [f for f in _RULE_FIELDS[1:] if data.get(f) is not None]
            if others:
                data = {**data, "route_fraction": None}
        return data

    @model_validator(mode="after")
    def _exactly_one_rule(self) -> PlanOptions:
        active = [f for f in _RULE_FIELDS if getattr(self, f) is not None]
        if len(active) != 1:
            given = ", ".join(f"{f}={getattr(self, f)!r}" for f in active) or "none"
            raise ValueError(
                f"set exactly one of route_fraction, threshold_alpha, memory_budget_bytes; "
                f"got {given}"
            )
        if self.threshold_alpha is not None and not math.isfinite(self.threshold_alpha):
            raise ValueError("threshold_alpha must be finite")
        return self

    @property
    def rule_name(self) -> str:
        """Which of the three rules is active."""
        return next(f for f in _RULE_FIELDS if getattr(self, f) is not None)


@dataclass(frozen=True)
class LayerInfo:
    """What the planner needs to know about one layer.

    ``nbytes`` is the layer's dense size in the output checkpoint; ``routed_extra_bytes`` is what
    routing it adds (its N sparse experts; the caller computes it from density, N and dtype,
    e.g. with ``sparse_sizes.estimate_encoded_nbytes``). Both matter only to the memory-budget rule.
    """

    name: str
    kind: LayerKind
    score: float
    nbytes: int = 0
    routed_extra_bytes: int = 0


@dataclass(frozen=True)
class LayerDecision:
    """The plan's verdict on one layer."""

    name: str
    kind: LayerKind
    score: float
    action: LayerAction
    candidate: bool


@dataclass(frozen=True)
class LayerPlan:
    """Per-layer actions, in layer order, and the rule that produced them (for the manifest)."""

    metric: ConflictMetric
    rule: str
    decisions: tuple[LayerDecision, ...]

    @property
    def routed(self) -> list[str]:
        """Names of the routed layers, in layer order."""
        return [d.name for d in self.decisions if d.action == "route"]

    def action(self, name: str) -> LayerAction:
        """The action for the named layer."""
        for decision in self.decisions:
            if decision.name == name:
                return decision.action
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form for the manifest."""
        return {
            "metric": self.metric,
            "rule": self.rule,
            "layers": [asdict(d) for d in self.decisions],
        }


def make_plan(layers: Sequence[LayerInfo], options: PlanOptions) -> LayerPlan:
    """Decide average/route for every layer; see the module docstring for the rules."""
    _validate_layers(layers)
    candidates = [
        i for i, layer in enumerate(layers) if layer.kind == "block" or options.route_embeddings
    ]
    ranking = sorted(candidates, key=lambda i: (-layers[i].score, i))
    noun = "layers" if options.route_embeddings else "blocks"
    metric = options.metric

    if options.route_fraction is not None:
        r = options.route_fraction
        # round() absorbs float error such as 0.1 * 30 = 3.0000000000000004.
        k = math.ceil(round(r * len(ranking), 9))
        routed = set(ranking[:k])
        rule = (
            f"route the ceil({r:g}*{len(ranking)})={k} highest-{metric} {noun} "
            f"of {len(ranking)} candidate {noun}"
        )
    elif options.threshold_alpha is not None:
        alpha = options.threshold_alpha
        block_scores = [layer.score for layer in layers if layer.kind == "block"]
        mu = statistics.fmean(block_scores) if block_scores else 0.0
        sigma = statistics.pstdev(block_scores) if block_scores else 0.0
        threshold = mu + alpha * sigma
        routed = {i for i in candidates if layers[i].score > threshold}
        rule = (
            f"route {noun} with {metric} > mu + alpha*sigma = {mu:.6g} + {alpha:g}*{sigma:.6g} "
            f"= {threshold:.6g} (mu, sigma over {len(block_scores)} blocks): {len(routed)} routed"
        )
    else:
        budget = options.memory_budget_bytes
        assert budget is not None
        dense = sum(layer.nbytes for layer in layers)
        if dense > budget:
            raise ValueError(
                f"memory_budget_bytes={budget} is smaller than the dense checkpoint alone "
                f"({dense} bytes); nothing can be routed and even the average does not fit"
            )
        total = dense
        routed = set()
        for i in ranking:
            if total + layers[i].routed_extra_bytes > budget:
                break
            total += layers[i].routed_extra_bytes
            routed.add(i)
        rule = (
            f"route the {len(routed)} highest-{metric} {noun} whose checkpoint fits "
            f"memory_budget_bytes={budget}: dense {dense} + routed {total - dense} = {total} bytes"
        )

    candidate_set = set(candidates)
    return LayerPlan(
        metric=metric,
        rule=rule,
        decisions=tuple(
            LayerDecision(
                name=layer.name,
                kind=layer.kind,
                score=layer.score,
                action="route" if i in routed else "average",
                candidate=i in candidate_set,
            )
            for i, layer in enumerate(layers)
        ),
    )


def _validate_layers(layers: Sequence[LayerInfo]) -> None:
    seen: set[str] = set()
    kinds = set(get_args(LayerKind))
    for layer in layers:
        if layer.kind not in kinds:
            raise ValueError(f"layer {layer.name!r} has kind {layer.kind!r}; expected {kinds}")
        if layer.name in seen:
            raise ValueError(f"layer {layer.name!r} appears twice")
        seen.add(layer.name)
        if not math.isfinite(layer.score):
            raise ValueError(f"layer {layer.name!r} has a non-finite score {layer.score}")
        if layer.nbytes < 0 or layer.routed_extra_bytes < 0:
            raise ValueError(f"layer {layer.name!r} has negative byte counts")
