"""A tiny *trained* expert zoo: a small Llama pre-trained on all four tasks, then fully
fine-tuned into one expert per task.

Unlike :mod:`mediator_ray.testing.zoo` (planted task vectors, for testing the merge
mechanics), these experts are real fine-tunes, so merging them gains or loses real accuracy —
what the quality table measures. Everything is seeded: the tokenizer is trained on the task
text, the model initialised from ``torch.manual_seed``, the data generated from the spec's
seed; one thread is used so CPU results do not depend on thread scheduling.

Layout under ``root``::

    base/                      pre-trained on a mix of all tasks (knows every format)
    experts/<task>/            base fine-tuned on <task> only
    calibration/<task>.jsonl   the task's calibration prompts ({"prompt": …} per line)
    zoo.json                   spec + expert × task accuracy; written LAST (completeness marker)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mediator_ray.quality.finetune import FinetuneConfig, finetune, save_model
from mediator_ray.quality.generation import accuracy, answer_budget, greedy, quiet_transformers
from mediator_ray.quality.tasks import SplitSizes, TaskSuite, build_suite

#: Bumped whenever the bytes a spec produces change, so stale caches are rebuilt.
TINY_ZOO_FORMAT = 1
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
Log = Callable[[str], None]


@dataclass(frozen=True)
class TinyZooSpec:
    """Everything that determines the zoo (sizes chosen to build in a few minutes on 2 cores).

    The schedule mirrors real fine-tuning: the base gets most of the training (1200 steps on
    the four-task mixture: it learns every format, extraction and sentiment fully, arithmetic
    and reversal only partly), experts a short run at a third of the learning rate on their
    own task. With a shorter base run and equally long, equally fast expert runs, experts
    forget everything else and their task vectors are as large as the base's own training —
    no merge keeps anything then (we measured Mediator ≈ linear ≈ base there)."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 1000
    seed: int = 0
    sizes: SplitSizes = field(default_factory=SplitSizes)
    pretrain: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(steps=1200, lr=3e-3, warmup=30, log_every=200)
    )
    expert: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(steps=300, lr=1e-3, warmup=20, log_every=100)
    )
    threads: int = 1
    eval_examples: int = 200

    def to_json(self) -> dict[str, Any]:
        return {"format": TINY_ZOO_FORMAT, **asdict(self)}


@dataclass(frozen=True)
class TrainedZoo:
    """A built zoo: paths, the task suite it was trained on, and the experts' accuracy."""

    root: Path
    spec: TinyZooSpec
    base: Path
    experts: dict[str, Path]
    tasks: TaskSuite
    calibration: dict[str, Path] = field(default_factory=dict)
    #: accuracy[model][task] on the test split; model is "base" or an expert name.
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    build_seconds: float = 0.0


