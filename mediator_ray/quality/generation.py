"""Greedy batched generation and exact-match scoring, shared by every evaluated system.

Every system — an expert, a static merge, a Mediator checkpoint — is evaluated through the
same decoding: the prompt tokenised alone (left padding), greedy, stop at eos, decode, compare
with :func:`~mediator_ray.quality.tasks.score`. That is also what ``MediatorModel.generate``
does, so differences in the table come from the weights, not from the decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mediator_ray.quality.tasks import Example, score

GenerateFn = Callable[[Sequence[str], int], list[str]]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-load/per-save progress bars from transformers (dozens of models are loaded and
    saved here; their bars would drown the benchmark's own progress lines)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@torch.no_grad()
def greedy(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy completions of ``prompts`` with a plain transformers model, cut at eos."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
        )
        batch = batch.to(device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True))
    return texts


def answer_budget(tokenizer: Any, examples: Sequence[Example], slack: int = 2) -> int:
    """Enough new tokens for the longest accepted answer (plus eos and slack)."""
    longest = max(
        len(tokenizer(a, add_special_tokens=False)["input_ids"])
        for e in examples
        for a in e.answers
    )
    return longest + 1 + slack


def accuracy(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    """Exact-match accuracy in [0, 1]."""
    if not examples:
        raise ValueError("no examples to score")
    hits = sum(score(p, e) for p, e in zip(predictions, examples, strict=True))
    return hits / len(examples)


def hf_generate_fn(model: Any, tokenizer: Any, batch_size: int = 64) -> GenerateFn:
    """A :data:`GenerateFn` over a plain transformers model."""

    def run(prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return greedy(model, tokenizer, prompts, max_new_tokens, batch_size)

    return run
