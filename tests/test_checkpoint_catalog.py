"""Catalog of real (tiny) Hugging Face checkpoints, compatibility checks and layer grouping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mediator_ray.checkpoint import (
    CheckpointCatalog,
    check_compatible,
    classify,
    group_layers,
    header_read_bytes,
    open_checkpoint,
    read_tensors,
)
from mediator_ray.checkpoint.safetensors_format import header_probe_end
from mediator_ray.errors import CheckpointFormatError, IncompatibleCheckpointError
from mediator_ray.storage import LocalStore

DIMS = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def save_tiny(path: Path, arch: str = "llama", seed: int = 0, dtype=torch.float32, **kw) -> Path:
    """Save a tiny random model; ``max_shard_size`` in ``kw`` gives several shards."""
    torch.manual_seed(seed)
    shard = kw.pop("max_shard_size", None)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**DIMS, **kw}))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**{**DIMS, **kw}))
    model.to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("llama") / "base", max_shard_size="50KB")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("qwen") / "base", "qwen2", dtype=torch.bfloat16)


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def shard_reference(path: Path) -> dict[str, torch.Tensor]:
    reference: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        reference.update(load_file(shard))
    return reference


# ---- catalog ---------------------------------------------------------------------------------


def test_sharded_llama_catalog(llama_dir: Path) -> None:
    catalog = open_checkpoint(str(llama_dir))
    assert len(catalog.files) == 3
    assert catalog.files == sorted(p.name for p in llama_dir.glob("*.safetensors"))
    assert catalog.architecture == "LlamaForCausalLM" and catalog.model_type == "llama"
    assert catalog.config["hidden_size"] == 32
    assert catalog.tokenizer_files == ["generation_config.json"]
    assert [g.name for g in catalog.layers] == ["embed", "block.0", "block.1", "norm", "lm_head"]
    index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
    assert set(catalog.tensors) == set(index["weight_map"])
    assert all(ref.file == index["weight_map"][name] for name, ref in catalog.tensors.items())
    assert catalog.total_bytes == index["metadata"]["total_size"]
    block = catalog.layer("block.1")
    assert block.kind == "block" and block.index == 1
    assert [r.name for r in catalog.refs("block.1")] == list(block.tensor_names)
    with pytest.raises(KeyError, match=r"block\.7"):
        catalog.layer("block.7")


def test_every_tensor_read_through_the_catalog_is_exact(llama_dir: Path, qwen_dir: Path) -> None:
    for path in (llama_dir, qwen_dir):
        catalog = open_checkpoint(str(path))
        ours = read_tensors(catalog.store, list(catalog.tensors.values()))
        reference = shard_reference(path)
        assert ours.keys() == reference.keys()
        for name, expected in reference.items():
            assert ours[name].dtype == expected.dtype
            assert torch.equal(ours[name], expected), name


def test_catalog_reads_only_headers(llama_dir: Path) -> None:
    store = LocalStore(str(llama_dir))
    catalog = open_checkpoint(store)
    small_files = sum(
        (llama_dir / name).stat().st_size
        for name in ("config.json", "model.safetensors.index.json")
    )
    headers = sum(header_read_bytes(h) for h in catalog.headers.values())
    assert store.stats.bytes_read == small_files + headers
    # One request per small file; one per shard header, two when it outgrows the probe.
    probes = [
        1 + (8 + h.header_len > header_probe_end(h.file_size)) for h in catalog.headers.values()
    ]
    assert store.stats.read_requests == 2 + sum(probes)


def test_single_file_bf16_qwen(qwen_dir: Path) -> None:
    catalog = open_checkpoint(f"file://{qwen_dir}")
    assert catalog.files == ["model.safetensors"]
    assert catalog.architecture == "Qwen2ForCausalLM"
    assert {ref.dtype for ref in catalog.tensors.values()} == {"BF16"}
    assert "model.layers.0.self_attn.q_proj.bias" in catalog.layer("block.0").tensor_names


def test_index_naming_a_missing_shard(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_of(llama_dir, tmp_path)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match=r"shard 'model-00002-of-00003\.safetensors'"):
        open_checkpoint(str(path))


def test_index_disagreeing_with_headers(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_of(llama_dir, tmp_path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=r"'model\.norm\.weight'.*does not contain"):
        open_checkpoint(str(path))
    del index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=r"'model\.norm\.weight'.*index omits it"):
        open_checkpoint(str(path))
    index_path.write_text("{not json")
    with pytest.raises(CheckpointFormatError, match=r"index\.json: the shard index is not valid"):
        open_checkpoint(str(path))


def test_tensor_in_two_shards(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_of(llama_dir, tmp_path)
    last = path / "model-00003-of-00003.safetensors"
    tensors = load_file(last)
    tensors["model.norm.weight"] = torch.ones(32)  # also in shard 2
    save_file(tensors, last, metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=r"'model\.norm\.weight' is in two shards"):
        open_checkpoint(str(path))


def test_folder_with_only_pickle_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 pickle")
    with pytest.raises(CheckpointFormatError) as info:
        open_checkpoint(str(tmp_path))
    message = str(info.value)
    assert "pytorch_model.bin" in message and "pickle" in message
    assert "model.safetensors" in message and str(tmp_path) in message


def test_missing_or_broken_config(qwen_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match=r"config\.json is missing.*empty or does not"):
        open_checkpoint(str(tmp_path / "nowhere"))
    path = copy_of(qwen_dir, tmp_path)
    (path / "config.json").write_text("{oops")
    with pytest.raises(
        CheckpointFormatError, match=r"config\.json: config\.json is not valid JSON"
    ):
        open_checkpoint(str(path))
    (path / "config.json").unlink()
    with pytest.raises(CheckpointFormatError, match=r"config\.json is missing \(it has: "):
        open_checkpoint(str(path))


# ---- compatibility ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(llama_dir: Path) -> CheckpointCatalog:
    return open_checkpoint(str(llama_dir))


def test_compatible_experts_pass(base: CheckpointCatalog, tmp_path: Path) -> None:
    math = open_checkpoint(str(save_tiny(tmp_path / "math", seed=1)))  # one file, other values
    check_compatible(base, {"math": math, "self": base})


def test_expert_with_a_different_shape(base: CheckpointCatalog, tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "code", seed=2)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    good = open_checkpoint(str(save_tiny(tmp_path / "math", seed=1)))
    with pytest.raises(IncompatibleCheckpointError) as info:
        check_compatible(base, {"math": good, "code": open_checkpoint(str(path))})
    message = str(info.value)
    assert "expert 'code'" in message
    assert (
        "'model.layers.1.mlp.up_proj.weight' has shape [65, 32], the base has [64, 32]" in message
    )
    assert info.value.problems == [  # type: ignore[attr-defined]
        (
            "code",
            "tensor 'model.layers.1.mlp.up_proj.weight' has shape [65, 32], the base has [64, 32]",
        )
    ]


def test_expert_with_a_different_architecture(base: CheckpointCatalog, qwen_dir: Path) -> None:
    with pytest.raises(IncompatibleCheckpointError) as info:
        check_compatible(base, {"chat": open_checkpoint(str(qwen_dir))})
    message = str(info.value)
    assert "expert 'chat'" in message
    assert "architecture 'Qwen2ForCausalLM' differs from the base's 'LlamaForCausalLM'" in message
    assert "more problems" in message  # model_type, dtypes, extra bias tensors …


def test_expert_with_other_dtype_missing_tensor_and_config(
    base: CheckpointCatalog, tmp_path: Path
) -> None:
    bf16 = open_checkpoint(str(save_tiny(tmp_path / "bf16", dtype=torch.bfloat16)))
    with pytest.raises(IncompatibleCheckpointError, match=r"'bf16'.*dtype BF16, the base has F32"):
        check_compatible(base, {"bf16": bf16})

    path = save_tiny(tmp_path / "short", seed=3)
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompatibleCheckpointError, match=r"'lm_head\.weight' of the base is miss"):
        check_compatible(base, {"short": open_checkpoint(str(path))})

    wide = open_checkpoint(str(save_tiny(tmp_path / "wide", intermediate_size=48)))
    with pytest.raises(IncompatibleCheckpointError, match="intermediate_size = 48") as info:
        check_compatible(base, {"wide": wide})
    assert "and 6 more problems" in str(info.value)  # gate/up/down shapes of the 2 blocks


# ---- layer grouping --------------------------------------------------------------------------


def names_of(tmp_path: Path, model: torch.nn.Module) -> list[str]:
    model.save_pretrained(tmp_path)
    return list(open_checkpoint(str(tmp_path)).tensors)


def test_llama_and_qwen_layers(base: CheckpointCatalog, qwen_dir: Path) -> None:
    qwen = open_checkpoint(str(qwen_dir))
    for catalog in (base, qwen):
        groups = {g.name: g for g in catalog.layers}
        assert list(groups) == ["embed", "block.0", "block.1", "norm", "lm_head"]
        assert groups["embed"].tensor_names == ("model.embed_tokens.weight",)
        assert groups["norm"].tensor_names == ("model.norm.weight",)
        assert groups["lm_head"].tensor_names == ("lm_head.weight",)
        assert all(n.startswith("model.layers.1.") for n in groups["block.1"].tensor_names)
        assert sum(len(g.tensor_names) for g in catalog.layers) == len(catalog.tensors)


def test_gpt2_layers_with_tied_embeddings(tmp_path: Path) -> None:
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=3, n_head=2)
    names = names_of(tmp_path, GPT2LMHeadModel(config))
    assert "lm_head.weight" not in names  # tied: saved once, as the embedding
    groups = group_layers(names)
    assert [g.name for g in groups] == ["embed", "block.0", "block.1", "block.2", "norm"]
    assert set(groups[0].tensor_names) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert set(groups[-1].tensor_names) == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert all(n.startswith("transformer.h.2.") for n in groups[3].tensor_names)


def test_gpt_neox_layers(tmp_path: Path) -> None:
    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    groups = group_layers(names_of(tmp_path, GPTNeoXForCausalLM(config)))
    by_name = {g.name: g for g in groups}
    assert list(by_name) == ["embed", "block.0", "block.1", "norm", "lm_head"]
    assert by_name["embed"].tensor_names == ("gpt_neox.embed_in.weight",)
    assert by_name["lm_head"].tensor_names == ("embed_out.weight",)
    assert set(by_name["norm"].tensor_names) == {
        "gpt_neox.final_layer_norm.weight",
        "gpt_neox.final_layer_norm.bias",
    }


def test_grouping_rules_on_names() -> None:
    names = [
        "lm_head.weight",
        "model.layers.10.mlp.down_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.norm.weight",
        "model.rotary_emb.inv_freq",
        "model.embed_tokens.weight",
        "model.layers.2.self_attn.q_proj.weight",
    ]
    groups = group_layers(names)
    assert [(g.name, g.kind, g.index) for g in groups] == [
        ("embed", "embedding", None),
        ("block.2", "block", 2),
        ("block.10", "block", 10),  # numeric, not lexicographic order
        ("norm", "norm", None),
        ("lm_head", "lm_head", None),
        ("other", "other", None),
    ]
    assert groups[1].tensor_names == (
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.self_attn.q_proj.weight",
    )
    assert classify("model.decoder.layers.3.fc1.weight")[:2] == ("block", 3)  # OPT
    assert classify("model.decoder.final_layer_norm.weight")[0] == "norm"
    assert classify("transformer.blocks.0.ffn.up_proj.weight")[:2] == ("block", 0)  # MPT
    assert classify("model.final_layernorm.weight")[0] == "norm"  # Phi
    assert classify("transformer.word_embeddings.weight")[0] == "embedding"  # Falcon/BLOOM
    assert classify("model.layers.0.post_attention_layernorm.weight")[0] == "block"
