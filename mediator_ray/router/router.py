"""The task-level router: features → calibrated task probabilities → uncertainty rule.

Stored inside the checkpoint as ``router/router.safetensors`` (classifier weights; never
pickle) and ``router/router.json`` (experts, feature layer, temperature, thresholds, held-out
accuracy), so a checkpoint carries everything needed to serve it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from mediator_ray.checkpoint import serialize_tensors
from mediator_ray.errors import CheckpointFormatError, ObjectNotFoundError
from mediator_ray.router.classifier import TaskClassifier
from mediator_ray.router.features import prompt_features
from mediator_ray.router.uncertainty import Routing, Thresholds, select
from mediator_ray.storage import ObjectStore

ROUTER_WEIGHTS = "router/router.safetensors"
ROUTER_META = "router/router.json"


@dataclass
class RouterInfo:
    """Everything about a router except its weights (this is ``router.json``)."""

    experts: list[str]
    feature_layer: int
    hidden: int
    temperature: float
    thresholds: Thresholds
    heldout_accuracy: float
    n_train: int
    n_heldout: int
    max_length: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RouterInfo:
        return cls(**{**data, "thresholds": Thresholds(**data["thresholds"])})


class TaskRouter:
    """Routes prompts with a dense model's early hidden states and a calibrated classifier."""

    def __init__(self, classifier: TaskClassifier, info: RouterInfo):
        self.classifier = classifier.eval()
        self.info = info

    @property
    def experts(self) -> list[str]:
        return self.info.experts

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(features.to(torch.float32))
        return torch.softmax(logits / self.info.temperature, -1)

    def features(self, model: torch.nn.Module, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        return prompt_features(
            model, tokenizer, prompts, self.info.feature_layer, max_length=self.info.max_length
        )

    def route(self, model: torch.nn.Module, tokenizer, prompts: Sequence[str]) -> list[Routing]:
        features = self.features(model, tokenizer, prompts)
        return select(self.probabilities(features), self.experts, self.info.thresholds)

    # ---- persistence -------------------------------------------------------------------------
    def files(self) -> dict[str, bytes]:
        """The router's files as {key: bytes} (the caller writes them, manifest last)."""
        state = {k: v.detach().to(torch.float32) for k, v in self.classifier.state_dict().items()}
        return {
            ROUTER_WEIGHTS: serialize_tensors(state, {"format": "mediator-router"}),
            ROUTER_META: (json.dumps(self.info.to_json(), indent=1) + "\n").encode(),
        }

    @classmethod
    def load(cls, store: ObjectStore) -> TaskRouter | None:
        """The router stored in ``store``, or None when the checkpoint has none."""
        try:
            meta = json.loads(store.read_text(ROUTER_META))
        except ObjectNotFoundError:
            return None
        info = RouterInfo.from_json(meta)
        try:
            state = load_safetensors(store.read(ROUTER_WEIGHTS))
        except ObjectNotFoundError:
            raise CheckpointFormatError(
                f"{store.url(ROUTER_META)} exists but {ROUTER_WEIGHTS} is missing"
            ) from None
        dim = state["mean"].shape[0]
        classifier = TaskClassifier(dim, len(info.experts), info.hidden)
        classifier.load_state_dict(state)
        return cls(classifier, info)
