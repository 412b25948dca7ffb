"""The tiny model zoo: real, sharded, loadable offline, deterministic, and planted as promised.

Every merge test trusts the zoo's planted conflict structure, so it is checked here
independently of the package's own conflict code, with a few lines of plain torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mediator_ray.testing import Zoo, ZooSpec, build_zoo, sample_prompts

ZOOS = ["tiny_zoo", "tiny_qwen_zoo", "tiny_bf16_zoo"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(params=ZOOS)
def zoo(request: pytest.FixtureRequest) -> Zoo:
    return request.getfixturevalue(request.param)


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (sharded) safetensors checkpoint."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def layer_group(name: str) -> str:
    """METHOD.md's layers: one group per block, and each non-block tensor on its own."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return f"layers.{m.group(1)}" if m else name.removesuffix(".weight")


def deviation(zoo: Zoo) -> dict[str, float]:
    """C_l = Σ_i ‖τ_i − τ̄‖² / Σ_i ‖τ_i‖² per layer group, in float32."""
    base = load_state(zoo.base)
    experts = [load_state(p) for p in zoo.experts.values()]
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for name, theta0 in base.items():
        taus = torch.stack([e[name].float() - theta0.float() for e in experts])
        group = layer_group(name)
        num[group] = num.get(group, 0.0) + (taus - taus.mean(0)).pow(2).sum().item()
        den[group] = den.get(group, 0.0) + taus.pow(2).sum().item()
    return {g: num[g] / den[g] for g in num}


def model_dirs(zoo: Zoo) -> list[Path]:
    return [zoo.base, *zoo.experts.values()]


def test_layout(zoo: Zoo) -> None:
    assert list(zoo.experts) == list(zoo.spec.experts)
    assert zoo.conflict_blocks == zoo.spec.conflict_blocks
    recorded = json.loads((zoo.root / "zoo.json").read_text())
    assert recorded["experts"] == list(zoo.spec.experts)
    for d in model_dirs(zoo):
        assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()


def test_models_are_sharded(zoo: Zoo) -> None:
    for d in model_dirs(zoo):
        shards = sorted(p.name for p in d.glob("*.safetensors"))
        assert len(shards) >= 3, d
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == shards


def test_stored_dtype(zoo: Zoo) -> None:
    want = TORCH_DTYPES[zoo.spec.dtype]
    for d in model_dirs(zoo):
        assert {t.dtype for t in load_state(d).values()} == {want}, d


def test_loads_offline_with_finite_logits(zoo: Zoo) -> None:
    prompts = [sample_prompts(e, 1)[0] for e in zoo.spec.experts]
    for d in model_dirs(zoo):
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True, dtype="auto")
        cfg = model.config
        assert cfg.model_type == zoo.spec.arch
        assert next(model.parameters()).dtype == TORCH_DTYPES[zoo.spec.dtype]
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
            cfg.bos_token_id,
            cfg.eos_token_id,
            cfg.pad_token_id,
        )
        assert len(tok) <= cfg.vocab_size
        batch = tok(prompts, return_tensors="pt", padding=True)
        assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == prompts[0]
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape == (*batch["input_ids"].shape, cfg.vocab_size)
        assert torch.isfinite(logits).all(), d


def test_planted_deviation(zoo: Zoo) -> None:
    dev = deviation(zoo)
    blocks = {f"layers.{b}" for b in range(zoo.spec.num_layers)}
    assert set(dev) == blocks | {"model.embed_tokens", "model.norm", "lm_head"}
    planted = {f"layers.{b}" for b in zoo.conflict_blocks}
    for group, c in dev.items():
        if group in planted:
            assert c >= 0.6, (group, c)
        else:
            assert c <= 0.1, (group, c)


def test_tied_embeddings(tmp_path: Path) -> None:
    spec = ZooSpec(num_layers=2, conflict_blocks=(1,), tie_word_embeddings=True)
    zoo = build_zoo(tmp_path, spec)
    assert "lm_head.weight" not in load_state(zoo.base)
    dev = deviation(zoo)
    assert set(dev) == {"layers.0", "layers.1", "model.embed_tokens", "model.norm"}
    assert dev["layers.1"] >= 0.6 and max(dev["layers.0"], dev["model.embed_tokens"]) <= 0.1
    model = AutoModelForCausalLM.from_pretrained(zoo.experts["math"], local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_deterministic_across_folders(tiny_zoo: Zoo, tmp_path: Path) -> None:
    again = build_zoo(tmp_path / "elsewhere", tiny_zoo.spec)
    first, second = all_files(tiny_zoo.root), all_files(again.root)
    assert sum(name.endswith(".safetensors") for name in first) >= 5 * 3
    assert first.keys() == second.keys()
    assert [n for n in first if first[n] != second[n]] == []


def test_build_is_idempotent(tmp_path: Path) -> None:
    spec = ZooSpec(num_layers=2, conflict_blocks=(0,), experts=("math", "code"))
    zoo = build_zoo(tmp_path, spec)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert build_zoo(tmp_path, spec) == zoo
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stamps

    # Without the marker (e.g. a crash mid-build) the zoo is rebuilt, to the same bytes.
    before = all_files(tmp_path)
    (tmp_path / "zoo.json").unlink()
    build_zoo(tmp_path, spec)
    assert all_files(tmp_path) == before

    # A different spec on the same root replaces the zoo rather than reusing it.
    other = ZooSpec(num_layers=2, conflict_blocks=(0,), experts=("chat",), seed=1)
    build_zoo(tmp_path, other)
    assert json.loads((tmp_path / "zoo.json").read_text())["seed"] == 1
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == ["chat"]
    after = all_files(tmp_path)
    shard = min(n for n in before if n.startswith("base") and n.endswith(".safetensors"))
    assert after[shard] != before[shard]  # same shapes, other seed


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="conflict_blocks"):
        ZooSpec(num_layers=4, conflict_blocks=(4,))
    with pytest.raises(ValueError, match="unique"):
        ZooSpec(experts=("math", "math"))
    assert ZooSpec(conflict_blocks=(5, 2)) == ZooSpec()
