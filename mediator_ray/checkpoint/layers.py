"""Group a checkpoint's tensor names into layers, the unit the Mediator method works on.

A layer is one transformer block (every tensor under ``…layers.N.``) or one of the non-block
groups: embeddings, final norm, lm_head (METHOD.md). Conflict is scored, and average/route is
decided, per layer, so this grouping must be the same for the base and every expert — it is a
pure function of the names. Architectures differ only in naming, covered by the pattern
tables below; add a pattern there to support a new family.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

LayerKind = Literal["embedding", "block", "norm", "lm_head", "other"]

#: Prefixes of transformer blocks; group ``index`` is the block number.
BLOCK_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(rf"^(?P<prefix>{prefix})\.(?P<index>\d+)\.")
    for prefix in (
        r"model\.layers",  # Llama, Qwen2, Mistral, Gemma, Phi-3
        r"model\.language_model\.layers",  # multimodal wrappers (transformers 5)
        r"transformer\.h",  # GPT-2, Falcon, BLOOM
        r"gpt_neox\.layers",  # Pythia / GPT-NeoX
        r"model\.decoder\.layers",  # OPT
        r"transformer\.blocks",  # MPT
    )
)

#: Dotted name components marking the embedding group (token and position embeddings).
EMBEDDING_PARTS = frozenset(
    {
        "embed_tokens",
        "wte",
        "wpe",
        "embed_in",
        "word_embeddings",
        "word_embeddings_layernorm",
        "embed_positions",
    }
)

#: Dotted name components marking the final norm (searched outside blocks only).
NORM_PARTS = frozenset({"ln_f", "final_layer_norm", "final_layernorm"})
#: Whole prefixes of the final norm where the component alone (``norm``) is too generic.
NORM_PREFIXES = ("model.norm.", "model.language_model.norm.")

#: Dotted name components marking the output projection.
LM_HEAD_PARTS = frozenset({"lm_head", "embed_out"})

_KIND_ORDER: dict[LayerKind, int] = {
    "embedding": 0,
    "block": 1,
    "norm": 2,
    "lm_head": 3,
    "other": 4,
}
_FIXED_NAMES: dict[LayerKind, str] = {
    "embedding": "embed",
    "norm": "norm",
    "lm_head": "lm_head",
    "other": "other",
}


@dataclass(frozen=True)
class LayerGroup:
    """One layer: its name (``embed``, ``block.3``, ``norm``, ``lm_head``, ``other``)."""

    name: str
    kind: LayerKind
    index: int | None
    tensor_names: tuple[str, ...]


def classify(name: str) -> tuple[LayerKind, int | None, str | None]:
    """``(kind, block index, block prefix)`` of one tensor name."""
    for pattern in BLOCK_PATTERNS:
        match = pattern.match(name)
        if match:
            return "block", int(match["index"]), match["prefix"]
    parts = set(name.split("."))
    if parts & LM_HEAD_PARTS:
        return "lm_head", None, None
    if parts & EMBEDDING_PARTS:
        return "embedding", None, None
    if parts & NORM_PARTS or name.startswith(NORM_PREFIXES):
        return "norm", None, None
    return "other", None, None


def group_layers(names: Iterable[str]) -> list[LayerGroup]:
    """Layers in model order: embedding, blocks by index, norm, lm_head, other.

    Tensor order inside a group follows ``names``. Without an ``lm_head`` tensor (tied
    embeddings) the embedding group alone holds the shared matrix. Blocks are named
    ``block.N``; should one checkpoint have blocks under two prefixes (encoder/decoder),
    the prefix is kept in the name so the two stacks never share a group.
    """
    members: dict[tuple[LayerKind, str | None, int | None], list[str]] = {}
    for name in names:
        kind, index, prefix = classify(name)
        members.setdefault((kind, prefix, index), []).append(name)

    block_prefixes = sorted({prefix for kind, prefix, _ in members if kind == "block"})
    prefix_rank = {prefix: rank for rank, prefix in enumerate(block_prefixes)}

    def sort_key(key: tuple[LayerKind, str | None, int | None]) -> tuple[int, int, int]:
        kind, prefix, index = key
        rank = prefix_rank[prefix] if prefix is not None else 0
        return (_KIND_ORDER[kind], rank, index if index is not None else -1)

    groups = []
    for key in sorted(members, key=sort_key):
        kind, prefix, index = key
        if kind != "block":
            name = _FIXED_NAMES[kind]
        elif len(block_prefixes) == 1:
            name = f"block.{index}"
        else:
            name = f"{prefix}.{index}"
        groups.append(LayerGroup(name, kind, index, tuple(members[key])))
    return groups
