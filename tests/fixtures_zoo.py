"""Session-scoped tiny model zoos: planted experts (``mediator_ray.testing.zoo``) and the
trained quality zoo (``mediator_ray.quality.tiny_zoo``).

Loaded as a pytest plugin from ``tests/conftest.py``. Each zoo is built once per session
(well under a second after imports) in its own temporary folder; treat it as read-only —
tests that need to modify a zoo should build their own with ``build_zoo(tmp_path, spec)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mediator_ray.quality.tiny_zoo import TrainedZoo, build_trained_zoo
from mediator_ray.testing import Zoo, ZooSpec, build_zoo

#: Default zoo: Llama, 8 blocks, 4 experts, conflicts planted on blocks 2 and 5, float32.
TINY_SPEC = ZooSpec()
#: Qwen2 variant (q/k/v biases, different module names in configs): 4 blocks, 3 experts.
TINY_QWEN_SPEC = ZooSpec(
    arch="qwen2", num_layers=4, conflict_blocks=(1, 3), experts=("math", "code", "chat")
)
#: Same as the default but stored in bfloat16, as real checkpoints usually are.
TINY_BF16_SPEC = ZooSpec(dtype="bfloat16")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """Llama float32 zoo with the default spec."""
    return build_zoo(tmp_path_factory.mktemp("zoo-llama"), TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_qwen_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """Qwen2 float32 zoo: 4 blocks, experts math/code/chat, conflicts on blocks 1 and 3."""
    return build_zoo(tmp_path_factory.mktemp("zoo-qwen2"), TINY_QWEN_SPEC)


@pytest.fixture(scope="session")
def tiny_bf16_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """Llama zoo stored in bfloat16 (same planting as ``tiny_zoo``)."""
    return build_zoo(tmp_path_factory.mktemp("zoo-llama-bf16"), TINY_BF16_SPEC)


#: The trained zoo is kept between sessions (rebuilt only when its spec changes): ~150 s.
TRAINED_ZOO_CACHE = Path(__file__).parent / ".cache" / "quality-tiny" / "zoo"


@pytest.fixture(scope="session")
def trained_zoo() -> TrainedZoo:
    """A small Llama pre-trained on four generated tasks and fine-tuned into four experts."""
    return build_trained_zoo(TRAINED_ZOO_CACHE)
