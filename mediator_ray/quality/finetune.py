"""Full fine-tuning of a causal LM on (prompt, answer) pairs, loss on the answer tokens only.

A plain torch loop (AdamW, linear warm-up then cosine decay, gradient clipping) rather than
``transformers.Trainer``: it is short, has no hidden defaults, runs on CPU, and is
deterministic for a seed, which the benchmark's cache and the tests rely on.

Prompt and answer are tokenised *separately* and concatenated (``prompt ids + answer ids +
eos``), exactly the token sequence greedy generation produces from the prompt alone, so the
model is trained on what it will see at inference.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 0
    threads: int = 2
    log_every: int = 50

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float


def encode_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int
) -> list[tuple[list[int], int]]:
    """Per pair: (token ids, number of prompt tokens). Answers end with the eos token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: generation could not stop")
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    encoded = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = (prompt + answer + [eos])[-max_length:]
        encoded.append((ids, max(0, len(ids) - len(answer) - 1)))
    return encoded


def collate(
    batch: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels (IGNORE on prompt and padding)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, mask, labels


def _lr_factor(step: int, config: FinetuneConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def finetune(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    config: FinetuneConfig,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Train ``model`` in place (all parameters) on ``pairs``; returns loss and timing.

    Batches are drawn by a seeded shuffle that restarts each epoch, so the same inputs and
    config always produce the same weights (on the same torch build and thread count)."""
    if not pairs:
        raise ValueError("no training pairs")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = encode_pairs(tokenizer, pairs, config.max_length)
    device = next(model.parameters()).device
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    order: list[int] = []
    first = last = float("nan")
    started = time.perf_counter()
    try:
        for step in range(config.steps):
            if len(order) < config.batch_size:
                fresh = list(range(len(data)))
                rng.shuffle(fresh)
                order += fresh
            batch = [data[i] for i in order[: config.batch_size]]
            del order[: config.batch_size]
            input_ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            last = float(loss.detach())
            if step == 0:
                first = last
            if log and (step + 1) % config.log_every == 0:
                log(f"step {step + 1}/{config.steps} loss {last:.4f}")
    finally:
        torch.set_num_threads(previous_threads)
        model.eval()
    return FinetuneResult(config.steps, time.perf_counter() - started, first, last)


def save_model(model: Any, tokenizer: Any, path: Path, dtype: torch.dtype | None = None) -> None:
    """``save_pretrained`` (safetensors) + tokenizer; optionally cast to ``dtype`` first."""
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
