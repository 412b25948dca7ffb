"""Router fitting and the MediatorModel runtime on the tiny zoo (real transformers models)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from merge_helpers import manifest, merge_with, write_calibration, zoo_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mediator_ray import MediatorModel
from mediator_ray.cli import app
from mediator_ray.testing import Zoo, sample_prompts

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def exact(tiny_zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> MediatorModel:
    """Every layer routed at density 1.0 — dense + sparse_i is exactly expert i everywhere —
    with a router fitted during the merge (on embeddings: block 0 is routed too)."""
    folder = tmp_path_factory.mktemp("runtime")
    calibration = write_calibration(folder / "cal", tiny_zoo)
    out = merge_with(
        tiny_zoo, folder / "out", calibration, 1.0, route_fraction=1.0, route_embeddings=True
    )
    return MediatorModel.from_pretrained(str(out), device="cpu", cache_size=2)


@pytest.fixture(scope="module")
def compact(tiny_zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default density 0.1 and no calibration prompts: no router."""
    return merge_with(tiny_zoo, tmp_path_factory.mktemp("runtime-compact") / "out", None, 0.1)


def random_token_prompts(model: MediatorModel, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    special = set(model.tokenizer.all_special_ids)
    vocab = [i for i in range(len(model.tokenizer)) if i not in special]
    return [model.tokenizer.decode([rng.choice(vocab) for _ in range(20)]) for _ in range(n)]


def mixed_prompts(zoo: Zoo, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = list(zoo.experts)
    pools = {name: sample_prompts(name, n, seed=seed) for name in names}
    out = []
    for i in range(n):
        a, b = rng.sample(names, 2)
        out.append(f"{pools[a][i]} {pools[b][i]}")
    return out


def test_router_is_accurate_on_held_out_and_new_prompts(exact: MediatorModel, tiny_zoo: Zoo):
    info = exact.manifest["router"]
    assert info["heldout_accuracy"] >= 0.95 and info["n_heldout"] >= 40
    prompts, labels = [], []
    for name in tiny_zoo.experts:
        fresh = sample_prompts(name, 20, seed=123)  # not among the calibration prompts
        prompts += fresh
        labels += [name] * len(fresh)
    routings = exact.route(prompts)
    top = [max(r.probabilities, key=r.probabilities.get) for r in routings]
    accuracy = sum(t == label for t, label in zip(top, labels, strict=True)) / len(labels)
    assert accuracy >= 0.95
    assert sum(r.mode == "top1" for r in routings) / len(routings) >= 0.8
    for r in routings:
        assert (
            abs(sum(r.probabilities.values()) - 1) < 1e-5
            and abs(sum(r.weights.values()) - 1) < 1e-6
        )


def test_out_of_distribution_prompts_are_uncertain_and_served_as_mixtures(
    exact: MediatorModel, tiny_zoo: Zoo
) -> None:
    in_dist = exact.route([p for n in tiny_zoo.experts for p in sample_prompts(n, 15, seed=99)])
    odd = exact.route(random_token_prompts(exact, 30, seed=5) + mixed_prompts(tiny_zoo, 30, 6))
    u_in = torch.tensor([r.uncertainty for r in in_dist])
    u_odd = torch.tensor([r.uncertainty for r in odd])
    assert u_odd.median() > torch.quantile(u_in, 0.9)
    mixtures = [r for r in odd if len(r.weights) >= 2]
    assert len(mixtures) / len(odd) >= 0.9
    assert {r.mode for r in mixtures} <= {"topk", "ood"}


def expert_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(ids).logits


def test_expert_reconstruction_at_density_one_matches_original_logits(
    exact: MediatorModel, tiny_zoo: Zoo
) -> None:
    ids = exact.tokenizer(sample_prompts("math", 1, seed=3)[0], return_tensors="pt")["input_ids"]
    for name, path in tiny_zoo.experts.items():
        with torch.no_grad():
            ours = exact.expert(name)(ids).logits
        torch.testing.assert_close(ours, expert_logits(path, ids), rtol=0, atol=1e-5)


def test_generate_top1_equals_the_reconstructed_expert(exact: MediatorModel) -> None:
    prompt = sample_prompts("code", 1, seed=11)[0]
    (result,) = exact.generate([prompt], max_new_tokens=8)
    assert result.routing.mode == "top1" and result.routing.weights == {"code": 1.0}
    reference = exact.expert("code")
    batch = exact.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        tokens = reference.generate(
            **batch, max_new_tokens=8, do_sample=False, pad_token_id=exact.tokenizer.pad_token_id
        )[0, batch["input_ids"].shape[1] :].tolist()
    eos = exact.tokenizer.eos_token_id
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    assert result.text == exact.tokenizer.decode(tokens, skip_special_tokens=True)
    assert result.completion_tokens == len(tokens)


def test_batch_is_grouped_by_mix_and_pinned_weights_are_honoured(
    exact: MediatorModel, tiny_zoo: Zoo
) -> None:
    prompts = [sample_prompts(n, 1, seed=21)[0] for n in tiny_zoo.experts]
    results = exact.generate(prompts, weights=[None, {"chat": 1.0}, None, None], max_new_tokens=4)
    assert [r.prompt for r in results] == prompts
    assert results[1].routing.weights == {"chat": 1.0}
    assert results[0].routing.mix == "math" and results[3].routing.mix == "json"


def test_memory_stays_within_the_bound_and_the_lru_is_capped(compact: Path) -> None:
    model = MediatorModel.from_pretrained(str(compact), device="cpu", cache_size=2)
    m = model.manifest
    density, n = m["sparse"]["density"], len(m["expert_names"])
    one_model = sum(p.numel() * p.element_size() for p in model.model.parameters())
    routed = sum(model.model.get_parameter(t).numel() * 4 for t in model.routed_tensors)
    mixes = [{"math": 1.0}, {"code": 1.0}, {"chat": 0.5, "json": 0.5}, {"math": 0.3, "code": 0.7}]
    for weights in mixes:
        model.activate(weights)
        assert len(model.cached_mixes) <= 2
    assert model.cached_mixes == ["chat:0.5+json:0.5", "code:0.7+math:0.3"]
    held = model.resident_bytes()
    # METHOD.md §7: (1 + N·d·c) × one model, c = 2 (≤ 4 bytes per kept bf16-sized entry
    # against 2 per dense one; float32 here only makes c smaller), plus the LRU's mixes.
    bound = (1 + n * density * 2) * one_model + model.cache_size * routed
    assert held["total"] <= bound
    assert held["sparse_experts"] <= n * density * 2 * routed
    assert held["cached_mixes"] <= model.cache_size * routed


def test_checkpoint_without_router_serves_the_dense_model_and_says_so(
    compact: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        model = MediatorModel.from_pretrained(str(compact), device="cpu")
    assert "has no router" in caplog.text
    routing = model.route(["anything at all"])[0]
    assert routing.mode == "dense" and routing.weights == {}
    (result,) = model.generate(["anything at all"], max_new_tokens=3)
    assert result.routing.mix == "dense" and model.active_mix == "dense"


def test_fit_router_command_adds_a_router_to_an_existing_checkpoint(
    tiny_zoo: Zoo, tmp_path: Path
) -> None:
    out = merge_with(tiny_zoo, tmp_path / "out", None, 0.1)
    calibration = write_calibration(tmp_path / "cal", tiny_zoo, n=40)
    args = ["fit-router", str(out)]
    for name, uri in calibration.items():
        args += ["--calibration", f"{name}={uri}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    m = manifest(out)
    assert m["router"]["heldout_accuracy"] >= 0.9
    assert MediatorModel.from_pretrained(str(out), device="cpu").router is not None
    bad = CliRunner().invoke(app, ["fit-router", str(out), "--calibration", "math"])
    assert bad.exit_code == 2 and "--calibration expects NAME=URI" in bad.output


def test_bad_calibration_input_is_named(tiny_zoo: Zoo, tmp_path: Path) -> None:
    from mediator_ray.config import parse_config
    from mediator_ray.errors import ConfigError
    from mediator_ray.router import load_calibration

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl line 2: needs a non-empty 'prompt'"):
        load_calibration(str(bad))
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl line 2: not JSON"):
        load_calibration(str(bad))
    data = zoo_config(tiny_zoo, str(tmp_path / "o")).model_dump(mode="json", by_alias=True)
    data["experts"][0]["calibration"] = str(bad)
    with pytest.raises(ConfigError, match=r"calibration given for \['math'\] but not for"):
        parse_config(data)
