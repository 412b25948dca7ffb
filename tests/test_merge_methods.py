"""Baseline merge methods agree with mergekit 0.1.5's own implementation, tensor by tensor.

mergekit is called directly through ``mergekit.merge_methods.merge_tensors`` with the method
registered under the same name, so the comparison runs mergekit's code (registry defaults,
parameter binding, ``sparsify``, ``GeneralizedTaskArithmeticMerge.merge_group``, ``linear``),
not a copy of it.

How DARE masks coincide: mergekit draws each expert's Bernoulli mask from torch's *default*
generator, expert by expert in input order. We draw them in the same order from a per-tensor
generator seeded with ``tensor_seed(seed, tensor_name)``. Seeding the default generator with that
same value right before mergekit's call makes both draw identical bit streams for identically
shaped float32 probability tensors, hence identical masks.
"""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import merge_tensors
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify
from pydantic import ValidationError

from mediator_ray.errors import ConfigError, IncompatibleCheckpointError
from mediator_ray.merge import MethodOptions, merge_layer, merge_tensor, methods, tensor_seed
from mediator_ray.merge.methods import bernoulli_sparsify, magnitude_sparsify, tensor_generator

TOL = 1e-5
NAME = "model.layers.3.mlp.up_proj.weight"


def _tensors(n: int, shape=(24, 40), seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [e.to(dtype) for e in experts]


def _mergekit(method: str, base, experts, options: MethodOptions, name: str = NAME):
    """mergekit's result for the same inputs and options (base last, as mergekit orders it)."""
    n = len(experts)
    params: dict[str, object] = {"weight": options.expert_weights(n)}
    if options.normalize is not None:
        params["normalize"] = options.normalize
    if method == "linear":
        tensors = list(experts)
        if options.base_weight is not None:
            tensors.append(base)
            params["weight"] = [*params["weight"], options.base_weight]
        return merge_tensors(tensors, "linear", parameters=params, dtype=torch.float32)
    params["lambda"] = options.lambda_
    params["int8_mask"] = options.int8_mask
    if options.rescale is not None:
        params["rescale"] = options.rescale
    if method != "task_arithmetic":
        params["density"] = options.keep_densities(method, n)
    torch.manual_seed(tensor_seed(options.seed, name))
    return merge_tensors(
        [*experts, base], method, parameters=params, base_index=n, dtype=torch.float32
    )


def _assert_matches(method: str, base, experts, options: MethodOptions) -> None:
    ours = merge_tensor(method, base, experts, options, tensor_name=NAME)
    theirs = _mergekit(method, base, experts, options)
    assert ours.dtype == torch.float32
    assert ours.shape == base.shape
    diff = (ours - theirs.float()).abs().max().item()
    assert diff <= TOL, f"{method} {options}: max abs diff {diff}"


OPTION_CASES = [
    {},
    {"weights": [0.5, 1.0, 2.0]},
    {"weights": [1.0, -0.5, 0.25], "lambda": 0.7},
    {"weights": [0.3, 0.3, 0.4], "normalize": True, "lambda": 1.5},
    {"weights": [0.3, 0.3, 0.4], "normalize": False},
    {"weights": [1.0, -1.0, 0.0]},  # Σw = 0: divisor guard
    {"density": 0.5, "drop_rate": 0.5},
    {"density": [0.1, 0.6, 1.0], "drop_rate": [0.3, 0.9, 0.0], "weights": [1.0, 2.0, 0.5]},
    {"density": 1.0, "drop_rate": 0.0, "normalize": True},
    {"density": 0.0, "drop_rate": 1.0},
    {"rescale": False, "drop_rate": 0.7, "seed": 11},
    {"rescale": True, "density": 0.3, "int8_mask": True, "seed": 3},
]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize(
    "case", OPTION_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults"
)
def test_task_arithmetic_family_matches_mergekit(method, case):
    base, experts = _tensors(3, seed=len(str(case)))
    _assert_matches(method, base, experts, MethodOptions(**case))


@pytest.mark.parametrize(
    "case",
    [
        {},
        {"weights": [0.2, 0.3, 0.5]},
        {"weights": [1.0, 2.0, 3.0], "normalize": False},
        {"weights": [1.0, -2.0, 4.0]},
        {"weights": [1.0, 1.0, 1.0], "base_weight": 2.0},
        {"weights": [1.0, 1.0, 1.0], "base_weight": 0.5, "normalize": False},
    ],
)
def test_linear_matches_mergekit(case):
    base, experts = _tensors(3, seed=5)
    _assert_matches("linear", base, experts, MethodOptions(**case))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties"])
def test_bf16_inputs_match_mergekit_in_float32(method):
    base, experts = _tensors(4, shape=(33,), seed=9, dtype=torch.bfloat16)
    _assert_matches(method, base, experts, MethodOptions(weights=[0.4, 0.3, 0.2, 0.1]))


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_single_expert_and_3d_tensor(method):
    base, experts = _tensors(1, shape=(3, 5, 7), seed=2)
    _assert_matches(method, base, experts, MethodOptions(density=0.5, drop_rate=0.5))


@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.999, 1.0])
@pytest.mark.parametrize("rescale", [False, True])
def test_sparsifiers_match_mergekit_sparsify(density, rescale):
    tensor = torch.randn(50, 20, generator=torch.Generator().manual_seed(1))
    norm = RescaleNorm.l1 if rescale else None
    expected = sparsify(tensor, density, SparsificationMethod.magnitude, rescale_norm=norm)
    torch.testing.assert_close(magnitude_sparsify(tensor, density, rescale=rescale), expected)

    generator = tensor_generator(4, "t", tensor.device)
    ours = bernoulli_sparsify(tensor, density, generator, rescale=rescale)
    torch.manual_seed(tensor_seed(4, "t"))
    expected = sparsify(tensor, density, SparsificationMethod.random, rescale_norm=norm)
    torch.testing.assert_close(ours, expected)


