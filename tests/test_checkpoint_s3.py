"""Checkpoint I/O against a real S3 API (moto on 127.0.0.1): exact bytes, exact byte counts."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mediator_ray.checkpoint import (
    header_read_bytes,
    open_checkpoint,
    read_tensors,
    save_checkpoint,
)
from mediator_ray.storage import LocalStore, copy_tree, open_store
from mediator_ray.testing import Zoo

PROMPT = torch.tensor([[1, 7, 42, 99, 150, 230, 12, 3]])


def upload(folder: Path, uri: str) -> None:
    copy_tree(LocalStore(str(folder)), open_store(uri))


def test_ranged_reads_from_s3_equal_load_file_and_fetch_only_what_is_asked(
    tiny_bf16_zoo: Zoo, s3_bucket: str
) -> None:
    uri = f"{s3_bucket}/zoo/math"
    upload(tiny_bf16_zoo.experts["math"], uri)
    catalog = open_checkpoint(uri)
    store = catalog.store
    header_bytes = sum(header_read_bytes(h) for h in catalog.headers.values())
    config_bytes = store.size("config.json") + store.size("model.safetensors.index.json")
    assert store.stats.bytes_read == header_bytes + config_bytes  # catalog: metadata only

    # A subset: one block. Exactly its tensor bytes are fetched, nothing else.
    store.stats.reset()
    block = catalog.layer("block.2")
    refs = catalog.refs(block)
    subset = read_tensors(store, refs)
    assert store.stats.bytes_read == sum(ref.nbytes for ref in refs)

    # Everything: identical to safetensors' own loader on the same files.
    store.stats.reset()
    ours = read_tensors(store, list(catalog.tensors.values()))
    reference: dict[str, torch.Tensor] = {}
    for file in catalog.files:
        reference.update(load_file(tiny_bf16_zoo.experts["math"] / file))
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype == torch.bfloat16
        assert torch.equal(ours[name], tensor), name
    assert store.stats.bytes_read == sum(ref.nbytes for ref in catalog.tensors.values())
    for name in block.tensor_names:
        assert torch.equal(subset[name], reference[name])


def test_writer_output_on_s3_loads_with_transformers_and_matches_logits(
    tiny_zoo: Zoo, s3_bucket: str, tmp_path: Path
) -> None:
    source_path = tiny_zoo.experts["code"]
    model = AutoModelForCausalLM.from_pretrained(source_path).eval()
    source = open_checkpoint(str(source_path))
    out = open_store(f"{s3_bucket}/written")
    records = save_checkpoint(model.state_dict(), out, copy_from=source, max_shard_bytes=200_000)
    assert len(records) >= 3 and out.exists("_COMPLETE")

    local = tmp_path / "downloaded"
    copy_tree(out, LocalStore(str(local)))
    reloaded = AutoModelForCausalLM.from_pretrained(local).eval()
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, reloaded(PROMPT).logits)
