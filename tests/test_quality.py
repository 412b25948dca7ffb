"""Quality on the tiny trained zoo: does Mediator beat static merging?

The zoo (a small Llama pre-trained on four generated tasks, fine-tuned into four experts) is
the session's ``trained_zoo``, cached under ``tests/.cache/quality-tiny`` (rebuilt only when its
spec changes); every merge runs fresh through ``run_merge`` on the session's two-node Ray cluster.
Nothing here is a recorded number: every assertion compares accuracies measured in this run.
"""

from __future__ import annotations

import json

import pytest
import torch

from mediator_ray.quality.evaluate import STATIC_METHODS, EvalLimits, QualityReport, evaluate_zoo
from mediator_ray.quality.tasks import TASKS, SplitSizes, build_suite, make_splits, score
from mediator_ray.quality.tiny_zoo import TrainedZoo, build_trained_zoo

LIMITS = EvalLimits(test=200, ood=0, mixed=0)

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def zoo(trained_zoo: TrainedZoo) -> TrainedZoo:
    return trained_zoo


@pytest.fixture(scope="module")
def report(ray_cluster, zoo: TrainedZoo, tmp_path_factory: pytest.TempPathFactory) -> QualityReport:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the machine is shared
    try:
        return evaluate_zoo(
            "tiny",
            zoo.base,
            zoo.experts,
            zoo.calibration,
            zoo.tasks,
            tmp_path_factory.mktemp("quality"),
            limits=LIMITS,
            systems=("experts", *STATIC_METHODS, "mediator"),
            splits=("test",),
        )
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- the task suite


def test_splits_are_deterministic_and_disjoint() -> None:
    sizes = SplitSizes(train=300, calibration=50, test=50, ood=20, mixed=10)
    for task in TASKS:
        first, again = make_splits(task, sizes, seed=3), make_splits(task, sizes, seed=3)
        assert first == again
        held = {e.prompt for e in first["test"] + first["ood"]}
        assert not held & {e.prompt for e in first["train"] + first["calibration"]}
        assert {e.template for e in first["ood"]}.isdisjoint(e.template for e in first["train"])
    assert make_splits("arithmetic", sizes, seed=3) != make_splits("arithmetic", sizes, seed=4)


def test_no_task_is_marked_by_a_fixed_prefix_or_cue() -> None:
    suite = build_suite(SplitSizes(train=400, calibration=10, test=10, ood=10, mixed=10))
    for task in TASKS:
        prompts = suite.prompts(task, "train")
        assert len({p.split()[0] for p in prompts}) >= 5, task  # many openings per task
    first_words = {t: {p.split()[0] for p in suite.prompts(t, "train")} for t in TASKS}
    shared = set.union(*[first_words[a] & first_words[b] for a in TASKS for b in TASKS if a < b])
    assert shared  # some openings are used by more than one task
    cues = {t: {p.rsplit("\n", 1)[1] for p in suite.prompts(t, "train")} for t in TASKS}
    assert all(c == cues[TASKS[0]] for c in cues.values())


def test_exact_match_scorer() -> None:
    example = build_suite(SplitSizes(train=1, calibration=1, test=5, ood=1, mixed=4)).mixed[0]
    assert score(f"  {example.answers[0].strip()} ", example)
    assert score(example.answers[1], example)
    assert not score(example.answers[0] + " extra", example)
    assert not score("", example)


# ---------------------------------------------------------------- the zoo


def test_zoo_is_cached_and_experts_specialise(zoo: TrainedZoo) -> None:
    marker = json.loads((zoo.root / "zoo.json").read_text())
    assert marker["accuracy"] == zoo.accuracy
    assert build_trained_zoo(zoo.root).accuracy == zoo.accuracy  # reused, not retrained
    tasks = zoo.tasks.tasks
    for task in tasks:  # each task is answered best by its own expert
        own = zoo.accuracy[task][task]
        assert own >= max(zoo.accuracy[e][task] for e in tasks if e != task), task
    diagonal = sum(zoo.accuracy[t][t] for t in tasks) / len(tasks)
    off = [zoo.accuracy[e][t] for e in tasks for t in tasks if e != t]
    assert diagonal >= sum(off) / len(off) + 0.2  # and the experts really differ
    # the hard tasks are learnt by fine-tuning, not already by the base
    assert sum(zoo.accuracy[t][t] - zoo.accuracy["base"][t] for t in tasks) >= 0.4


# ---------------------------------------------------------------- the quality claim


def test_mediator_beats_every_static_merge(report: QualityReport) -> None:
    mediator = report.row("mediator (router)").mean("test")
    best = report.best_static()
    assert mediator > best.mean("test"), (mediator, best.system, best.mean("test"))


def test_mediator_is_within_five_points_of_the_experts(report: QualityReport) -> None:
    experts = report.row("experts (own task)").mean("test")
    mediator = report.row("mediator (router)").mean("test")
    assert mediator >= experts - 0.05, (mediator, experts)


def test_router_sends_test_prompts_to_their_expert(report: QualityReport) -> None:
    assert report.row("mediator (router)").extra["router_test_accuracy"] >= 0.9


def test_mediator_loads_in_less_memory_than_all_experts(report: QualityReport) -> None:
    mediator = report.row("mediator (router)")
    experts = report.row("experts (own task)")
    one_model = report.row("linear").serving_bytes
    assert one_model < mediator.serving_bytes < experts.serving_bytes
    assert mediator.checkpoint_bytes < experts.checkpoint_bytes
