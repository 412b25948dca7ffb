"""Routed layers as one dense expert plus N sparse experts (METHOD.md §4), and their encoding.

D = mean_i θ_i; S_i = TopK_d(θ_i − D) keeps, per tensor, :func:`keep_count` entries of largest
|θ_i − D| (ceil(d·numel), so at least the fraction d is kept and any d > 0 keeps at least one
entry of a non-empty tensor; d = 1 keeps all).

A sparse expert is stored as its kept *positions* and the expert's own *values* θ_i there, in
the model dtype — not the differences θ_i − D. The delta is formed in float32 when a mix is
materialised (S_i = θ_i − D at the kept positions). Storing θ_i avoids rounding the delta to
bf16 a second time and makes d = 1 reconstruction exact: :func:`apply_sparse` computes
D·(1 − Σw) + Σ w_i θ_i on covered positions, which is θ_i bit for bit for a one-hot mix,
whatever the dtype, whereas D + (θ_i − D) is not exact in floating point.

Encodings (plain tensors, storable in safetensors; the smaller is chosen per tensor):

- CSR: ``row_ptr`` (int32, int64 past 2³¹ entries) + ``col`` (uint16 when the last dimension
  is ≤ 65536, else int32/int64) + ``values``: ≈ 4 bytes per kept bf16 entry + 4 per row.
- bitmap: ``bitmap`` (1 bit per entry, uint8, little-endian bit order) + ``values``:
  numel/8 + 2·nnz bytes in bf16, smaller than CSR once d ≳ 1/16.

Both carry ``shape`` (int64). Values are in row-major (flat index) order. 0-d and 1-D tensors
are one row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mediator_ray.merge.dtypes import COMPUTE_DTYPE
from mediator_ray.merge.sparse_sizes import (
    column_itemsize,
    encoding_costs,
    keep_count,
    row_ptr_itemsize,
    rows_cols,
)

EncodedSparse = dict[str, torch.Tensor]

#: The integer dtype of each index width that :mod:`sparse_sizes` picks (uint16 columns).
_INT_DTYPES = {2: torch.uint16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class SparseEntries:
    """One sparse expert tensor: kept flat positions (ascending) and θ_i's values there."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, 1-D, strictly ascending flat positions
    values: torch.Tensor  # 1-D, the expert's values at ``indices``, storage dtype

    @property
    def nnz(self) -> int:
        """Number of kept entries."""
        return int(self.indices.numel())

    @property
    def numel(self) -> int:
        """Entries of the full tensor."""
        return math.prod(self.shape)

    def delta(self, dense: torch.Tensor) -> torch.Tensor:
        """S_i as a full float32 tensor: θ_i − D at kept positions, 0 elsewhere."""
        flat_dense = dense.reshape(-1)
        out = torch.zeros(self.numel, dtype=COMPUTE_DTYPE, device=dense.device)
        idx = self.indices.to(dense.device)
        out[idx] = self.values.to(dense.device, COMPUTE_DTYPE) - flat_dense[idx].to(COMPUTE_DTYPE)
        return out.reshape(self.shape)

    def reconstruct(
        self, dense: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """θ̂_i = D + S_i (exactly θ_i at kept positions)."""
        return apply_sparse(dense, [self], [1.0], out_dtype=out_dtype)


def dense_expert(experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """D = mean_i θ_i in float32, accumulated expert by expert."""
    if not experts:
        raise ValueError("need at least one expert")
    first = experts[0]
    total = torch.zeros(first.shape, dtype=COMPUTE_DTYPE, device=first.device)
    for index, expert in enumerate(experts):
        if expert.shape != first.shape:
            raise ValueError(
                f"expert {index} has shape {tuple(expert.shape)}, expert 0 {tuple(first.shape)}"
            )
        total.add_(expert.to(device=first.device, dtype=COMPUTE_DTYPE))
    return total.div_(len(experts))


def extend_dense_expert(
    mean_old: torch.Tensor, n_old: int, new_experts: Sequence[torch.Tensor]
) -> torch.Tensor:
    """D over n_old + k experts from the old mean and the k new experts, in float32.

    What an incremental merge uses instead of re-reading the old experts: equal to
    :func:`dense_expert` of all experts up to float rounding, plus the rounding ``mean_old``
    carries if it was stored below float32.
    """
    total = mean_old.to(COMPUTE_DTYPE) * n_old
    for expert in new_experts:
        total.add_(expert.to(device=total.device, dtype=COMPUTE_DTYPE))
    return total.div_(n_old + len(new_experts))


def top_k_entries(expert: torch.Tensor, dense: torch.Tensor, density: float) -> SparseEntries:
    """TopK_d(θ_i − D): the :func:`keep_count` positions of largest |θ_i − D| and θ_i there."""
    flat_expert = expert.reshape(-1).to(dense.device)
    numel = flat_expert.numel()
    k = keep_count(numel, density)
    if k == numel:
        indices = torch.arange(numel, device=dense.device)
    else:
        diff = flat_expert.to(COMPUTE_DTYPE) - dense.reshape(-1)
        indices = torch.topk(diff.abs_(), k, sorted=False).indices.sort().values
    return SparseEntries(tuple(expert.shape), indices, flat_expert[indices])


def decompose(
    experts: Sequence[torch.Tensor], density: float
) -> tuple[torch.Tensor, list[SparseEntries]]:
    """(D, [S_1 … S_N]) for one tensor; D in float32, S_i with θ_i's dtype."""
    dense = dense_expert(experts)
    return dense, [top_k_entries(expert, dense, density) for expert in experts]


def decompose_layer(
    experts: Sequence[Mapping[str, torch.Tensor]], density: float
) -> tuple[dict[str, torch.Tensor], list[dict[str, SparseEntries]]]:
    """:func:`decompose` for every tensor of a layer."""
    dense: dict[str, torch.Tensor] = {}
    sparse: list[dict[str, SparseEntries]] = [{} for _ in experts]
    for name in experts[0]:
        dense[name], entries = decompose([e[name] for e in experts], density)
        for per_expert, entry in zip(sparse, entries, strict=True):
            per_expert[name] = entry
    return dense, sparse


def reconstruction_error(expert: torch.Tensor, dense: torch.Tensor, sparse: SparseEntries) -> float:
    """‖θ_i − θ̂_i‖ / ‖θ_i − D‖, 0 when θ_i = D."""
    residual = (expert.to(dense.device, COMPUTE_DTYPE) - dense.to(COMPUTE_DTYPE)).reshape(-1)
    denominator = torch.linalg.vector_norm(residual, dtype=torch.float64)
    if float(denominator) == 0.0:
        return 0.0
    residual[sparse.indices.to(dense.device)] = 0  # θ̂_i = θ_i exactly there
    return float(torch.linalg.vector_norm(residual, dtype=torch.float64) / denominator)


def apply_sparse(
    dense: torch.Tensor,
    sparse: Sequence[SparseEntries | Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """D + Σ_i w_i S_i, touching only the kept positions (float32 math, ``dense``'s dtype out).

    Evaluated as D·(1 − c) + Σ_i w_i θ_i on covered positions, c = Σ of the weights of the
    experts that kept the position, so a one-hot mix reproduces θ_i exactly there.
    ``sparse`` items may be :class:`SparseEntries` or encodings from :func:`encode_sparse`.
    """
    if len(sparse) != len(weights):
        raise ValueError(f"{len(sparse)} sparse experts but {len(weights)} weights")
    device = dense.device
    flat_dense = dense.reshape(-1)
    out = flat_dense.to(COMPUTE_DTYPE, copy=True)
    active = [
        (s if isinstance(s, SparseEntries) else decode_sparse(s), float(w))
        for s, w in zip(sparse, weights, strict=True)
        if w != 0
    ]
    for entries, _ in active:
        if entries.shape != tuple(dense.shape):
            raise ValueError(f"sparse shape {entries.shape} != dense shape {tuple(dense.shape)}")
    if len(active) == 1:
        entries, w = active[0]
        positions = entries.indices.to(device)
        coverage = torch.full((positions.numel(),), w, dtype=COMPUTE_DTYPE, device=device)
        weighted = entries.values.to(device, COMPUTE_DTYPE) * w
    elif active:
        all_positions = torch.cat([e.indices.to(device) for e, _ in active])
        positions, inverse = torch.unique(all_positions, sorted=True, return_inverse=True)
        coverage = torch.zeros(positions.numel(), dtype=COMPUTE_DTYPE, device=device)
        coverage.index_add_(
            0,
            inverse,
            torch.cat(
                [torch.full((e.nnz,), w, dtype=COMPUTE_DTYPE, device=device) for e, w in active]
            ),
        )
        weighted = torch.zeros_like(coverage).index_add_(
            0, inverse, torch.cat([e.values.to(device, COMPUTE_DTYPE) * w for e, w in active])
        )
    else:
        return out.reshape(dense.shape).to(out_dtype or dense.dtype)
    kept_dense = out[positions]
    out[positions] = torch.addcmul(weighted, kept_dense, 1 - coverage)
    return out.reshape(dense.shape).to(out_dtype or dense.dtype)


# ---------------------------------------------------------------------------------------------
# Encoding


def _column_dtype(n_cols: int) -> torch.dtype:
    return _INT_DTYPES[column_itemsize(n_cols)]


def _row_ptr_dtype(nnz: int) -> torch.dtype:
    return _INT_DTYPES[row_ptr_itemsize(nnz)]


def encode_sparse(entries: SparseEntries, dtype: torch.dtype | None = None) -> EncodedSparse:
    """The smaller of the CSR and bitmap encodings; values cast to ``dtype`` (default: theirs)."""
    dtype = dtype or entries.values.dtype
    values = entries.values.to(dtype).contiguous()
    indices = entries.indices
    shape = torch.tensor(entries.shape, dtype=torch.int64)
    costs = encoding_costs(entries.shape, entries.nnz, dtype.itemsize)
    if costs["bitmap"] < costs["csr"]:
        return {"shape": shape, "bitmap": _pack_bits(indices, entries.numel), "values": values}
    rows, cols = rows_cols(entries.shape)
    row_of = torch.div(indices, max(cols, 1), rounding_mode="floor")
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=indices.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(row_of, minlength=rows), dim=0)
    return {
        "shape": shape,
        "row_ptr": row_ptr.to(_row_ptr_dtype(entries.nnz)),
        "col": (indices - row_of * cols).to(_column_dtype(cols)),
        "values": values,
    }


def decode_sparse(encoded: Mapping[str, torch.Tensor]) -> SparseEntries:
    """Inverse of :func:`encode_sparse`, on the device of the encoded tensors."""
    shape = tuple(int(v) for v in encoded["shape"].tolist())
    values = encoded["values"]
    if "bitmap" in encoded:
        indices = _unpack_bits(encoded["bitmap"], math.prod(shape))
    elif "col" in encoded and "row_ptr" in encoded:
        _, cols = rows_cols(shape)
        row_ptr = encoded["row_ptr"].to(torch.int64)
        rows = torch.repeat_interleave(
            torch.arange(row_ptr.numel() - 1, device=row_ptr.device), row_ptr.diff()
        )
        indices = rows * cols + encoded["col"].to(torch.int64)
    else:
        raise ValueError(f"not a sparse encoding: keys {sorted(encoded)}")
    if indices.numel() != values.numel():
        raise ValueError(
            f"sparse encoding has {indices.numel()} positions, {values.numel()} values"
        )
    return SparseEntries(shape, indices, values)


def encoded_nbytes(encoded: Mapping[str, torch.Tensor]) -> int:
    """Bytes the encoding occupies (all of its tensors)."""
    return sum(t.numel() * t.element_size() for t in encoded.values())


def _pack_bits(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Positions → 1 bit per entry (bit b of byte j is entry 8j + b), uint8 throughout."""
    bits = torch.zeros(((numel + 7) // 8) * 8, dtype=torch.uint8, device=indices.device)
    bits[indices] = 1
    bits = bits.view(-1, 8)
    packed = bits[:, 0].clone()
    for b in range(1, 8):
        packed |= bits[:, b] << b
    return packed


def _unpack_bits(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    bits = torch.empty((bitmap.numel(), 8), dtype=torch.uint8, device=bitmap.device)
    for b in range(8):
        bits[:, b] = (bitmap >> b) & 1
    return torch.nonzero(bits.view(-1)[:numel]).view(-1)
