"""Dtype helpers: all merge math is float32; storage dtypes are the caller's choice.

Keeping the compute dtype fixed makes results independent of whether experts are stored in
bf16, fp16 or fp32, and matches mergekit run with ``dtype: float32``.
"""

from __future__ import annotations

import torch

COMPUTE_DTYPE = torch.float32

_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "F32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "F16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "BF16": torch.bfloat16,
    "float64": torch.float64,
    "F64": torch.float64,
}


def to_compute(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as float32 on its own device (no copy when it already is)."""
    return tensor.to(dtype=COMPUTE_DTYPE)


def cast_output(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float32 result to the storage dtype (round-to-nearest-even, as torch does)."""
    return tensor.to(dtype=dtype)


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``/``"bf16"``/``"BF16"`` (safetensors spelling) … → ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES_BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown floating dtype {name!r}; expected one of {sorted(_DTYPES_BY_NAME)}"
        ) from None