def test_magnitude_keeps_mergekit_count():
    tensor = torch.randn(7, 13)  # 91 entries: int(0.29 * 91) = 26, at least 1 for tiny density
    assert int((magnitude_sparsify(tensor, 0.29, rescale=False) != 0).sum()) == 26
    assert int((magnitude_sparsify(tensor, 1e-6, rescale=False) != 0).sum()) == 1


def test_no_experts_returns_base():
    base, _ = _tensors(0)
    for method in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
        assert torch.equal(merge_tensor(method, base, [], MethodOptions(), tensor_name=NAME), base)


def test_dare_is_reproducible_per_tensor_and_independent_of_order():
    base, experts = _tensors(3, seed=4)
    options = MethodOptions(drop_rate=0.5, seed=123)
    first = merge_tensor("dare_ties", base, experts, options, tensor_name="a")
    torch.manual_seed(999)  # the global RNG must not matter
    _ = merge_tensor("dare_ties", base, experts, options, tensor_name="b")
    again = merge_tensor("dare_ties", base, experts, options, tensor_name="a")
    assert torch.equal(first, again)
    other_name = merge_tensor("dare_ties", base, experts, options, tensor_name="b")
    other_seed = merge_tensor(
        "dare_ties", base, experts, options.model_copy(update={"seed": 124}), tensor_name="a"
    )
    assert not torch.equal(first, other_name)
    assert not torch.equal(first, other_seed)


def test_tensor_seed_is_stable_across_processes():
    # Golden values: blake2b, not the per-process salted hash().
    assert tensor_seed(0, "model.layers.0.mlp.down_proj.weight") == 4912438203135156028
    assert tensor_seed(7, "lm_head.weight") == 9055991753803385173


def test_option_defaults_follow_mergekit_registry():
    options = MethodOptions()
    assert options.resolved_normalize("linear") is True
    assert options.resolved_normalize("ties") is True
    assert options.resolved_normalize("task_arithmetic") is False
    assert options.resolved_normalize("dare_ties") is False
    assert options.resolved_rescale("dare_linear") is True
    assert options.resolved_rescale("ties") is False
    assert options.keep_densities("ties", 2) == [0.2, 0.2]
    assert options.keep_densities("dare_ties", 2) == [0.1, 0.1]  # exactly 1 - 0.9
    assert options.keep_densities("task_arithmetic", 1) == [1.0]
    assert options.keep_densities("linear", 1) == [1.0]
    assert options.resolved_rescale("linear") is False
    assert MethodOptions.model_validate({"lambda": 0.5}).lambda_ == 0.5


def test_invalid_options_and_inputs():
    with pytest.raises(ValidationError, match="density"):
        MethodOptions(density=1.5)
    with pytest.raises(ValidationError, match="drop_rate"):
        MethodOptions(drop_rate=[0.5, -0.1])
    with pytest.raises(ValidationError, match="bogus"):
        MethodOptions.model_validate({"bogus": 1})
    base, experts = _tensors(2)
    with pytest.raises(ConfigError, match="slerp"):
        merge_tensor("slerp", base, experts, MethodOptions(), tensor_name=NAME)
    with pytest.raises(ConfigError, match="weights"):
        merge_tensor("ties", base, experts, MethodOptions(weights=[1.0]), tensor_name=NAME)
    with pytest.raises(ConfigError, match="sum to 0"):
        merge_tensor("linear", base, experts, MethodOptions(weights=[1, -1]), tensor_name=NAME)
    with pytest.raises(IncompatibleCheckpointError, match=NAME):
        merge_tensor("ties", base, [experts[0], experts[1][:3]], MethodOptions(), tensor_name=NAME)


