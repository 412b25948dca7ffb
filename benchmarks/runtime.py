"""MediatorModel runtime on real SmolLM2-135M: memory, mix materialisation, routing overhead.

The Mediator checkpoint of ``smollm2_mediator`` (4 planted SmolLM2 experts, method mediator,
default options, router fitted on the zoo's task prompts) is loaded on the CPU, and in one run:

(a) memory: ``resident_bytes()`` of the loaded model (N = 4 experts) — right after loading and
    with ``--cache-size`` mixes materialised — against what serving the experts otherwise
    takes: N full models (4 × one expert's parameter bytes, counted on an expert loaded with
    transformers, tied weights once) and one model;
(b) mix materialisation: ``activate()`` of a mix that is not cached (cold: D + Σ w_i S_i in
    the routed layers, then rebinding) over many distinct mixes — every non-empty subset of
    the experts, equal weights, then perturbed weightings — and of a cached mix (warm: the
    rebinding alone); plus ``materialize()``, the standalone deep copy used for evaluation;
(c) routing overhead: ``route([prompt])`` against a 32-token greedy generation with the mix
    pinned (``min_new_tokens = max_new_tokens = 32``, so every prompt measures the same
    length), per prompt on fresh prompts of the 4 tasks, after one untimed warm-up each.

Torch runs with ``--threads`` (default 1, like a 1-CPU Serve replica; see the flag's help).
All times are medians; the machine is shared, so the ratios (measured in the same run)
matter more than the absolute numbers.

    python benchmarks/runtime.py [--prompts-per-task 4] [--repeats 3] [--cold-rounds 2]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from smollm2_mediator import EXPERTS, TASKS, mediator_checkpoint, request_prompts, tensor_bytes

MB = 1e6


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes (wall clock)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def distinct_mixes(rounds: int) -> list[dict[str, float]]:
    """Every non-empty subset of the experts; round 0 with equal weights, later rounds with
    other weightings (so each is a new mix key — cold — yet the same amount of work)."""
    mixes = []
    for r in range(rounds):
        for size in range(1, len(EXPERTS) + 1):
            for subset in itertools.combinations(EXPERTS, size):
                raw = [1.0 + 0.1 * r * (i + 1) for i in range(size)]
                total = sum(raw)
                mixes.append({name: w / total for name, w in zip(subset, raw, strict=True)})
    return mixes


# --------------------------------------------------------------------------- (a) memory


@dataclass
class Memory:
    mediator_loaded: dict[str, int]
    mediator_cached: dict[str, int]
    cached_mixes: int
    one_model: int
    n_experts: int
    checkpoint_bytes: int

    @property
    def n_full(self) -> int:
        return self.n_experts * self.one_model


def measure_memory(model: Any, expert_folder: str, cache_size: int) -> Memory:
    """Resident bytes after loading and with ``cache_size`` mixes cached, and one expert's."""
    from transformers import AutoModelForCausalLM

    loaded = model.resident_bytes()
    # Two-expert mixes weighted 0.7/0.3: none of (b)'s mixes, so (b) still finds them cold.
    pairs = itertools.cycle(itertools.combinations(EXPERTS, 2))
    for a, b in itertools.islice(pairs, cache_size):
        model.activate({a: 0.7, b: 0.3})
    cached = model.resident_bytes()
    n_cached = len(model.cached_mixes)
    model.activate({})  # back to the dense model; mixes stay cached
    expert = AutoModelForCausalLM.from_pretrained(expert_folder, dtype=torch.bfloat16)
    one = tensor_bytes(expert)
    del expert
    gc.collect()
    return Memory(
        loaded,
        cached,
        n_cached,
        one,
        len(model.expert_names),
        model.manifest["sizes"]["total_bytes"],
    )


# --------------------------------------------------------------------------- (b) mixes


@dataclass
class Mixes:
    cold: list[tuple[int, float]]  # (number of experts in the mix, seconds)
    warm: list[float]
    standalone: list[float]

    def cold_median(self, size: int | None = None) -> float:
        return statistics.median(s for n, s in self.cold if size is None or n == size)


