"""Build (or reuse) an expert zoo of the quality benchmark, and show what it is.

    python benchmarks/zoo/build.py --zoo tiny      # ~2.5 min on 2 cores
    python benchmarks/zoo/build.py --zoo smollm2   # ~15 min on 2 cores (4 × 80 fine-tuning steps)

Both are deterministic (fixed seeds) and cached under ``benchmarks/.cache`` with a marker
written last, so an interrupted build resumes and a finished one is reused by
``benchmarks/quality.py`` and, for the tiny zoo, by ``mediator-ray demo --workdir``. The tiny
zoo prints each model's exact-match accuracy on every task (the diagonal is each expert on its
own task); the SmolLM2 experts' full matrix is the ``expert:<task>`` rows of
``benchmarks/results/quality-smollm2.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE = Path(__file__).resolve().parents[1] / ".cache"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--steps", type=int, default=80, help="smollm2 fine-tuning steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.zoo == "tiny":
        from mediator_ray.quality.tiny_zoo import build_trained_zoo

        zoo = build_trained_zoo(CACHE / "quality-tiny" / "zoo", log=log)
        tasks = list(zoo.tasks.tasks)
        print(f"tiny zoo in {zoo.root}; exact match on the test split (rows: model):")
        print(f"{'':>12} " + " ".join(f"{t:>10}" for t in tasks))
        for model, scores in zoo.accuracy.items():
            print(f"{model:>12} " + " ".join(f"{100 * scores[t]:10.1f}" for t in tasks))
        return 0
    from mediator_ray.quality.smollm2_zoo import build_smollm2_zoo
    from mediator_ray.quality.tasks import SplitSizes

    sizes = SplitSizes(train=2000, calibration=100, test=40, ood=20, mixed=40)
    zoo = build_smollm2_zoo(CACHE, sizes, steps=args.steps, threads=args.threads, log=log)
    print(f"SmolLM2 zoo: base {zoo.base}; experts {', '.join(map(str, zoo.experts.values()))}")
    print(f"fine-tuning took {zoo.train_minutes:.1f} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
