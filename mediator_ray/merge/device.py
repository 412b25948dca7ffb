"""Where merge math runs: CPU, or CUDA when it exists and the task was given a GPU.

Ray sets ``CUDA_VISIBLE_DEVICES`` for tasks with ``num_gpus > 0``, so ``cuda`` here always means
the first visible device. Asking for CUDA on a machine without it is a configuration error that
must surface at once, not a silent fall-back that makes a GPU job run for hours on CPU.
"""

from __future__ import annotations

from typing import Literal

import torch

from mediator_ray.errors import ConfigError

DevicePreference = Literal["auto", "cpu", "cuda"]


class DeviceUnavailableError(ConfigError):
    """CUDA was requested explicitly but this process cannot see a CUDA device."""


def select_device(preference: DevicePreference, gpus_assigned: bool) -> torch.device:
    """Pick the device for tensor math.

    - ``cpu``: always the CPU.
    - ``cuda``: the first visible CUDA device; :class:`DeviceUnavailableError` if there is none.
    - ``auto``: CUDA only when the caller was assigned GPUs (a Ray task with ``num_gpus``) *and*
      CUDA is available; otherwise the CPU. A task without GPUs must not grab a GPU it shares
      with others just because one is visible.
    """
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "device: 'cuda' was requested but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                "use device: 'auto' or 'cpu', or run on a node with a GPU"
            )
        return torch.device("cuda")
    if preference == "auto":
        if gpus_assigned and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got {preference!r}")
