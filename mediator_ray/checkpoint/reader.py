"""Fetch tensors by their byte ranges and view the bytes as torch tensors.

All refs go to the store in ONE ``read_many`` call, so ranges of one file are coalesced and
fetched in parallel, and the byte counter sees exactly the tensor bytes. The returned tensors
are views of the fetched buffers (``torch.frombuffer``), not copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mediator_ray.checkpoint.safetensors_format import TensorRef
from mediator_ray.errors import CheckpointFormatError
from mediator_ray.storage.base import ObjectStore


def tensor_from_bytes(ref: TensorRef, view: memoryview) -> torch.Tensor:
    """View ``view`` (exactly ``ref.nbytes`` long) as the tensor ``ref`` describes."""
    if len(view) != ref.nbytes:
        raise CheckpointFormatError(
            f"{ref.file}: tensor {ref.name!r}: got {len(view)} bytes, expected {ref.nbytes}"
        )
    dtype = ref.torch_dtype
    if ref.nbytes == 0:  # torch.frombuffer refuses empty buffers
        return torch.empty(ref.shape, dtype=dtype)
    raw = torch.frombuffer(view, dtype=torch.uint8)
    if raw.data_ptr() % dtype.itemsize:
        # A coalesced buffer can place a tensor at an unaligned address; kernels may assume
        # natural alignment, so pay one copy in that (rare) case.
        raw = raw.clone()
    return raw.view(dtype).reshape(ref.shape)


def read_tensors(
    store: ObjectStore, refs: Sequence[TensorRef], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Fetch ``refs`` (keys relative to ``store``) in one batched read; name -> tensor."""
    views = store.read_many([ref.byte_range for ref in refs])
    tensors: dict[str, torch.Tensor] = {}
    target = torch.device(device)
    for ref, view in zip(refs, views, strict=True):
        tensor = tensor_from_bytes(ref, view)
        tensors[ref.name] = tensor if target.type == "cpu" else tensor.to(target)
    return tensors


def read_tensor(
    store: ObjectStore, ref: TensorRef, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Fetch one tensor."""
    return read_tensors(store, [ref], device)[ref.name]
