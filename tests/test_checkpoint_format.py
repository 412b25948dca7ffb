"""Safetensors headers read by range reads: exact tensors, exact byte counts, strict errors."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mediator_ray.checkpoint import (
    DTYPES,
    HEADER_PROBE_BYTES,
    MAX_HEADER_BYTES,
    TensorRef,
    header_read_bytes,
    parse_header,
    read_header,
    read_tensor,
    read_tensors,
    serialize_tensors,
)
from mediator_ray.errors import CheckpointFormatError, StorageError
from mediator_ray.storage import LocalStore, StorageOptions


def raw_file(header: dict, data: bytes, *, pad_to: int = 0) -> bytes:
    """A safetensors file built by hand, so it can be made wrong on purpose."""
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % pad_to if pad_to else 0)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def put(tmp_path: Path, name: str, content: bytes) -> LocalStore:
    (tmp_path / name).write_bytes(content)
    return LocalStore(str(tmp_path))


def f32(n: int, begin: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


@pytest.fixture
def mixed_file(tmp_path: Path) -> tuple[LocalStore, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "w.fp16": torch.randn(3, 4, 2, generator=gen).to(torch.float16),
        "w.fp32": torch.randn(11, generator=gen),
        "w.fp64": torch.randn(2, 2, generator=gen, dtype=torch.float64),
        "ids.i64": torch.arange(5, dtype=torch.int64),
        "ids.i32": torch.arange(3, dtype=torch.int32) - 1,
        "ids.i16": torch.arange(3, dtype=torch.int16),
        "ids.i8": torch.tensor([-3, 4], dtype=torch.int8),
        "bytes.u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "mask.bool": torch.tensor([[True, False, True]]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return LocalStore(str(tmp_path)), tensors


def test_dtype_table_covers_the_spec_codes() -> None:
    assert set(DTYPES) == {
        "F32",
        "F16",
        "BF16",
        "F64",
        "I64",
        "I32",
        "I16",
        "I8",
        "U8",
        "U16",
        "BOOL",
    }  # U16: sparse-expert columns


def test_reader_matches_safetensors_exactly(mixed_file, tmp_path: Path) -> None:
    store, _ = mixed_file
    header = read_header(store, "model.safetensors")
    assert header.metadata == {"format": "pt"}
    ours = read_tensors(store, list(header.tensors.values()))
    reference = load_file(tmp_path / "model.safetensors")
    assert ours.keys() == reference.keys()
    for name, expected in reference.items():
        assert ours[name].dtype == expected.dtype, name
        assert ours[name].shape == expected.shape, name
        assert torch.equal(ours[name], expected), name
    assert ours["scalar"].dim() == 0
    assert ours["empty"].shape == (0, 4)


def test_refs_carry_absolute_offsets(mixed_file) -> None:
    store, tensors = mixed_file
    header = read_header(store, "model.safetensors")
    ref = header.tensors["w.bf16"]
    assert ref.file == "model.safetensors"
    assert (ref.dtype, ref.shape, ref.numel, ref.nbytes) == ("BF16", (7, 5), 35, 70)
    assert ref.torch_dtype is torch.bfloat16
    assert ref.start >= 8 + header.header_len
    raw = store.read_range("model.safetensors", ref.start, ref.end)
    assert torch.equal(
        torch.frombuffer(bytearray(raw), dtype=torch.bfloat16), tensors["w.bf16"].flatten()
    )
    # header.tensors is in file order and tiles the data section
    refs = list(header.tensors.values())
    assert refs[0].start == 8 + header.header_len
    assert all(a.end == b.start for a, b in itertools.pairwise(refs))
    assert refs[-1].end == header.file_size


def test_subset_read_counts_exactly_header_plus_requested_bytes(mixed_file) -> None:
    store, tensors = mixed_file
    store.stats.reset()
    header = read_header(store, "model.safetensors")
    assert store.stats.bytes_read == header_read_bytes(header) and store.stats.read_requests == 1
    wanted = [header.tensors["w.fp16"], header.tensors["mask.bool"], header.tensors["ids.i64"]]
    got = read_tensors(store, wanted)
    assert store.stats.bytes_read == header_read_bytes(header) + sum(r.nbytes for r in wanted)
    assert torch.equal(got["w.fp16"], tensors["w.fp16"])
    assert torch.equal(got["mask.bool"], tensors["mask.bool"])
    assert torch.equal(read_tensor(store, header.tensors["scalar"]), tensors["scalar"])


def test_reader_survives_small_parts_and_coalescing(tmp_path: Path) -> None:
    """Tensors split over parts and merged across neighbours still come back exact."""
    options = StorageOptions(part_size=64 * 1024, coalesce_gap=1024, concurrency=4)
    store = LocalStore(str(tmp_path), options)
    big = {"big": torch.randn(300, 300), "small": torch.randn(3)}
    save_file(big, tmp_path / "big.safetensors")
    header = read_header(store, "big.safetensors")
    got = read_tensors(store, list(header.tensors.values()))
    assert torch.equal(got["big"], big["big"]) and torch.equal(got["small"], big["small"])


def test_trailing_space_padding_is_accepted(tmp_path: Path) -> None:
    content = raw_file({"a": f32(2, 0)}, struct.pack("<2f", 1.0, 2.0), pad_to=8)
    store = put(tmp_path, "x.safetensors", content)
    header = read_header(store, "x.safetensors")
    assert torch.equal(read_tensor(store, header.tensors["a"]), torch.tensor([1.0, 2.0]))


# ---- bad input: each problem has its own clear error ----------------------------------------


def expect_error(tmp_path: Path, content: bytes, *fragments: str) -> str:
    store = put(tmp_path, "bad.safetensors", content)
    with pytest.raises(CheckpointFormatError) as info:
        read_header(store, "bad.safetensors")
    message = str(info.value)
    assert "bad.safetensors" in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_file_shorter_than_the_length_prefix(tmp_path: Path) -> None:
    expect_error(tmp_path, b"\x10\x00\x00", "truncated", "3 bytes")


def test_data_section_cut_short(mixed_file, tmp_path: Path) -> None:
    content = (tmp_path / "model.safetensors").read_bytes()
    header = read_header(LocalStore(str(tmp_path)), "model.safetensors")
    last = list(header.tensors)[-1]
    expect_error(tmp_path, content[:-3], "truncated", repr(last))


def test_garbage_header(tmp_path: Path) -> None:
    body = b"{this is not json}"
    expect_error(tmp_path, struct.pack("<Q", len(body)) + body + b"\0" * 4, "not valid JSON")
    body = b"\xff\xfe garbage"
    expect_error(tmp_path, struct.pack("<Q", len(body)) + body, "not a JSON object")
    body = b'{"a": "\xff"}'
    expect_error(tmp_path, struct.pack("<Q", len(body)) + body, "not valid UTF-8")
    body = b"[1, 2]"
    expect_error(tmp_path, struct.pack("<Q", len(body)) + body, "not a JSON object")


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    expect_error(tmp_path, struct.pack("<Q", 1000) + b"{}", "header length 1000 past end of file")
    expect_error(tmp_path, struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "limit")


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {"a": f32(2, 0), "b": f32(2, 4)}
    expect_error(tmp_path, raw_file(header, b"\0" * 12), "'b'", "overlap tensor 'a'")


def test_hole_and_trailing_bytes(tmp_path: Path) -> None:
    expect_error(tmp_path, raw_file({"a": f32(1, 4)}, b"\0" * 8), "'a'", "hole")
    expect_error(tmp_path, raw_file({"a": f32(1, 0)}, b"\0" * 8), "belong to no tensor")


def test_unknown_dtype(tmp_path: Path) -> None:
    header = {"q": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
    expect_error(tmp_path, raw_file(header, b"\0" * 4), "'q'", "dtype 'F8_E4M3'")


def test_size_does_not_match_shape(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}}
    expect_error(tmp_path, raw_file(header, b"\0" * 4), "'a'", "needs 6")


def test_malformed_entries(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}
    expect_error(tmp_path, raw_file(header, b"\0" * 4), "'a'", "exactly dtype, shape")
    header = {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}
    expect_error(tmp_path, raw_file(header, b"\0" * 4), "'a'", "non-negative")
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}
    expect_error(tmp_path, raw_file(header, b"\0" * 4), "'a'", "end before they begin")
    header = {"__metadata__": {"format": 1}, "a": f32(1, 0)}
    expect_error(tmp_path, raw_file(header, b"\0" * 4), "__metadata__")


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    body = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
    body += b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    expect_error(tmp_path, struct.pack("<Q", len(body)) + body + b"\0\0", "duplicate key 'a'")


def test_parse_header_names_the_given_location() -> None:
    body = json.dumps({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}).encode()
    with pytest.raises(CheckpointFormatError, match=r"s3://bucket/m/model.safetensors: tensor 'a'"):
        parse_header(
            body,
            len(body),
            8 + len(body) + 1,
            "model.safetensors",
            location="s3://bucket/m/model.safetensors",
        )


def test_reader_rejects_a_short_buffer(tmp_path: Path) -> None:
    store = put(tmp_path, "x.safetensors", raw_file({"a": f32(2, 0)}, b"\0" * 8))
    size = (tmp_path / "x.safetensors").stat().st_size
    ref = TensorRef("a", "F32", (4,), "x.safetensors", size - 8, size + 8)  # runs past the end
    with pytest.raises(StorageError, match=r"x\.safetensors"):
        read_tensors(store, [ref])


def test_a_header_longer_than_the_probe_takes_a_second_read(tmp_path: Path) -> None:
    many = {f"t{i:05d}.weight": torch.zeros(1) for i in range(3000)}  # ~150 KB of header
    (tmp_path / "model.safetensors").write_bytes(serialize_tensors(many))
    store = LocalStore(str(tmp_path))
    header = read_header(store, "model.safetensors")
    assert header.header_len > HEADER_PROBE_BYTES
    assert store.stats.read_requests == 2
    assert store.stats.bytes_read == 8 + header.header_len == header_read_bytes(header)
    assert list(header.tensors) == sorted(many)