def build_tokenizer(suite: TaskSuite, vocab_size: int) -> Any:
    """Byte-level BPE trained on the task text, digits split one per token (so numbers are
    spelt digit by digit and arithmetic is learnable), loadable with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(suite.corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=256
    )


def _new_model(spec: TinyZooSpec, tokenizer: Any) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def evaluate_model(
    model: Any, tokenizer: Any, suite: TaskSuite, split: str = "test", limit: int | None = None
) -> dict[str, float]:
    """Exact-match accuracy of ``model`` per task on ``split`` (first ``limit`` examples)."""
    scores = {}
    for task in suite.tasks:
        examples = suite.splits[task][split][:limit]
        budget = answer_budget(tokenizer, examples)
        predictions = greedy(model, tokenizer, [e.prompt for e in examples], budget)
        scores[task] = accuracy(predictions, examples)
    return scores


def _paths(root: Path, spec: TinyZooSpec, suite: TaskSuite) -> dict[str, Any]:
    return {
        "base": root / "base",
        "experts": {t: root / "experts" / t for t in suite.tasks},
        "calibration": {t: root / "calibration" / f"{t}.jsonl" for t in suite.tasks},
    }


def _load_complete(root: Path, spec: TinyZooSpec, suite: TaskSuite) -> TrainedZoo | None:
    try:
        recorded = json.loads((root / "zoo.json").read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("spec") != json.loads(json.dumps(spec.to_json())):
        return None
    paths = _paths(root, spec, suite)
    folders = [paths["base"], *paths["experts"].values()]
    if not all((f / "config.json").is_file() for f in folders):
        return None
    return TrainedZoo(
        root,
        spec,
        paths["base"],
        paths["experts"],
        suite,
        paths["calibration"],
        recorded["accuracy"],
        recorded.get("build_seconds", 0.0),
    )


def load_trained_zoo(root: Path | str, spec: TinyZooSpec | None = None) -> TrainedZoo | None:
    """The complete zoo for ``spec`` under ``root``, or None (missing, partial or stale)."""
    spec = spec or TinyZooSpec()
    return _load_complete(Path(root), spec, build_suite(spec.sizes, spec.seed))


def build_trained_zoo(
    root: Path | str, spec: TinyZooSpec | None = None, log: Log | None = None
) -> TrainedZoo:
    """Build (or reuse) the trained zoo under ``root``; see the module docstring.

    Idempotent: a complete zoo for the same spec is returned as is. Otherwise the marker is
    removed first and written last, so an interrupted build is never mistaken for a zoo."""
    spec = spec or TinyZooSpec()
    root = Path(root)
    say = log or (lambda _message: None)
    suite = build_suite(spec.sizes, spec.seed)
    zoo = _load_complete(root, spec, suite)
    if zoo is not None:
        return zoo

    started = time.perf_counter()
    (root / "zoo.json").unlink(missing_ok=True)
    for folder in ("base", "experts", "calibration"):
        shutil.rmtree(root / folder, ignore_errors=True)
    paths = _paths(root, spec, suite)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        with quiet_transformers():
            _write_calibration(suite, paths["calibration"])
            table = _train(spec, suite, paths, say)
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - started
    marker = {"spec": spec.to_json(), "accuracy": table, "build_seconds": round(seconds, 1)}
    (root / "zoo.json").write_text(json.dumps(marker, indent=2) + "\n")
    return TrainedZoo(
        root,
        spec,
        paths["base"],
        paths["experts"],
        suite,
        paths["calibration"],
        table,
        seconds,
    )


def _write_calibration(suite: TaskSuite, files: dict[str, Path]) -> None:
    for task, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"prompt": p}) for p in suite.prompts(task, "calibration")]
        path.write_text("\n".join(lines) + "\n")


def _train(
    spec: TinyZooSpec, suite: TaskSuite, paths: dict[str, Any], say: Log
) -> dict[str, dict[str, float]]:
    """Pre-train the base, fine-tune the experts, save all; accuracy[model][task] on test."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(suite, spec.vocab_size)
    model = _new_model(spec, tokenizer)
    mixture = [pair for task in suite.tasks for pair in suite.pairs(task)]
    say(f"pre-training the base on {len(mixture)} examples of all tasks")
    config = _with_threads(spec.pretrain, spec.threads)
    result = finetune(model, tokenizer, mixture, config, log=lambda m: say(f"base: {m}"))
    save_model(model, tokenizer, paths["base"])
    say(f"base done in {result.seconds:.0f}s (loss {result.last_loss:.3f})")
    table = {"base": evaluate_model(model, tokenizer, suite, limit=spec.eval_examples)}
    for index, (task, path) in enumerate(paths["experts"].items()):
        expert = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        config = _with_threads(spec.expert, spec.threads, seed=spec.seed + 1 + index)
        result = finetune(
            expert, tokenizer, suite.pairs(task), config, log=lambda m, t=task: say(f"{t}: {m}")
        )
        save_model(expert, tokenizer, path)
        table[task] = evaluate_model(expert, tokenizer, suite, limit=spec.eval_examples)
        say(f"expert {task} done in {result.seconds:.0f}s: {_fmt(table[task])}")
    return table


def _with_threads(config: FinetuneConfig, threads: int, seed: int | None = None) -> FinetuneConfig:
    from dataclasses import replace

    return replace(config, threads=threads, seed=config.seed if seed is None else seed)


def _fmt(scores: dict[str, float]) -> str:
    return " ".join(f"{task}={value:.2f}" for task, value in scores.items())
