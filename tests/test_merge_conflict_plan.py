"""Layer conflict metrics (METHOD.md §1) and the layer plan (§2)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from mediator_ray.errors import IncompatibleCheckpointError
from mediator_ray.merge import (
    LayerInfo,
    PlanOptions,
    deviation_from_stats,
    extend_conflict,
    layer_conflict,
    make_plan,
)


def _layer(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "q.weight": scale * torch.randn(16, 12, generator=g),
        "q.bias": scale * torch.randn(16, generator=g),
        "norm.weight": scale * torch.randn(12, generator=g),
    }


def _add(base: dict, taus: list[torch.Tensor]) -> list[dict]:
    """Experts whose task vectors, flattened over the layer in base order, are ``taus``."""
    experts = []
    for tau in taus:
        expert, offset = {}, 0
        for name, tensor in base.items():
            expert[name] = tensor + tau[offset : offset + tensor.numel()].reshape(tensor.shape)
            offset += tensor.numel()
        experts.append(expert)
    return experts


def _numel(layer: dict) -> int:
    return sum(t.numel() for t in layer.values())


def _reference(taus: torch.Tensor) -> dict[str, float]:
    """The METHOD.md formulas on the whole flattened (N, P) task-vector matrix, in float64."""
    t = taus.double()
    n = t.shape[0]
    mean = t.mean(0)
    deviation = float(((t - mean) ** 2).sum() / (t**2).sum())
    elected = torch.where(t.sum(0) >= 0, 1.0, -1.0).double()
    sign = float((t.abs() * (t.sign() != elected)).sum() / t.abs().sum())
    cos = torch.nn.functional.cosine_similarity(t.unsqueeze(1), t.unsqueeze(0), dim=-1)
    pairs = [float(cos[i, j]) for i in range(n) for j in range(i + 1, n)]
    return {"deviation": deviation, "sign": sign, "cosine": 1 - sum(pairs) / len(pairs)}


def test_identical_task_vectors_have_no_conflict():
    base = _layer(0)
    tau = torch.randn(_numel(base))
    conflict = layer_conflict(base, _add(base, [tau, tau, tau]))
    assert conflict.deviation == 0.0
    assert conflict.sign == 0.0
    assert conflict.cosine == pytest.approx(0.0, abs=1e-12)
    assert conflict.tau_norms == pytest.approx([float(tau.norm())] * 3, rel=1e-6)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_orthogonal_task_vectors_deviation_is_n_minus_1_over_n(n):
    base = _layer(1)
    p = _numel(base)
    taus = [torch.zeros(p) for _ in range(n)]
    for i in range(n):  # disjoint supports, different norms: exactly orthogonal
        taus[i][i * 10 : (i + 1) * 10] = (i + 1) * torch.randn(10)
    conflict = layer_conflict(base, _add(base, taus))
    assert conflict.deviation == pytest.approx((n - 1) / n, abs=1e-6)
    assert conflict.cosine == pytest.approx(1.0, abs=1e-6)


def test_sign_and_cosine_on_hand_built_cases():
    base = {"w": torch.zeros(4)}
    experts = [
        {"w": torch.tensor([3.0, 2.0, 1.0, 0.0])},
        {"w": torch.tensor([-1.0, -2.0, -4.0, 5.0])},
    ]
    conflict = layer_conflict(base, experts)
    # p0: sum 2 → +, expert 1 disagrees with |−1|; p1: sum 0 → + (TIES tie rule), expert 1
    # disagrees with 2; p2: sum −3 → −, expert 0 disagrees with 1; p3: + , nobody disagrees.
    total = 3 + 2 + 1 + 0 + 1 + 2 + 4 + 5
    assert conflict.sign == pytest.approx((1 + 2 + 1) / total)
    dot = 3 * -1 + 2 * -2 + 1 * -4 + 0
    cos = dot / (math.sqrt(14) * math.sqrt(46))
    assert conflict.cosine == pytest.approx(1 - cos)
    # Exactly opposed vectors: cosine conflict 2, deviation 1 (past the orthogonal (N-1)/N),
    # and every coordinate a tie elected +, so half the mass disagrees.
    opposed = layer_conflict(base, [{"w": torch.ones(4)}, {"w": -torch.ones(4)}])
    assert opposed.cosine == pytest.approx(2.0)
    assert opposed.deviation == pytest.approx(1.0)
    assert opposed.sign == pytest.approx(0.5)


def test_chunked_tensor_by_tensor_accumulation_matches_flat_reference():
    base = _layer(2)
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(_numel(base), generator=g)
    taus = torch.stack([shared + 0.7 * torch.randn(_numel(base), generator=g) for _ in range(4)])
    experts = _add(base, list(taus))
    expected = _reference(taus)
    for chunk in (7, 64, 1 << 20):  # chunks that split tensors, and whole tensors
        conflict = layer_conflict(base, experts, chunk_elements=chunk)
        assert conflict.numel == _numel(base)
        for metric, value in expected.items():
            assert conflict.score(metric) == pytest.approx(value, rel=1e-6)
        assert conflict.tau_norms == pytest.approx(taus.double().norm(dim=1).tolist(), rel=1e-6)
        assert conflict.sum_sq_norms == pytest.approx(float((taus.double() ** 2).sum()), rel=1e-6)
        assert conflict.norm_sq_of_sum == pytest.approx(
            float((taus.double().sum(0) ** 2).sum()), rel=1e-6
        )
        assert deviation_from_stats(
            conflict.sum_sq_norms, conflict.norm_sq_of_sum, conflict.n_experts
        ) == pytest.approx(conflict.deviation, rel=1e-6)


def test_bf16_layers_are_scored_in_float32():
    base = {k: v.to(torch.bfloat16) for k, v in _layer(4).items()}
    experts = [{k: (v + 0.1 * torch.randn_like(v)) for k, v in _layer(5).items()} for _ in range(2)]
    experts = [{k: v.to(torch.bfloat16) for k, v in e.items()} for e in experts]
    conflict = layer_conflict(base, experts)
    taus = torch.stack(
        [torch.cat([(e[k].float() - base[k].float()).reshape(-1) for k in base]) for e in experts]
    )
    assert conflict.deviation == pytest.approx(_reference(taus)["deviation"], rel=1e-6)


def test_all_zero_task_vectors_and_single_expert_score_zero():
    base = _layer(6)
    zero = layer_conflict(base, [dict(base), dict(base), dict(base)])
    assert (zero.deviation, zero.sign, zero.cosine) == (0.0, 0.0, 0.0)
    assert zero.tau_norms == [0.0, 0.0, 0.0]
    single = layer_conflict(base, _add(base, [torch.randn(_numel(base))]))
    assert (single.deviation, single.sign, single.cosine) == (0.0, 0.0, 0.0)
    assert single.tau_norms[0] > 0
    # One unchanged expert beside a changed one: orthogonal for cosine, like deviation.
    mixed = layer_conflict(base, [dict(base), *_add(base, [torch.randn(_numel(base))])])
    assert mixed.cosine == pytest.approx(1.0)
    assert mixed.deviation == pytest.approx(0.5)


def test_sufficient_statistics_rescore_matches_full_recompute():
    base = _layer(7)
    g = torch.Generator().manual_seed(8)
    shared = torch.randn(_numel(base), generator=g)
    experts = _add(base, [shared + torch.randn(_numel(base), generator=g) for _ in range(5)])
    old = layer_conflict(base, experts[:3])
    mean_expert = {k: torch.stack([e[k] for e in experts[:3]]).mean(0) for k in base}
    extended = extend_conflict(old, base, mean_expert, experts[3:], chunk_elements=50)
    full = layer_conflict(base, experts)
    assert extended.n_experts == 5
    assert extended.deviation == pytest.approx(full.deviation, rel=1e-5)
    assert extended.sum_sq_norms == pytest.approx(full.sum_sq_norms, rel=1e-6)
    assert extended.norm_sq_of_sum == pytest.approx(full.norm_sq_of_sum, rel=1e-5)
    assert extended.tau_norms == pytest.approx(full.tau_norms, rel=1e-6)
    assert math.isnan(extended.sign) and math.isnan(extended.cosine)


def test_mismatched_layers_are_rejected():
    base = _layer(9)
    wrong_shape = {**base, "q.bias": torch.zeros(3)}
    with pytest.raises(IncompatibleCheckpointError, match=r"q\.bias"):
        layer_conflict(base, [base, wrong_shape])
    missing = {k: v for k, v in base.items() if k != "norm.weight"}
    with pytest.raises(IncompatibleCheckpointError, match=r"norm\.weight"):
        layer_conflict(base, [missing])
    with pytest.raises(ValueError):
        layer_conflict(base, [])


# ----------------------------------------------------------------------------------- plan


def _model_layers(scores: list[float], nbytes: int = 100, extra: int = 30) -> list[LayerInfo]:
    layers = [LayerInfo("embed", "embedding", 9.0, nbytes, extra)]
    layers += [LayerInfo(f"layers.{i}", "block", s, nbytes, extra) for i, s in enumerate(scores)]
    layers += [
        LayerInfo("norm", "norm", 8.0, 1, 1),
        LayerInfo("lm_head", "lm_head", 7.0, nbytes, extra),
    ]
    return layers


SCORES = [0.10, 0.50, 0.20, 0.90, 0.30, 0.50, 0.05, 0.40]


@pytest.mark.parametrize("fraction,expected", [(0.25, 2), (0.3, 3), (0.1, 1), (0.0, 0), (1.0, 8)])
def test_route_fraction_routes_ceil_r_l_highest_blocks(fraction, expected):
    plan = make_plan(_model_layers(SCORES), PlanOptions(route_fraction=fraction))
    assert len(plan.routed) == expected
    ranking = sorted(range(len(SCORES)), key=lambda i: (-SCORES[i], i))
    assert plan.routed == [f"layers.{i}" for i in sorted(ranking[:expected])]
    assert f"ceil({fraction:g}*8)={expected}" in plan.rule
    assert plan.action("embed") == plan.action("lm_head") == "average"


def test_route_fraction_default_and_tie_break_by_layer_order():
    plan = make_plan(_model_layers(SCORES), PlanOptions())  # 0.25 → 2: 0.9, then first 0.5
    assert plan.routed == ["layers.1", "layers.3"]
    assert plan.rule.startswith("route the ceil(0.25*8)=2 highest-deviation blocks")
    float_noise = [LayerInfo(f"b{i}", "block", float(i)) for i in range(30)]
    assert len(make_plan(float_noise, PlanOptions(route_fraction=0.1)).routed) == 3


def test_threshold_rule_uses_block_mean_and_std():
    options = PlanOptions(threshold_alpha=1.0)
    assert options.route_fraction is None and options.rule_name == "threshold_alpha"
    plan = make_plan(_model_layers(SCORES), options)
    mean = sum(SCORES) / len(SCORES)
    std = math.sqrt(sum((s - mean) ** 2 for s in SCORES) / len(SCORES))
    assert plan.routed == [f"layers.{i}" for i, s in enumerate(SCORES) if s > mean + std]
    assert plan.routed == ["layers.3"]
    low = make_plan(_model_layers(SCORES), PlanOptions(threshold_alpha=-10.0))
    assert len(low.routed) == 8  # all blocks, still no embeddings


def test_memory_budget_routes_largest_prefix_that_fits():
    layers = _model_layers(SCORES)
    dense = sum(layer.nbytes for layer in layers)
    plan = make_plan(layers, PlanOptions(memory_budget_bytes=dense + 3 * 30 + 29))
    assert plan.routed == ["layers.1", "layers.3", "layers.5"]  # 0.9, 0.5, 0.5 (order)
    assert "memory_budget_bytes" in plan.rule
    assert make_plan(layers, PlanOptions(memory_budget_bytes=dense)).routed == []
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        make_plan(layers, PlanOptions(memory_budget_bytes=dense - 1))


def test_embeddings_are_candidates_only_when_asked():
    layers = _model_layers(SCORES)
    plan = make_plan(layers, PlanOptions(route_fraction=0.25, route_embeddings=True))
    # 11 candidates → ceil(2.75) = 3: embed (9), norm (8), lm_head (7) outrank every block.
    assert plan.routed == ["embed", "norm", "lm_head"]
    assert all(d.candidate for d in plan.decisions)
    plan = make_plan(layers, PlanOptions(threshold_alpha=1.0, route_embeddings=True))
    assert plan.routed == ["embed", "layers.3", "norm", "lm_head"]
    without = make_plan(layers, PlanOptions(threshold_alpha=1.0))
    assert not [d for d in without.decisions if d.kind != "block" and d.candidate]


def test_plan_is_pure_and_serialisable():
    layers = _model_layers(SCORES)
    first = make_plan(layers, PlanOptions())
    assert first == make_plan(list(layers), PlanOptions())
    as_dict = first.to_dict()
    assert as_dict["metric"] == "deviation"
    assert [row["name"] for row in as_dict["layers"]] == [layer.name for layer in layers]
    assert {row["action"] for row in as_dict["layers"]} == {"average", "route"}


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"route_fraction": 0.25, "threshold_alpha": 1.0}, "threshold_alpha"),
        ({"route_fraction": 0.25, "memory_budget_bytes": 10}, "memory_budget_bytes"),
        ({"threshold_alpha": 1.0, "memory_budget_bytes": 10}, "memory_budget_bytes"),
        ({"route_fraction": None}, "route_fraction"),
        ({"route_fraction": 1.5}, "route_fraction"),
        ({"memory_budget_bytes": -1}, "memory_budget_bytes"),
        ({"metric": "entropy"}, "metric"),
        ({"threshold": 1.0}, "threshold"),
    ],
)
def test_invalid_plan_options_name_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        PlanOptions(**kwargs)


def test_plan_rejects_bad_layers():
    with pytest.raises(ValueError, match="twice"):
        make_plan([LayerInfo("a", "block", 1.0), LayerInfo("a", "block", 2.0)], PlanOptions())
    with pytest.raises(ValueError, match="non-finite"):
        make_plan([LayerInfo("a", "block", math.nan)], PlanOptions())
    with pytest.raises(ValueError, match="kind"):
        make_plan([LayerInfo("a", "blk", 1.0)], PlanOptions())  # type: ignore[arg-type]
