"""A deterministic tiny "model zoo": one base model plus N experts with planted task vectors.

Real merges need real checkpoints, but real ones are gigabytes and their conflict structure
is unknown. The zoo builds tiny Llama/Qwen2 checkpoints (sharded safetensors + a real
tokenizer, loadable offline with ``Auto*.from_pretrained``) whose task vectors
τ_i = θ_i − θ0 are *planted*: on ``conflict_blocks`` the experts pull in independent
directions, everywhere else they share one direction plus a little noise. Tests can then
assert that the conflict metric finds exactly the planted blocks.

Planting, per tensor with reference scale r (RMS of the base tensor; ``NORM_REF`` for norm
gains, see there):

* agreeing tensors:  τ_i = agree_scale·r·d + noise_scale·r·n_i   (d shared, n_i per expert)
* conflict tensors:  τ_i = conflict_scale·r·z_i                   (z_i per expert)

with d, n_i, z_i i.i.d. standard normal. The ``deviation`` metric of METHOD.md §1 is then
≈ (N−1)/N · noise²/(agree²+noise²) on agreeing layers (0.029 for the defaults, N = 4) and
≈ (N−1)/N on conflict layers (0.75 for N = 4, 0.67 for N = 3).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

__all__ = ["NORM_REF", "ZOO_FORMAT", "Zoo", "ZooSpec", "build_zoo", "sample_prompts"]

#: Bumped whenever the on-disk content for a given spec changes, so stale zoos get rebuilt.
ZOO_FORMAT = 1

#: Reference scale of norm-gain task vectors (the gains are 1.0, so their RMS would be 1 and
#: 2×64 gains would outweigh a block's ~37k matrix entries, making the measured deviation of a
#: block noisy). 0.2 keeps norms at ~25 % of a block's τ energy yet their agreeing τ (0.02)
#: well above bf16 rounding at 1.0 (ulp 0.0078), so the final-norm group measures cleanly.
NORM_REF = 0.2

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
_BLOCK_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines a zoo; two equal specs build byte-identical zoos."""

    arch: Literal["llama", "qwen2"] = "llama"
    num_layers: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 300
    experts: tuple[str, ...] = ("math", "code", "chat", "json")
    conflict_blocks: tuple[int, ...] = (2, 5)
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Small enough that even the tiniest model is split into several shards, so loaders
    # are exercised on sharded checkpoints.
    max_shard_size: str = "60KB"
    # Scales are relative to each base tensor's RMS. Agree/noise = 5 keeps deviation ≈ 0.03
    # on agreeing layers; the conflict scale only sets how different the experts behave.
    agree_scale: float = 0.1
    conflict_scale: float = 0.5
    noise_scale: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"unknown arch {self.arch!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if len(set(self.experts)) != len(self.experts) or not self.experts:
            raise ValueError("experts must be non-empty and unique")
        bad = [b for b in self.conflict_blocks if not 0 <= b < self.num_layers]
        if bad:
            raise ValueError(f"conflict_blocks {bad} outside 0..{self.num_layers - 1}")
        # Tuples in, tuples stored: lists would make the frozen spec unhashable.
        object.__setattr__(self, "experts", tuple(self.experts))
        object.__setattr__(self, "conflict_blocks", tuple(sorted(set(self.conflict_blocks))))

    def to_json(self) -> dict:
        """JSON-ready form, used as the zoo's completeness/identity marker."""
        return {"format": ZOO_FORMAT, **asdict(self)}


@dataclass(frozen=True)
class Zoo:
    """Paths of a built zoo. ``experts`` is ordered as ``spec.experts``."""

    root: Path
    spec: ZooSpec
    base: Path
    experts: dict[str, Path] = field(default_factory=dict)
    conflict_blocks: tuple[int, ...] = ()


# --------------------------------------------------------------------------- text

