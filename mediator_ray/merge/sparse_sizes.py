"""How big a sparse expert is, from shapes and densities alone (no tensors, no torch).

The plan's memory-budget rule and the driver's size estimates need these numbers before any
tensor exists; :mod:`mediator_ray.merge.sparse` encodes with the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_UINT16_COLUMNS = 1 << 16
_INT32_MAX = (1 << 31) - 1


def keep_count(numel: int, density: float) -> int:
    """Entries kept per tensor: ceil(d·numel), at least 1 when d > 0 and the tensor is non-empty.

    d·numel is rounded to 6 decimals before the ceil so float noise (0.1·30 =
    3.0000000000000004) does not keep an extra entry.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if density == 0.0 or numel == 0:
        return 0
    return min(numel, max(1, math.ceil(round(density * numel, 6))))


def rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of a tensor seen as a matrix: 0-d and 1-D tensors are one row."""
    if len(shape) == 0:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def column_itemsize(n_cols: int) -> int:
    """Bytes per CSR column index: uint16 up to 65536 columns, else int32 or int64."""
    if n_cols <= _UINT16_COLUMNS:
        return 2
    return 4 if n_cols - 1 <= _INT32_MAX else 8


def row_ptr_itemsize(nnz: int) -> int:
    """Bytes per CSR row pointer: int32, or int64 past 2³¹ kept entries."""
    return 4 if nnz <= _INT32_MAX else 8


def encoding_costs(shape: Sequence[int], nnz: int, value_itemsize: int) -> dict[str, int]:
    """Bytes of each encoding (``csr``, ``bitmap``) of ``nnz`` kept entries, shape included."""
    rows, cols = rows_cols(shape)
    numel = math.prod(shape)
    shape_bytes = 8 * len(shape)
    values = nnz * value_itemsize
    csr = values + nnz * column_itemsize(cols) + (rows + 1) * row_ptr_itemsize(nnz)
    bitmap = values + (numel + 7) // 8
    return {"csr": csr + shape_bytes, "bitmap": bitmap + shape_bytes}


def estimate_encoded_nbytes(shape: Sequence[int], density: float, value_itemsize: int) -> int:
    """Bytes :func:`~mediator_ray.merge.sparse.encode_sparse` writes for one sparse expert
    tensor at ``density`` with values of ``value_itemsize`` bytes.

    Exact, since the kept count depends only on shape and density; sum it over a layer's tensors
    and multiply by N for the plan's ``routed_extra_bytes``.
    """
    nnz = keep_count(math.prod(shape), density)
    return min(encoding_costs(shape, nnz, value_itemsize).values())
