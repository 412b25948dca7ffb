"""Fitting a router from each expert's calibration prompts (METHOD.md §5–6).

Per task: a seeded train / held-out split. The classifier trains on the train prompts plus
outlier-exposure prompts (see :mod:`classifier`); temperature, accuracy and the uncertainty
thresholds come from the held-out prompts only: ``u_low`` is the quantile of held-out
uncertainty at ``top1_fraction`` (so that fraction of in-distribution prompts routes top-1),
``u_high`` the quantile at ``ood_fraction``. Temperature is fitted on held-out prompts plus
held-out outlier prompts (see :func:`~mediator_ray.router.classifier.fit_temperature`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence

import torch

from mediator_ray.errors import ConfigError, StorageError
from mediator_ray.router.classifier import ClassifierConfig, fit_temperature, train_classifier
from mediator_ray.router.features import prompt_features
from mediator_ray.router.options import RouterOptions
from mediator_ray.router.router import RouterInfo, TaskRouter
from mediator_ray.router.uncertainty import Thresholds, normalized_entropy
from mediator_ray.storage import StorageOptions, open_store


def load_calibration(uri: str, storage: StorageOptions | None = None) -> list[str]:
    """Prompts from a JSONL file of ``{"prompt": ...}`` lines; errors name file and line."""
    parent, _, key = uri.rstrip("/").rpartition("/")
    try:
        text = open_store(parent or ".", storage).read_text(key)
    except StorageError as e:
        raise ConfigError(f"calibration {uri}: {e}") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"calibration {uri} line {number}: not JSON ({e.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"calibration {uri} line {number}: needs a non-empty 'prompt'")
        prompts.append(prompt)
    if not prompts:
        raise ConfigError(f"calibration {uri}: no prompts")
    return prompts


def _split(prompts: Sequence[str], fraction: float, rng: random.Random) -> tuple[list, list]:
    shuffled = list(prompts)
    rng.shuffle(shuffled)
    n_held = max(1, round(len(shuffled) * fraction))
    if len(shuffled) - n_held < 1:
        raise ConfigError(f"need at least 2 calibration prompts per expert, got {len(prompts)}")
    return shuffled[n_held:], shuffled[:n_held]


def outlier_prompts(
    tokenizer, train: Mapping[str, list[str]], n: int, rng: random.Random
) -> tuple[list[str], list[list[float]]]:
    """Random-token prompts (uniform target) and two-task concatenations (50/50 target)."""
    experts = list(train)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    lengths = [len(tokenizer(p)["input_ids"]) for ps in train.values() for p in ps[:50]]
    prompts, targets = [], []
    uniform = [1.0 / len(experts)] * len(experts)
    for _ in range(n):
        length = rng.choice(lengths) if lengths else 16
        prompts.append(tokenizer.decode([rng.choice(vocab) for _ in range(max(2, length))]))
        targets.append(uniform)
    if len(experts) >= 2:
        for _ in range(n):
            a, b = rng.sample(experts, 2)
            prompts.append(f"{rng.choice(train[a])} {rng.choice(train[b])}")
            target = [0.0] * len(experts)
            target[experts.index(a)] = target[experts.index(b)] = 0.5
            targets.append(target)
    return prompts, targets


def fit_router(
    model: torch.nn.Module,
    tokenizer,
    calibration: Mapping[str, Sequence[str]],
    feature_layer: int,
    options: RouterOptions | None = None,
) -> TaskRouter:
    """Train, calibrate and threshold a router for the experts in ``calibration`` (in order)."""
    options = options or RouterOptions()
    if len(calibration) < 2:
        raise ConfigError("a router needs calibration prompts for at least 2 experts")
    layer = options.feature_layer if options.feature_layer is not None else feature_layer
    rng = random.Random(options.seed)
    experts = list(calibration)
    train, held = {}, {}
    for name in experts:
        train[name], held[name] = _split(calibration[name], options.heldout_fraction, rng)

    def features(prompts: Sequence[str]) -> torch.Tensor:
        return prompt_features(model, tokenizer, prompts, layer, max_length=options.max_length)

    train_prompts = [p for name in experts for p in train[name]]
    train_targets = torch.zeros(len(train_prompts), len(experts))
    row = 0
    for index, name in enumerate(experts):
        train_targets[row : row + len(train[name]), index] = 1.0
        row += len(train[name])
    if options.outlier_exposure:
        extra, extra_targets = outlier_prompts(tokenizer, train, len(train_prompts) // 2, rng)
        train_prompts += extra
        train_targets = torch.cat([train_targets, torch.tensor(extra_targets)])

    classifier = train_classifier(
        features(train_prompts),
        train_targets,
        ClassifierConfig(hidden=options.hidden, seed=options.seed),
    )
    held_prompts = [p for name in experts for p in held[name]]
    held_labels = torch.tensor([i for i, name in enumerate(experts) for _ in held[name]])
    held_targets = torch.nn.functional.one_hot(held_labels, len(experts)).float()
    with torch.no_grad():
        held_logits = classifier(features(held_prompts))
        calibration_logits, calibration_targets = held_logits, held_targets
        if options.outlier_exposure:
            odd, odd_targets = outlier_prompts(tokenizer, held, len(held_prompts) // 2, rng)
            calibration_logits = torch.cat([held_logits, classifier(features(odd))])
            calibration_targets = torch.cat([held_targets, torch.tensor(odd_targets)])
    temperature = fit_temperature(calibration_logits, calibration_targets)
    probabilities = torch.softmax(held_logits / temperature, -1)
    accuracy = float((probabilities.argmax(-1) == held_labels).float().mean())
    u = normalized_entropy(probabilities)
    u_low = float(torch.quantile(u, options.top1_fraction))
    u_high = max(u_low, float(torch.quantile(u, options.ood_fraction)))
    info = RouterInfo(
        experts=experts,
        feature_layer=layer,
        hidden=options.hidden,
        temperature=temperature,
        thresholds=Thresholds(u_low, u_high, options.top_k, options.resolution),
        heldout_accuracy=accuracy,
        n_train=sum(len(v) for v in train.values()),
        n_heldout=len(held_prompts),
        max_length=options.max_length,
        extra={"outlier_exposure": options.outlier_exposure, "seed": options.seed},
    )
    return TaskRouter(classifier, info)