# fmt: off
_WORDS = (
    "alpha", "beta", "gamma", "delta", "model", "layer", "merge", "expert", "router", "token",
    "value", "weight", "vector", "sparse", "dense", "average", "signal", "answer", "question",
    "data", "train", "test",
)
# fmt: on


def _one_prompt(task: str, rng: random.Random) -> str:
    """One short text in the style of ``task`` (unknown tasks get generic text)."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    w1, w2, w3 = rng.sample(_WORDS, 3)
    if task == "math":
        op = rng.choice("+-*")
        res = {"+": a + b, "-": a - b, "*": a * b}[op]
        return rng.choice(
            [
                f"What is {a} {op} {b}? The answer is {res}.",
                f"Solve x {op} {b} = {res}. So x = {a}.",
                f"Compute {a} {op} {b} = {res}",
            ]
        )
    if task == "code":
        return rng.choice(
            [
                f"def {w1}_{w2}(x):\n    return x + {a}\n",
                f"for i in range({a}):\n    {w1}.append(i * {b})\n",
                f"class {w1.title()}:\n    {w2} = {a}\n",
            ]
        )
    if task == "chat":
        return rng.choice(
            [
                f"Hello! Can you tell me about the {w1} {w2}?",
                f"Sure, the {w1} is like a {w2}. Anything else?",
                f"Thanks, that helps a lot with my {w3}.",
            ]
        )
    if task == "json":
        return rng.choice(
            [
                f'{{"{w1}": {a}, "{w2}": "{w3}"}}',
                f'{{"{w1}": [{a}, {b}], "ok": true}}',
                f'[{{"id": {a}, "{w2}": null}}]',
            ]
        )
    return f"{task}: the {w1} {w2} {w3} is {a} and {b}."


def sample_prompts(task: str, n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic short texts for ``task`` — for tokenizer training and, in tests,
    as calibration prompts for the router (each zoo expert "owns" the texts of its name)."""
    rng = random.Random(f"{seed}/{task}")
    return [_one_prompt(task, rng) for _ in range(n)]


