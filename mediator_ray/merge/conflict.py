"""Layer-wise conflict between experts' task vectors (METHOD.md §1).

A layer's task vectors τ_i = θ_i − θ0 are never materialised whole: tensors are visited one at a
time and each in chunks of at most ``chunk_elements`` entries, so peak memory is
O(N · chunk) beyond the inputs. Differences are taken in float32 (as METHOD.md asks); every
reduction accumulates in float64 so that a billion-entry layer does not lose the small
numbers that decide the plan.

Conventions for degenerate layers, chosen so that "no change" never looks like conflict:

- all task vectors zero (Σ‖τ_i‖² = 0): every metric is 0;
- N = 1: every metric is 0 (nothing to disagree with);
- cosine of a zero τ_i with a non-zero τ_j is 0 (a zero vector is orthogonal to everything,
  which matches ``deviation`` treating it as maximally informative-loss), of two zero vectors 1;
- ``sign`` elects s_p = +1 where Σ_i τ_i,p = 0, exactly as TIES/mergekit do, so two exactly
  opposed experts score 0.5 (half the mass disagrees), not 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import torch

from mediator_ray.errors import IncompatibleCheckpointError
from mediator_ray.merge.conflict_stats import LayerConflict, deviation_from_stats
from mediator_ray.merge.dtypes import COMPUTE_DTYPE

DEFAULT_CHUNK_ELEMENTS = 1 << 20


def layer_conflict(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> LayerConflict:
    """All three conflict metrics and per-expert ‖τ_i‖ of one layer, tensor by tensor."""
    n = len(experts)
    if n == 0:
        raise ValueError("layer_conflict needs at least one expert")
    _check_layer(base, experts)
    device = _first_device(base)
    sq_norms = torch.zeros(n, dtype=torch.float64, device=device)
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    deviation_num = torch.zeros((), dtype=torch.float64, device=device)
    norm_sq_of_sum = torch.zeros((), dtype=torch.float64, device=device)
    sign_num = torch.zeros((), dtype=torch.float64, device=device)
    sign_den = torch.zeros((), dtype=torch.float64, device=device)
    numel = 0
    for taus in _task_vector_chunks(base, experts, chunk_elements):
        numel += taus.shape[1]
        t = taus.to(torch.float64)
        total = t.sum(dim=0)
        sq_norms += (t * t).sum(dim=1)
        gram += t @ t.T
        deviation_num += ((t - total / n) ** 2).sum()
        norm_sq_of_sum += (total * total).sum()
        elected = torch.where(total >= 0, 1.0, -1.0).to(torch.float64)
        magnitude = t.abs()
        sign_num += (magnitude * (t.sign() != elected)).sum()
        sign_den += magnitude.sum()

    sum_sq = float(sq_norms.sum())
    degenerate = sum_sq == 0.0 or n == 1  # all τ_i zero, or nobody to disagree with
    return LayerConflict(
        n_experts=n,
        numel=numel,
        deviation=0.0 if degenerate else float(deviation_num) / sum_sq,
        sign=0.0 if degenerate else float(sign_num) / float(sign_den),
        cosine=0.0 if degenerate else 1.0 - _mean_pairwise_cosine(gram.cpu()),
        tau_norms=[math.sqrt(v) for v in sq_norms.tolist()],
        sum_sq_norms=sum_sq,
        norm_sq_of_sum=float(norm_sq_of_sum),
    )


def extend_conflict(
    conflict: LayerConflict,
    base: Mapping[str, torch.Tensor],
    mean_expert: Mapping[str, torch.Tensor],
    new_experts: Sequence[Mapping[str, torch.Tensor]],
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> LayerConflict:
    """Rescore ``deviation`` after adding experts, reading only θ0, θ̄ and the new experts.

    ``mean_expert`` is θ̄ = mean of the experts ``conflict`` was computed on (the plain-average
    layer, or a routed layer's dense expert D), so Σ_old τ = N·(θ̄ − θ0). If θ̄ was stored in a
    low-precision dtype the rescore carries its rounding. ``sign`` and ``cosine`` become NaN.
    """
    if not new_experts:
        return conflict
    _check_layer(base, [mean_expert, *new_experts])
    n_old = conflict.n_experts
    device = _first_device(base)
    new_sq = torch.zeros(len(new_experts), dtype=torch.float64, device=device)
    cross = torch.zeros((), dtype=torch.float64, device=device)
    new_sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    for taus in _task_vector_chunks(base, [mean_expert, *new_experts], chunk_elements):
        t = taus.to(torch.float64)
        old_sum = t[0] * n_old
        new_sum = t[1:].sum(dim=0)
        new_sq += (t[1:] * t[1:]).sum(dim=1)
        cross += (old_sum * new_sum).sum()
        new_sum_sq += (new_sum * new_sum).sum()
    sum_sq = conflict.sum_sq_norms + float(new_sq.sum())
    norm_sq_of_sum = conflict.norm_sq_of_sum + 2 * float(cross) + float(new_sum_sq)
    n = n_old + len(new_experts)
    return replace(
        conflict,
        n_experts=n,
        deviation=deviation_from_stats(sum_sq, norm_sq_of_sum, n),
        sign=math.nan,
        cosine=math.nan,
        tau_norms=[*conflict.tau_norms, *(math.sqrt(v) for v in new_sq.tolist())],
        sum_sq_norms=sum_sq,
        norm_sq_of_sum=norm_sq_of_sum,
    )


def _mean_pairwise_cosine(gram: torch.Tensor) -> float:
    norms = gram.diagonal().clamp_min(0).sqrt().tolist()
    n = len(norms)
    total = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            if norms[i] == 0 and norms[j] == 0:
                cosine = 1.0
            elif norms[i] == 0 or norms[j] == 0:
                cosine = 0.0
            else:
                cosine = min(1.0, max(-1.0, float(gram[i, j]) / (norms[i] * norms[j])))
            total += cosine
    return total / (n * (n - 1) / 2)


def _task_vector_chunks(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    chunk_elements: int,
) -> Iterator[torch.Tensor]:
    """Yield (N, ≤chunk) float32 blocks of τ_i, tensor by tensor, in the base's order."""
    if chunk_elements <= 0:
        raise ValueError("chunk_elements must be positive")
    for name, base_tensor in base.items():
        if not base_tensor.is_floating_point():
            continue
        flat_base = base_tensor.reshape(-1)
        flat_experts = [e[name].reshape(-1) for e in experts]
        for start in range(0, flat_base.numel(), chunk_elements):
            stop = start + chunk_elements
            b = flat_base[start:stop].to(COMPUTE_DTYPE)
            yield torch.stack(
                [e[start:stop].to(device=b.device, dtype=COMPUTE_DTYPE) - b for e in flat_experts]
            )


def _check_layer(
    base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]]
) -> None:
    for index, expert in enumerate(experts):
        if set(expert) != set(base):
            missing = sorted(set(base) - set(expert))
            extra = sorted(set(expert) - set(base))
            raise IncompatibleCheckpointError(
                f"expert {index} layer tensors differ from the base: "
                f"missing {missing}, unexpected {extra}"
            )
        for name, tensor in base.items():
            if expert[name].shape != tensor.shape:
                raise IncompatibleCheckpointError(
                    f"{name}: expert {index} has shape {tuple(expert[name].shape)}, "
                    f"base has {tuple(tensor.shape)}"
                )


def _first_device(layer: Mapping[str, torch.Tensor]) -> torch.device:
    return next(iter(layer.values())).device if layer else torch.device("cpu")