def measure_mixes(model: Any, rounds: int, warm_switches: int, standalone: int) -> Mixes:
    """Cold activations of distinct mixes, warm switches between two cached ones, and
    standalone ``materialize()`` copies."""
    model.activate({})
    cold = []
    for mix in distinct_mixes(rounds):
        key_before = set(model.cached_mixes)
        seconds = timed(lambda mix=mix: model.activate(mix))
        assert model.active_mix not in key_before, "a cold mix was already cached"
        cold.append((len(mix), seconds))
    a, b = {"math": 0.5, "code": 0.5}, {"chat": 0.5, "json": 0.5}
    model.activate(a)
    model.activate(b)  # both cached now; every switch below is warm
    before = model.materializations
    warm = [timed(lambda i=i: model.activate(a if i % 2 == 0 else b)) for i in range(warm_switches)]
    assert model.materializations == before, "a warm switch materialised a mix"
    copies = []
    for mix in distinct_mixes(1)[-standalone:]:
        start = time.perf_counter()
        clone = model.materialize(mix)
        copies.append(time.perf_counter() - start)
        del clone
        gc.collect()
    model.activate({})
    return Mixes(cold, warm, copies)


# --------------------------------------------------------------------------- (c) routing


@dataclass
class PromptTiming:
    task: str
    routed_to: str
    mode: str
    route_s: float
    generate_s: float
    completion_tokens: int

    @property
    def ratio(self) -> float:
        return self.route_s / self.generate_s


def measure_routing(
    model: Any, prompts: list[tuple[str, str]], repeats: int, new_tokens: int
) -> list[PromptTiming]:
    """Per prompt: median ``route([p])`` and median pinned ``generate([p])`` of
    ``new_tokens`` tokens, with the mix the router chose for ``p`` pinned."""
    out = []
    for task, prompt in prompts:
        routing = model.route([prompt])[0]
        weights = routing.weights
        gen_kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        model.generate([prompt], weights=[weights], **gen_kwargs)  # warm-up: mix materialised
        route_times, gen_times, tokens = [], [], 0
        for _ in range(repeats):
            route_times.append(timed(lambda p=prompt: model.route([p])))
            start = time.perf_counter()
            (generation,) = model.generate([prompt], weights=[weights], **gen_kwargs)
            gen_times.append(time.perf_counter() - start)
            tokens = generation.completion_tokens
        out.append(
            PromptTiming(
                task,
                routing.mix,
                routing.mode,
                statistics.median(route_times),
                statistics.median(gen_times),
                tokens,
            )
        )
    return out


# --------------------------------------------------------------------------- report


