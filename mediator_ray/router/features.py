"""Router features: the prompt's mean-pooled hidden state after one early layer (METHOD.md §5).

The forward pass stops at that layer (a hook raises once it has the output), so computing
features costs a fraction of a full forward pass — routing happens once per request before
generation, and its overhead matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: ``feature_layer`` value meaning "the token embeddings" (before block 0).
EMBEDDINGS = -1


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def block_modules(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM (Llama/Qwen2/Mistral/GPT-2/NeoX layouts)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def default_feature_layer(routed_blocks: Sequence[int]) -> int:
    """The last averaged block before the first routed one (embeddings if block 0 is routed)."""
    if not routed_blocks:
        return EMBEDDINGS
    return min(routed_blocks) - 1


@torch.no_grad()
def prompt_features(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    layer: int,
    *,
    batch_size: int = 32,
    max_length: int = 256,
) -> torch.Tensor:
    """[len(prompts), hidden] float32 features; ``layer`` is a block index or EMBEDDINGS."""
    target = model.get_input_embeddings() if layer == EMBEDDINGS else block_modules(model)[layer]

    def stop(_module: nn.Module, _inputs: object, output: object) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        raise _Stop(hidden)

    device = next(model.parameters()).device
    handle = target.register_forward_hook(stop)
    chunks = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(device)
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            except _Stop as stopped:
                hidden = stopped.hidden
            else:  # pragma: no cover - the hook always fires
                raise RuntimeError("feature hook did not fire")
            mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)
            pooled = (hidden.to(torch.float32) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            chunks.append(pooled.cpu())
    finally:
        handle.remove()
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)