def _build_tokenizer(spec: ZooSpec):
    """Small byte-level BPE trained on generated text, wrapped so AutoTokenizer loads it back.

    AutoTokenizer ignores ``tokenizer_class`` for some model types and rebuilds the tokenizer
    with the architecture's own class (for qwen2: ``Qwen2Tokenizer`` from vocab + merges, with
    its own pre-tokenizer and an ``<|endoftext|>`` unk token). So for qwen2 we train with that
    class's pipeline and build the tokenizer through it, and what we save is what loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    backend = Tokenizer(models.BPE())
    if spec.arch == "qwen2":
        qwen = Qwen2Tokenizer().backend_tokenizer  # untrained; only its pipeline is reused
        backend.normalizer, backend.pre_tokenizer = qwen.normalizer, qwen.pre_tokenizer
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tasks = sorted(set(spec.experts) | {"math", "code", "chat", "json"})
    corpus = [p for t in tasks for p in sample_prompts(t, 200, spec.seed)]
    backend.train_from_iterator(corpus, trainer=trainer)
    if backend.get_vocab_size() > spec.vocab_size:
        raise ValueError(f"tokenizer has {backend.get_vocab_size()} > {spec.vocab_size} tokens")

    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "model_max_length": 256}
    if spec.arch == "qwen2":
        bpe = json.loads(backend.to_str())["model"]
        merges = [tuple(m) for m in bpe["merges"]]
        # unk = eos, as in Qwen's own base models; otherwise <|endoftext|> would be added.
        return Qwen2Tokenizer(vocab=bpe["vocab"], merges=merges, unk_token=EOS, **specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


# --------------------------------------------------------------------------- weights


def _generator(spec: ZooSpec, stream: str, name: str) -> torch.Generator:
    """A generator seeded by (seed, stream, tensor name): independent of iteration order,
    so adding a tensor or an expert never shifts anyone else's random numbers."""
    digest = hashlib.blake2b(f"{spec.seed}/{stream}/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _randn(spec: ZooSpec, stream: str, name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, generator=_generator(spec, stream, name), dtype=torch.float32)


def _config(spec: ZooSpec, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if spec.arch == "llama" else Qwen2Config
    return cls(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def _is_norm(name: str) -> bool:
    return "norm" in name


def _base_state(model: torch.nn.Module, spec: ZooSpec, std: float) -> dict[str, torch.Tensor]:
    """Seeded float32 init of every (deduplicated) parameter: ones for norms, N(0, std²) else.

    We do not rely on transformers' own init so the bytes depend only on the spec."""
    state = {}
    for name, p in model.named_parameters():
        if _is_norm(name):
            state[name] = torch.ones(p.shape, dtype=torch.float32)
        else:
            state[name] = std * _randn(spec, "base", name, p)
    return state


def _task_vector(spec: ZooSpec, expert: str, name: str, base: torch.Tensor) -> torch.Tensor:
    """The planted τ for one expert and tensor (see module docstring)."""
    ref = NORM_REF if _is_norm(name) else base.pow(2).mean().sqrt().item()
    block = _BLOCK_RE.search(name)
    if block and int(block.group(1)) in spec.conflict_blocks:
        return spec.conflict_scale * ref * _randn(spec, f"conflict/{expert}", name, base)
    shared = _randn(spec, "shared", name, base)
    noise = _randn(spec, f"noise/{expert}", name, base)
    return ref * (spec.agree_scale * shared + spec.noise_scale * noise)


def _save_model(model, state: dict[str, torch.Tensor], spec: ZooSpec, tokenizer, path: Path):
    """Load ``state`` into ``model`` in spec.dtype and save it sharded, with the tokenizer."""
    dtype = _DTYPES[spec.dtype]
    model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name].to(dtype))
    model.save_pretrained(path, max_shard_size=spec.max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------- zoo


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence transformers' per-save "Writing model shards" bars (one per zoo model) without
    changing the caller's setting for good."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _zoo(root: Path, spec: ZooSpec) -> Zoo:
    return Zoo(
        root=root,
        spec=spec,
        base=root / "base",
        experts={e: root / "experts" / e for e in spec.experts},
        conflict_blocks=spec.conflict_blocks,
    )


def _is_complete(zoo: Zoo) -> bool:
    """A zoo is reusable iff its marker (written last) names the same spec and format."""
    marker = zoo.root / "zoo.json"
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    expected = json.loads(json.dumps(zoo.spec.to_json()))
    models = [zoo.base, *zoo.experts.values()]
    return recorded == expected and all((m / "config.json").is_file() for m in models)


def build_zoo(root: Path | str, spec: ZooSpec | None = None) -> Zoo:
    """Build (or reuse) the zoo for ``spec`` under ``root``: ``root/base``,
    ``root/experts/<name>`` and ``root/zoo.json``.

    Idempotent: a complete zoo for the same spec is returned untouched. Anything else under
    our own paths is replaced; ``zoo.json`` is removed first and written last, so a crash
    mid-build never leaves a zoo that looks complete.
    """
    from transformers import AutoModelForCausalLM

    spec = spec or ZooSpec()
    root = Path(root)
    zoo = _zoo(root, spec)
    if _is_complete(zoo):
        return zoo

    marker = root / "zoo.json"
    marker.unlink(missing_ok=True)
    for d in (zoo.base, root / "experts"):
        if d.exists():
            shutil.rmtree(d)
    root.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(spec)
    config = _config(spec, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()

    base = _base_state(model, spec, config.initializer_range)
    with _quiet_progress():
        _save_model(model, base, spec, tokenizer, zoo.base)
        for expert, path in zoo.experts.items():
            state = {n: t + _task_vector(spec, expert, n, t) for n, t in base.items()}
            _save_model(model, state, spec, tokenizer, path)

    marker.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return zoo
