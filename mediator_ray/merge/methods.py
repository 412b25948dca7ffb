"""Baseline merge methods with mergekit 0.1.5's definitions: linear, task arithmetic, TIES, DARE.

The same functions merge the *averaged* layers of a Mediator checkpoint and produce the
standalone baselines, so they must agree with mergekit number for number. What is reproduced
(see ``mergekit/merge_methods/{linear,generalized_task_arithmetic,registry}.py`` and
``mergekit/sparsify.py``):

- ``linear``: Σ w_i θ_i / Σ w_i (``normalize`` default true; without it Σ w_i θ_i). mergekit's
  linear ignores the *role* of ``base_model`` but, when a base model is configured and not listed
  among ``models``, appends it as one more weighted input; here that is ``base_weight`` (None:
  the base is not an input, as in a config without ``base_model``).
- ``task_arithmetic`` / ``ties`` / ``dare_ties`` / ``dare_linear`` (mergekit's generalized task
  arithmetic): δ_i = θ_i − θ0, sparsified per expert (ties: magnitude top-k with
  k = max(1, int(density·numel)); dare: Bernoulli(density) mask), optionally L1-rescaled
  (``rescale``; mergekit rescales DARE so the masked delta keeps the L1 norm of the unmasked
  one, *not* by 1/(1−p)), multiplied by its weight; ties variants elect a sign per parameter with
  the ``sum`` consensus (sign of Σ_i w_i δ_i, ties to +) and keep only agreeing entries; the
  result Σ is divided by Σ w_i (over agreeing experts for ties, by 1 where that is 0; over all
  experts otherwise, by 1 where |Σ w| < 1e-8) when ``normalize``, multiplied by ``lambda``, and
  added to θ0. Per-method defaults as registered by mergekit: normalize true for ties, false for
  task_arithmetic/dare_*; rescale true for dare_*, false otherwise.
- The base model listed among a mergekit config's ``models`` is the base entry, not an expert:
  its weight and density are never read and it contributes no delta. Callers therefore pass the
  experts *without* the base.
- ``int8_mask`` only changes the dtype of the sign mask in mergekit, never the result; it is
  accepted for config compatibility and has no effect.

Differences, all deliberate: computation is always float32 (mergekit computes in the loaded
dtype, so compare against mergekit with ``dtype: float32``); the result is float32 (the caller
casts); DARE masks come from a per-tensor generator seeded from (``seed``, tensor name) instead
of the process-global RNG, so they are reproducible whichever worker computes a tensor and in
which order — mergekit's whole-checkpoint DARE output depends on its execution order and cannot
be reproduced bit for bit, only per tensor; linear with normalize and Σw = 0 raises instead of
writing inf/NaN; magnitude top-k (TIES) resolves entries of *equal* magnitude at the cut by
flat index (the lowest indices are kept, as a stable descending sort would), where mergekit's
``torch.argsort`` is unstable and keeps an unspecified subset of them — so on bf16 inputs,
whose deltas repeat values, the two can differ in those tied entries and nowhere else.

Large tensors are merged in flat chunks of ``CHUNK_ENTRIES`` (the operations are elementwise
once TIES' per-tensor cut is known), so an embedding matrix never has N + 1 float32 copies alive
at once and each chunk's work stays in cache; the chunked result is the whole-tensor result bit
for bit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mediator_ray.errors import ConfigError, IncompatibleCheckpointError
from mediator_ray.merge.dtypes import COMPUTE_DTYPE
from mediator_ray.merge.options import (
    MethodOptions,
    check_method,
    task_arithmetic_spec,
)

# mergekit's sparsify.rescaled_masked_tensor tolerance for "norm is zero".
_RESCALE_EPS = 1e-7
#: Entries per flat chunk of an elementwise merge: 1 MiB of float32 per input, small enough to
#: stay in cache with N experts, large enough that the Python loop costs nothing.
CHUNK_ENTRIES = 1 << 18


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A 63-bit seed for one tensor, stable across processes, machines and Python versions.

    blake2b rather than ``hash()``, which is salted per process.
    """
    digest = hashlib.blake2b(f"{seed}\x00{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, tensor_name: str, device: torch.device) -> torch.Generator:
    """A fresh generator on ``device`` seeded with :func:`tensor_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, tensor_name))
    return generator


def merge_tensor(
    method: str,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    options: MethodOptions,
    *,
    tensor_name: str,
    out_dtype: torch.dtype = COMPUTE_DTYPE,
) -> torch.Tensor:
    """Merge one tensor of the experts (the base excluded) into a tensor of ``out_dtype``.

    Computes in float32 on ``base.device`` whatever ``out_dtype`` is (each chunk is rounded to
    it as it is written). Non-floating tensors (integer buffers) are copied when every input
    agrees, as mergekit does, and are an error otherwise. Inputs are only read, never written.
    """
    check_method(method)
    _check_inputs(base, experts, tensor_name)
    if not base.is_floating_point():
        return _copy_agreed_buffer(base, experts, tensor_name)
    device = base.device
    experts = [e.to(device=device) for e in experts]
    spec = task_arithmetic_spec(method)
    whole_tensor = spec.sparsification == "random" or (
        spec.sparsification == "magnitude" and options.resolved_rescale(method)
    )
    if whole_tensor:
        # DARE's mask is one generator stream over the whole tensor, and rescaling needs the
        # whole tensor's norms: neither splits into chunks.
        result = _merge_chunk(
            method,
            base.to(COMPUTE_DTYPE),
            [e.to(COMPUTE_DTYPE) for e in experts],
            options,
            tensor_name,
        )
        return result.to(out_dtype)
    cuts = (
        _magnitude_cuts(base, experts, options.keep_densities(method, len(experts)))
        if spec.sparsification == "magnitude"
        else None
    )
    out = torch.empty(base.shape, dtype=out_dtype, device=device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_experts = [e.reshape(-1) for e in experts]
    for start, stop in _chunks(flat_base.numel()):
        flat_out[start:stop] = _merge_chunk(
            method,
            flat_base[start:stop].to(COMPUTE_DTYPE),
            [e[start:stop].to(COMPUTE_DTYPE) for e in flat_experts],
            options,
            tensor_name,
            cuts,
            start,
        )
    return out


def merge_layer(
    method: str,
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    options: MethodOptions,
    out_dtype: torch.dtype = COMPUTE_DTYPE,
) -> dict[str, torch.Tensor]:
    """:func:`merge_tensor` for every tensor of a layer, in the base's tensor order."""
    return {
        name: merge_tensor(
            method,
            tensor,
            [e[name] for e in experts],
            options,
            tensor_name=name,
            out_dtype=out_dtype,
        )
        for name, tensor in base.items()
    }


def _chunks(numel: int) -> list[tuple[int, int]]:
    return [(s, min(numel, s + CHUNK_ENTRIES)) for s in range(0, numel, CHUNK_ENTRIES)]


def _merge_chunk(
    method: str,
    base: torch.Tensor,
    experts: list[torch.Tensor],
    options: MethodOptions,
    name: str,
    cuts: Sequence[MagnitudeCut | None] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """The float32 merge of a whole tensor, or of the flat slice starting at ``offset``."""
    if method == "linear":
        return _linear(base, experts, options, name)
    return _task_arithmetic(method, base, experts, options, name, cuts, offset)


def _check_inputs(base: torch.Tensor, experts: Sequence[torch.Tensor], name: str) -> None:
    for index, expert in enumerate(experts):
        if expert.shape != base.shape:
            raise IncompatibleCheckpointError(
                f"{name}: expert {index} has shape {tuple(expert.shape)}, "
                f"base has {tuple(base.shape)}"
            )


def _copy_agreed_buffer(
    base: torch.Tensor, experts: Sequence[torch.Tensor], name: str
) -> torch.Tensor:
    for index, expert in enumerate(experts):
        if expert.dtype != base.dtype or not torch.equal(expert.to(base.device), base):
            raise IncompatibleCheckpointError(
                f"{name}: non-floating tensor differs between base and expert {index}"
            )
    return base.clone()


def _linear(
    base: torch.Tensor, experts: list[torch.Tensor], options: MethodOptions, name: str
) -> torch.Tensor:
    inputs = list(experts)
    weights = options.expert_weights(len(experts))
    if options.base_weight is not None:
        # mergekit appends a configured base_model after the listed models.
        inputs.append(base)
        weights.append(options.base_weight)
    if not inputs:
        raise ConfigError(f"{name}: linear needs at least one expert or a base_weight")
    coefficients = torch.tensor(weights, dtype=COMPUTE_DTYPE, device=base.device)
    result = torch.zeros_like(base)
    for tensor, coefficient in zip(inputs, coefficients.unbind(0), strict=True):
        result.addcmul_(tensor, coefficient)
    if options.resolved_normalize("linear"):
        denominator = coefficients.sum()
        if denominator == 0:
            raise ConfigError(
                f"{name}: linear with normalize needs weights that do not sum to 0 ({weights})"
            )
        result.div_(denominator)
    return result


def _task_arithmetic(
    method: str,
    base: torch.Tensor,
    experts: list[torch.Tensor],
    options: MethodOptions,
    name: str,
    cuts: Sequence[MagnitudeCut | None] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Generalized task arithmetic on float32 tensors; with ``cuts`` (magnitude methods), the
    inputs are the flat slice at ``offset`` and each expert's top-k cut was taken over its
    whole tensor."""
    spec = task_arithmetic_spec(method)
    if not experts:
        return base.clone()
    n = len(experts)
    weights = torch.tensor(options.expert_weights(n), dtype=COMPUTE_DTYPE, device=base.device)
    densities = options.keep_densities(method, n)
    rescale = options.resolved_rescale(method)
    generator = (
        tensor_generator(options.seed, name, base.device)
        if spec.sparsification == "random"
        else None
    )

    def weighted_delta(index: int) -> torch.Tensor:
        delta = experts[index] - base
        if cuts is not None:
            cut = cuts[index]
            if cut is not None:
                delta.mul_(cut.mask(delta.abs(), offset))
        elif spec.sparsification == "magnitude":
            delta = magnitude_sparsify(delta, densities[index], rescale=rescale)
        elif spec.sparsification == "random":
            delta = bernoulli_sparsify(delta, densities[index], generator, rescale=rescale)
        return delta.mul_(weights[index])

    if spec.consensus:
        mixed, divisor = _sign_consensus_sum([weighted_delta(i) for i in range(n)], weights)
        divisor[divisor == 0] = 1
    else:
        mixed = torch.zeros_like(base)
        for index in range(n):
            mixed.add_(weighted_delta(index))
        divisor = weights.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if options.resolved_normalize(method):
        mixed.div_(divisor)
    if options.lambda_ != 1:
        mixed.mul_(options.lambda_)
    return base + mixed


def _sign_consensus_sum(
    deltas: list[torch.Tensor], weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES disjoint sum: keep entries whose sign matches sign(Σ δ) (ties to +).

    Returns (Σ agreeing δ_i, Σ agreeing w_i); mergekit's ``get_mask(method="sum")``
    accumulated expert by expert instead of over a stacked (N, …) mask.
    """
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total.add_(delta)
    majority = (total >= 0).to(total.dtype).mul_(2).sub_(1)
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for delta, weight in zip(deltas, weights.unbind(0), strict=True):
        agree = delta.sign() == majority
        mixed.add_(delta * agree)
        divisor.add_(agree.to(total.dtype) * weight)
    return mixed, divisor


@dataclass(frozen=True)
class MagnitudeCut:
    """Which entries magnitude top-k keeps, as a rule that any flat slice can apply alone.

    Kept: every entry with |x| > ``threshold``, and of those with |x| == ``threshold`` the ones
    at flat index ≤ ``last_tie`` — ties at the cut go to the lowest indices, as in a stable
    descending sort. A partial selection (O(n)) finds the threshold; a full argsort (mergekit's
    way, O(n log n) plus an int64 index per entry) is 5-10× slower on an embedding matrix.
    """

    threshold: float
    last_tie: int

    @classmethod
    def of(cls, magnitudes: torch.Tensor, density: float) -> MagnitudeCut | None:
        """The cut keeping max(1, int(density·n)) of the flat ``magnitudes`` (None: keep all)."""
        n = magnitudes.numel()
        if density >= 1:
            return None
        if density <= 0 or n == 0:
            return cls(math.inf, -1)
        k = max(1, int(density * n))
        kth = n - k  # ascending position of the k-th largest
        if magnitudes.device.type == "cpu":  # numpy: partition and counting are ~3× torch's
            values = magnitudes.numpy()
            selected = np.partition(values, kth)
            threshold = selected[kth]
            greater = int(np.count_nonzero(selected[kth + 1 :] > threshold))
            ties = np.flatnonzero(values == threshold)
        else:
            threshold = torch.kthvalue(magnitudes, kth + 1).values
            greater = int(torch.count_nonzero(magnitudes > threshold))
            ties = torch.nonzero(magnitudes == threshold).reshape(-1)
        return cls(float(threshold), int(ties[k - greater - 1]))

    def mask(self, magnitudes: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Boolean keep-mask of the flat slice ``magnitudes`` that starts at ``offset``."""
        keep = magnitudes > self.threshold
        ties_end = self.last_tie - offset + 1
        if ties_end > 0:
            keep[:ties_end] |= magnitudes[:ties_end] == self.threshold
        return keep


def _magnitude_cuts(
    base: torch.Tensor, experts: Sequence[torch.Tensor], densities: Sequence[float]
) -> list[MagnitudeCut | None]:
    """Each expert's top-k cut of |θ_i − θ0| over the whole tensor, one float32 scratch reused."""
    flat_base = base.reshape(-1)
    magnitudes = torch.empty(flat_base.numel(), dtype=COMPUTE_DTYPE, device=base.device)
    cuts: list[MagnitudeCut | None] = []
    for expert, density in zip(experts, densities, strict=True):
        if density >= 1:
            cuts.append(None)
            continue
        flat_expert = expert.reshape(-1)
        for start, stop in _chunks(flat_base.numel()):
            part = magnitudes[start:stop]
            torch.sub(
                flat_expert[start:stop].to(COMPUTE_DTYPE),
                flat_base[start:stop].to(COMPUTE_DTYPE),
                out=part,
            )
            part.abs_()
        cuts.append(MagnitudeCut.of(magnitudes, density))
    return cuts


def magnitude_sparsify(tensor: torch.Tensor, density: float, *, rescale: bool) -> torch.Tensor:
    """mergekit ``sparsify.magnitude``: keep the max(1, int(density·numel)) largest |entries|.

    Equal magnitudes at the cut are kept lowest flat index first (:class:`MagnitudeCut`).
    """
    magnitudes = tensor.abs().reshape(-1)
    cut = MagnitudeCut.of(magnitudes, density)
    if cut is None:
        return tensor
    mask = cut.mask(magnitudes).reshape(tensor.shape).to(tensor.dtype)
    return _rescaled_masked(tensor, mask, rescale)


def bernoulli_sparsify(
    tensor: torch.Tensor,
    density: float,
    generator: torch.Generator | None,
    *,
    rescale: bool,
) -> torch.Tensor:
    """mergekit ``sparsify.bernoulli`` (DARE): keep each entry with probability ``density``."""
    if density >= 1:
        return tensor
    probabilities = torch.full_like(tensor, fill_value=density)
    mask = torch.bernoulli(probabilities, generator=generator)
    return _rescaled_masked(tensor, mask, rescale)


def _rescaled_masked(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """mergekit ``rescaled_masked_tensor`` with the L1 norm (the one its methods use)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return masked
    return masked * (before / after)