def test_integer_buffers_are_copied_when_agreed():
    buffer = torch.arange(6)
    out = merge_tensor(
        "ties", buffer, [buffer.clone(), buffer.clone()], MethodOptions(), tensor_name="ids"
    )
    assert torch.equal(out, buffer)
    with pytest.raises(IncompatibleCheckpointError, match="ids"):
        merge_tensor("ties", buffer, [buffer + 1], MethodOptions(), tensor_name="ids")


def test_merge_layer_merges_every_tensor():
    base, experts = _tensors(2, seed=8)
    layer = {"a.weight": base, "a.bias": base[0]}
    expert_layers = [{"a.weight": e, "a.bias": e[0]} for e in experts]
    merged = merge_layer("task_arithmetic", layer, expert_layers, MethodOptions())
    assert list(merged) == ["a.weight", "a.bias"]
    expected = base + (experts[0] - base) + (experts[1] - base)
    torch.testing.assert_close(merged["a.weight"], expected)
    torch.testing.assert_close(merged["a.bias"], expected[0])


# ---------------------------------------------------------------- chunking and ties at the cut

CHUNKED_CASES = [
    ("linear", MethodOptions(weights=[0.2, 0.3, 0.5])),
    ("task_arithmetic", MethodOptions(weights=[0.25] * 3, **{"lambda": 0.7})),
    ("ties", MethodOptions(density=0.3)),
    ("ties", MethodOptions(density=[0.1, 0.5, 1.0], normalize=False)),
]


@pytest.mark.parametrize(("method", "options"), CHUNKED_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_merge_is_the_whole_tensor_merge_bit_for_bit(monkeypatch, method, options, dtype):
    base, experts = _tensors(3, shape=(24, 40), seed=11, dtype=dtype)
    whole = merge_tensor(method, base, experts, options, tensor_name=NAME)
    monkeypatch.setattr(methods, "CHUNK_ENTRIES", 7)  # 138 chunks, ragged last one
    chunked = merge_tensor(method, base, experts, options, tensor_name=NAME)
    assert torch.equal(chunked, whole)
    if dtype == torch.float32:  # bf16 deltas tie at the cut, where mergekit's argsort is unstable
        assert (chunked - _mergekit(method, base, experts, options)).abs().max() <= TOL


def test_output_dtype_is_the_float32_result_rounded_once():
    base, experts = _tensors(3, seed=12, dtype=torch.bfloat16)
    options = MethodOptions(density=0.4)
    as_f32 = merge_tensor("ties", base, experts, options, tensor_name=NAME)
    as_bf16 = merge_tensor(
        "ties", base, experts, options, tensor_name=NAME, out_dtype=torch.bfloat16
    )
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16, as_f32.to(torch.bfloat16))


def _stable_top_k(tensor: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.argsort(tensor.abs().reshape(-1), descending=True, stable=True)
    mask = torch.zeros(tensor.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_ties_at_the_cut_keep_the_lowest_indices(monkeypatch, density):
    # Few distinct magnitudes, so many entries tie at any cut (as bf16 deltas do).
    g = torch.Generator().manual_seed(3)
    tensor = torch.randint(-4, 5, (300,), generator=g).float() / 4
    k = max(1, int(density * tensor.numel()))
    expected = torch.where(_stable_top_k(tensor, k), tensor, torch.zeros_like(tensor))
    assert torch.equal(magnitude_sparsify(tensor, density, rescale=False), expected)
    # the same selection when the tensor is cut into chunks that split the ties
    base = torch.zeros_like(tensor)
    whole = merge_tensor("ties", base, [tensor], MethodOptions(density=density), tensor_name="t")
    monkeypatch.setattr(methods, "CHUNK_ENTRIES", 16)
    chunked = merge_tensor("ties", base, [tensor], MethodOptions(density=density), tensor_name="t")
    assert torch.equal(chunked, whole)
    assert torch.equal(whole, expected)


def test_magnitude_cut_keeps_exactly_k():
    magnitudes = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.5, 2.0, 2.0])
    cut = methods.MagnitudeCut.of(magnitudes, 3 / 7)  # k = 3: the 3.0 and the first two 2.0s
    assert cut == methods.MagnitudeCut(2.0, 3)
    assert cut.mask(magnitudes).tolist() == [True, False, True, True, False, False, False]
    assert cut.mask(magnitudes[4:], offset=4).tolist() == [False, False, False]
    assert methods.MagnitudeCut.of(magnitudes, 1.0) is None
    assert not methods.MagnitudeCut.of(magnitudes, 0.0).mask(magnitudes).any()
