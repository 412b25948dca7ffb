"""Sharded Hugging Face output: loads with transformers, commits marker-last, supports resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mediator_ray.checkpoint import (
    CheckpointCatalog,
    CheckpointWriter,
    ShardRecord,
    open_checkpoint,
    plan_shards,
    read_header,
    read_tensors,
    save_checkpoint,
    serialize_tensors,
    shard_name,
)
from mediator_ray.errors import CheckpointFormatError
from mediator_ray.storage import LocalStore

CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
PROMPT = torch.tensor([[1, 5, 9, 33, 70, 127, 2, 64]])


class RecordingStore(LocalStore):
    """A local store that remembers the order in which objects were written."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.written: list[str] = []

    def _put(self, key: str, data) -> None:
        super()._put(key, data)
        self.written.append(key)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, CheckpointCatalog]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    path = tmp_path_factory.mktemp("src") / "llama"
    model.save_pretrained(path, max_shard_size="50KB")
    return model, open_checkpoint(str(path))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def test_shard_names_and_plan() -> None:
    assert shard_name(1, 3) == "model-00001-of-00003.safetensors"
    assert shard_name(12, 12) == "model-00012-of-00012.safetensors"
    with pytest.raises(ValueError):
        shard_name(0, 3)
    sizes = [("a", 40), ("b", 40), ("c", 30), ("d", 200), ("e", 10)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards(sizes, 10_000) == [["a", "b", "c", "d", "e"]]


def test_saved_state_dict_loads_in_transformers_with_identical_logits(
    source, tmp_path: Path
) -> None:
    model, catalog = source
    store = RecordingStore(str(tmp_path / "out"))
    records = save_checkpoint(model.state_dict(), store, copy_from=catalog, max_shard_bytes=40_000)
    assert len(records) >= 3
    n = len(records)
    assert [r.file for r in records] == [shard_name(k, n) for k in range(1, n + 1)]
    assert store.written[-1] == "_COMPLETE"
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(
        store.written[:-1]
    )

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(loaded), logits(model))

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == sorted(model.state_dict())
    assert index["metadata"]["total_size"] == catalog.total_bytes
    assert read_header(store, records[0].file).metadata["format"] == "pt"
    # the output is itself a valid input
    again = open_checkpoint(store)
    assert {n: r.shape for n, r in again.tensors.items()} == {
        n: r.shape for n, r in catalog.tensors.items()
    }


def test_tensors_read_by_our_reader_round_trip_bit_exactly(source, tmp_path: Path) -> None:
    _, catalog = source
    tensors = read_tensors(catalog.store, list(catalog.tensors.values()))
    bf16 = {name: t.to(torch.bfloat16) for name, t in tensors.items()}
    config = dict(catalog.config, dtype="bfloat16")
    out = LocalStore(str(tmp_path / "bf16"))
    save_checkpoint(
        bf16,
        out,
        copy_from=catalog,
        max_shard_bytes=20_000,
        extra_files={"config.json": json.dumps(config).encode()},
    )
    result = open_checkpoint(out)
    assert result.config["dtype"] == "bfloat16"
    for name, tensor in read_tensors(out, list(result.tensors.values())).items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, bf16[name]), name


def test_marker_is_removed_by_begin_and_written_last_by_commit(source, tmp_path: Path) -> None:
    model, catalog = source
    store = RecordingStore(str(tmp_path / "out"))
    records = save_checkpoint(model.state_dict(), store, copy_from=catalog)
    writer = CheckpointWriter(store)
    assert writer.is_complete()

    writer.begin()  # a rerun starts: the old output must stop counting as complete
    assert not writer.is_complete()
    assert store.exists("model.safetensors.index.json")  # old files stay, only unmarked
    store.written.clear()
    writer.commit(records, copy_from=catalog, marker_content=b'{"run": 2}')
    assert writer.is_complete()
    assert store.written[-1] == "_COMPLETE"
    assert store.read("_COMPLETE") == b'{"run": 2}'


def test_commit_refuses_a_missing_or_wrong_shard(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    writer = CheckpointWriter(store, marker="DONE")
    writer.begin()
    record = writer.write_shard(shard_name(1, 2), {"a": torch.ones(3)})
    missing = ShardRecord(shard_name(2, 2), ("b",), 12, 100, "0" * 64)
    with pytest.raises(CheckpointFormatError, match=r"model-00002-of-00002.*found nothing"):
        writer.commit([record, missing])
    assert not writer.is_complete()
    with pytest.raises(CheckpointFormatError, match=r"tensor 'a' written to both"):
        writer.commit([record, record])
    writer.commit([record])
    assert writer.is_complete() and store.exists("DONE")


def test_shard_is_current_detects_corruption(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    writer = CheckpointWriter(store)
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    record = writer.write_shard(shard_name(1, 1), tensors)
    assert record.tensor_bytes == 48 and record.file_size == (tmp_path / record.file).stat().st_size
    assert writer.shard_is_current(record)
    assert writer.shard_is_current(record.file, record.sha256)

    path = tmp_path / record.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte in the data
    path.write_bytes(bytes(data))
    assert not writer.shard_is_current(record)
    assert not writer.shard_is_current(record.file, record.sha256)
    path.write_bytes(bytes(data[:-4]))
    assert not writer.shard_is_current(record)
    path.unlink()
    assert not writer.shard_is_current(record)


def test_serialize_handles_views_shared_storage_and_metadata() -> None:
    base = torch.randn(4, 6)
    tensors = {
        "embed": base,
        "tied": base,  # same storage, as tied weights in a state_dict
        "transposed": base.t(),  # not contiguous
        "scalar": torch.tensor(2.0, dtype=torch.float16),
        "empty": torch.zeros(0, 3),
    }
    data = serialize_tensors(tensors, {"note": "x"})
    loaded = load(data)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
    assert metadata == {"format": "pt", "note": "x"}


def test_save_checkpoint_of_a_single_tensor(tmp_path: Path) -> None:
    records = save_checkpoint({"x": torch.ones(2)}, LocalStore(str(tmp_path)))
    assert [r.file for r in records] == ["model-00001-of-00001.safetensors"]
    assert torch.equal(load_file(tmp_path / records[0].file)["x"], torch.ones(2))
    assert (tmp_path / "_COMPLETE").exists()
    with pytest.raises(ValueError, match="no tensors"):
        save_checkpoint({}, LocalStore(str(tmp_path / "empty")))


def test_serialization_is_deterministic_and_loads_with_safetensors() -> None:
    """Same tensors and metadata → same bytes, whatever the insertion order (resume and
    S3-vs-local equality compare bytes); the bytes are a valid safetensors file."""
    tensors = {
        "b.weight": torch.randn(3, 5, dtype=torch.bfloat16),
        "a.bias": torch.arange(7, dtype=torch.float32),
        "c.idx": torch.tensor([1, 65535], dtype=torch.uint16),
        "d.empty": torch.zeros(0, 4),
    }
    one = serialize_tensors(tensors, {"layer": "block.1", "action": "route", "expert": "x"})
    reordered = dict(reversed(list(tensors.items())))
    two = serialize_tensors(reordered, {"expert": "x", "action": "route", "layer": "block.1"})
    assert one == two
    loaded = load(one)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    header_len = int.from_bytes(one[:8], "little")
    header = json.loads(one[8 : 8 + header_len])
    assert header_len % 8 == 0
    assert header["__metadata__"] == {
        "action": "route",
        "expert": "x",
        "format": "pt",
        "layer": "block.1",
    }