def markdown_table(
    memory: Memory, mixes: Mixes, timings: list[PromptTiming], new_tokens: int
) -> str:
    m = memory
    loaded, cached = m.mediator_loaded["total"], m.mediator_cached["total"]
    route_ms = statistics.median(t.route_s for t in timings) * 1e3
    gen_ms = statistics.median(t.generate_s for t in timings) * 1e3
    ratio = statistics.median(t.ratio for t in timings)
    rows = [
        ("**(a) memory**", "", ""),
        (
            f"Mediator, N = {m.n_experts}, after loading (resident_bytes total)",
            f"{loaded / MB:.1f} MB",
            f"{loaded / m.n_full:.3f} × N full; {loaded / m.one_model:.3f} × one model",
        ),
        (
            f"  of which sparse experts ({m.n_experts})",
            f"{m.mediator_loaded['sparse_experts'] / MB:.1f} MB",
            f"{m.mediator_loaded['sparse_experts'] / m.one_model:.3f} × one model",
        ),
        (
            f"Mediator with {m.cached_mixes} mixes cached",
            f"{cached / MB:.1f} MB",
            f"{cached / m.n_full:.3f} × N full; {cached / m.one_model:.3f} × one model",
        ),
        (
            f"N = {m.n_experts} full experts ({m.n_experts} × one)",
            f"{m.n_full / MB:.1f} MB",
            "1",
        ),
        ("one model (one expert, transformers)", f"{m.one_model / MB:.1f} MB", ""),
        ("Mediator checkpoint on disk (manifest)", f"{m.checkpoint_bytes / MB:.1f} MB", ""),
        ("**(b) mix materialisation**", "", ""),
        (
            f"cold activate, {len(mixes.cold)} distinct mixes",
            f"{mixes.cold_median() * 1e3:.1f} ms",
            "median; by experts in the mix: "
            + ", ".join(
                f"{n}: {mixes.cold_median(n) * 1e3:.1f} ms" for n in range(1, len(EXPERTS) + 1)
            ),
        ),
        (
            f"warm activate (cached mix), {len(mixes.warm)} switches",
            f"{statistics.median(mixes.warm) * 1e3:.3f} ms",
            f"cold / warm = {mixes.cold_median() / statistics.median(mixes.warm):.0f}",
        ),
        (
            f"standalone copy, materialize(), {len(mixes.standalone)} mixes",
            f"{statistics.median(mixes.standalone) * 1e3:.0f} ms",
            "deep copy of the whole model (evaluation only)",
        ),
        ("**(c) routing overhead**", "", ""),
        (f"route([prompt]), {len(timings)} prompts", f"{route_ms:.1f} ms", "median"),
        (
            f"generate([prompt]) pinned, {new_tokens} tokens greedy",
            f"{gen_ms:.0f} ms",
            f"{gen_ms / new_tokens:.1f} ms/token",
        ),
        (
            "route / generate",
            f"{ratio * 100:.2f} %",
            f"median of per-prompt ratios; ratio of medians {route_ms / gen_ms * 100:.2f} %",
        ),
    ]
    lines = ["| measure | value | ratio / note |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts-per-task", type=int, default=4, help="(c): 4 tasks × this")
    parser.add_argument("--repeats", type=int, default=3, help="(c): timings per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="(c): generated tokens")
    parser.add_argument(
        "--cold-rounds", type=int, default=2, help="(b): 15 distinct mixes per round"
    )
    parser.add_argument("--warm-switches", type=int, default=40, help="(b): cached-mix switches")
    parser.add_argument("--standalone", type=int, default=3, help="(b): materialize() copies")
    parser.add_argument("--cache-size", type=int, default=4, help="MediatorModel cache_size")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default). 1 by default, as a Ray Serve replica "
        "of 1 CPU runs (Ray sets OMP_NUM_THREADS=1): on a shared 2-core machine, 2 OpenMP "
        "threads that must meet at every op's barrier wait for each other and were 5-16× "
        "slower than 1 thread in our runs",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.prompts_per_task * len(TASKS) < 10:
        parser.error("(c) needs at least 10 prompts: --prompts-per-task ≥ 3")

    started = time.perf_counter()
    merged = mediator_checkpoint()
    from mediator_ray import MediatorModel

    model = MediatorModel.from_pretrained(
        str(merged.checkpoint), device="cpu", cache_size=args.cache_size
    )
    routed = model.manifest_routed_blocks()
    print(
        f"checkpoint {merged.checkpoint}: {len(routed)} routed blocks {routed}, "
        f"router feature layer {model.router.info.feature_layer if model.router else None}; "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs",
        file=sys.stderr,
    )

    memory = measure_memory(model, str(merged.experts[EXPERTS[0]]), args.cache_size)
    print(
        f"(a) loaded: {_describe(memory.mediator_loaded)}; {memory.cached_mixes} mixes cached: "
        f"{_describe(memory.mediator_cached)}; one expert {memory.one_model / MB:.1f} MB",
        file=sys.stderr,
    )
    mixes = measure_mixes(model, args.cold_rounds, args.warm_switches, args.standalone)
    print(
        f"(b) cold median {mixes.cold_median() * 1e3:.1f} ms over {len(mixes.cold)}, "
        f"warm median {statistics.median(mixes.warm) * 1e3:.3f} ms",
        file=sys.stderr,
    )
    prompts = request_prompts(args.prompts_per_task * len(TASKS))
    timings = measure_routing(model, prompts, args.repeats, args.new_tokens)
    for t in timings:
        print(
            f"(c) {t.task:<5} → {t.routed_to:<12} {t.mode:<5} route {t.route_s * 1e3:6.1f} ms, "
            f"generate {t.generate_s * 1e3:6.0f} ms ({t.completion_tokens} tokens), "
            f"{t.ratio * 100:5.2f} %",
            file=sys.stderr,
        )
    if any(t.completion_tokens != args.new_tokens for t in timings):
        raise RuntimeError("a generation did not produce exactly --new-tokens tokens")
    correct = sum(t.routed_to == t.task for t in timings)  # expert i is named after task i
    wall = time.perf_counter() - started

    print(
        f"\nSmolLM2-135M bf16, Mediator of {memory.n_experts} experts (route_fraction 0.25, "
        f"density 0.1, {len(routed)}/30 blocks routed), CPU, torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} CPUs shared; medians. "
        f"Routing picked the prompt's own expert for {correct}/{len(timings)} prompts. "
        f"Wall time {wall:.0f} s.\n"
    )
    print(markdown_table(memory, mixes, timings, args.new_tokens))


def _describe(memory: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v / MB:.1f} MB" for k, v in memory.items())


if __name__ == "__main__":
    main()
