"""Device selection for merge math: CUDA only when asked for or assigned, and available."""

from __future__ import annotations

import pytest
import torch

from mediator_ray.errors import ConfigError
from mediator_ray.merge import DeviceUnavailableError, select_device


def test_cpu_is_always_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("cpu", gpus_assigned=True) == torch.device("cpu")


@pytest.mark.parametrize(
    "available,assigned,expected",
    [
        (True, True, "cuda"),
        (True, False, "cpu"),
        (False, True, "cpu"),
        (False, False, "cpu"),
    ],
)
def test_auto_uses_cuda_only_when_assigned_and_available(
    monkeypatch, available, assigned, expected
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert select_device("auto", gpus_assigned=assigned).type == expected


def test_cuda_requested_but_unavailable_is_a_clear_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        select_device("cuda", gpus_assigned=False)
    assert issubclass(DeviceUnavailableError, ConfigError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("cuda", gpus_assigned=False) == torch.device("cuda")


def test_unknown_preference_is_rejected():
    with pytest.raises(ConfigError, match="tpu"):
        select_device("tpu", gpus_assigned=False)  # type: ignore[arg-type]
