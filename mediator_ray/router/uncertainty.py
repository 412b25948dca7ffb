"""Uncertainty-based expert selection (METHOD.md §6), a pure function of task probabilities.

p = softmax(logits / T); u = H(p) / log N. Confident (u ≤ u_low): the top-1 expert. Unsure
(u_low < u ≤ u_high): the top-k experts weighted by renormalised p. Out of distribution
(u > u_high): every expert weighted by p — close to the averaged model.

Weights are rounded to ``resolution`` and renormalised, so nearby mixtures share one key:
a serving replica can then reuse a materialised mix across requests instead of building a
new one per request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Mode = Literal["top1", "topk", "ood", "dense", "pinned"]


@dataclass(frozen=True)
class Thresholds:
    """The rule's parameters, stored with the router."""

    u_low: float
    u_high: float
    top_k: int = 2
    resolution: float = 0.05


@dataclass(frozen=True)
class Routing:
    """One prompt's routing decision, reported with every response."""

    probabilities: dict[str, float]
    uncertainty: float
    mode: Mode
    weights: dict[str, float]

    @property
    def mix(self) -> str:
        return mix_key(self.weights)


def normalized_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) / log N per row, in [0, 1]; 0 for N = 1."""
    n = p.shape[-1]
    if n <= 1:
        return torch.zeros(p.shape[:-1], dtype=p.dtype)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return (entropy / math.log(n)).clamp(0.0, 1.0)


def mix_key(weights: Mapping[str, float]) -> str:
    """Canonical name of an expert mix: ``math`` or ``code:0.4+math:0.6`` (sorted, rounded)."""
    active = {name: w for name, w in weights.items() if w > 0}
    if not active:
        return "dense"
    if len(active) == 1:
        return next(iter(active))
    return "+".join(f"{name}:{w:.4g}" for name, w in sorted(active.items()))


def parse_mix(key: str, experts: Sequence[str]) -> dict[str, float]:
    """Inverse of :func:`mix_key`; also accepts a bare expert name. Raises ValueError."""
    if key == "dense":
        return {}
    weights: dict[str, float] = {}
    for part in key.split("+"):
        name, _, value = part.partition(":")
        if name not in experts:
            raise ValueError(f"unknown expert {name!r} in mix {key!r} (experts: {list(experts)})")
        try:
            weights[name] = float(value) if value else 1.0
        except ValueError:
            raise ValueError(f"bad weight {value!r} for {name!r} in mix {key!r}") from None
        if not (weights[name] > 0 and math.isfinite(weights[name])):
            raise ValueError(f"weight of {name!r} in mix {key!r} must be positive")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def quantize(weights: dict[str, float], resolution: float) -> dict[str, float]:
    """Round to multiples of ``resolution`` (largest-remainder, so they still sum to 1)."""
    if resolution <= 0:
        return weights
    steps = round(1 / resolution)
    raw = {name: w * steps for name, w in weights.items()}
    units = {name: math.floor(v) for name, v in raw.items()}
    leftover = steps - sum(units.values())
    for name in sorted(raw, key=lambda n: (-(raw[n] - units[n]), n))[:leftover]:
        units[name] += 1
    return {name: u / steps for name, u in units.items() if u > 0}


def select(probabilities: torch.Tensor, experts: Sequence[str], rule: Thresholds) -> list[Routing]:
    """Apply the rule to each row of calibrated probabilities (shape [batch, N])."""
    u = normalized_entropy(probabilities)
    routings = []
    for row, uncertainty in zip(probabilities.tolist(), u.tolist(), strict=True):
        probs = dict(zip(experts, row, strict=True))
        order = sorted(probs, key=lambda name: (-probs[name], name))
        if uncertainty <= rule.u_low:
            mode: Mode = "top1"
            weights = {order[0]: 1.0}
        elif uncertainty <= rule.u_high:
            mode = "topk"
            top = order[: rule.top_k]
            total = sum(probs[n] for n in top)
            weights = quantize({n: probs[n] / total for n in top}, rule.resolution)
        else:
            mode = "ood"
            weights = quantize(dict(probs), rule.resolution)
        routings.append(Routing(probs, float(uncertainty), mode, weights))
    return routings
