"""The task classifier: standardised features → linear (or small MLP) softmax over N tasks.

Trained with soft targets so that *outlier exposure* works: besides each task's calibration
prompts (one-hot targets), the fit adds prompts that belong to no single task — random tokens
(uniform target) and concatenations of two tasks' prompts (50/50 target). Without them a
linear softmax extrapolates confidently far from its training data, and the uncertainty rule
could not tell an out-of-distribution prompt from an in-distribution one (Hendrycks et al.,
"Deep Anomaly Detection with Outlier Exposure", 2019). Temperature is then fitted on the
held-out split (Guo et al., 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ClassifierConfig:
    hidden: int = 0  # 0: linear; > 0: one hidden layer of this width
    epochs: int = 300
    lr: float = 0.05
    weight_decay: float = 1e-3
    seed: int = 0


class TaskClassifier(nn.Module):
    """logits = head((x − mean) / std)."""

    def __init__(self, dim: int, n_tasks: int, hidden: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.head: nn.Module
        if hidden > 0:
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_tasks))
        else:
            self.head = nn.Linear(dim, n_tasks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features - self.mean) / self.std)


def train_classifier(
    features: torch.Tensor, targets: torch.Tensor, config: ClassifierConfig
) -> TaskClassifier:
    """Full-batch AdamW on soft-target cross-entropy; deterministic for a given seed."""
    torch.manual_seed(config.seed)
    model = TaskClassifier(features.shape[1], targets.shape[1], config.hidden)
    model.mean.copy_(features.mean(0))
    model.std.copy_(features.std(0).clamp_min(1e-6))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    for _ in range(config.epochs):
        optimizer.zero_grad()
        loss = soft_cross_entropy(model(features), targets)
        loss.backward()
        optimizer.step()
    return model.eval()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against (possibly soft) target distributions."""
    return -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """T minimising held-out NLL of softmax(logits / T) against soft ``targets``.

    Held-out in-distribution prompts alone are often separated perfectly, which drives T
    toward 0 and every prediction to certainty; calibrating on held-out outlier prompts as
    well (uniform / 50-50 targets) keeps T where uncertainty means something.
    Searched on a log grid, then refined.
    """
    grid = torch.logspace(-1.5, 2.0, 71)
    nll = torch.stack([soft_cross_entropy(logits / t, targets) for t in grid])
    best = int(nll.argmin())
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    fine = torch.linspace(float(lo), float(hi), 41)
    nll = torch.stack([soft_cross_entropy(logits / t, targets) for t in fine])
    return float(fine[int(nll.argmin())])
