"""Dense + sparse decomposition of routed layers and the compact sparse encoding (METHOD.md §4)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load, save

from mediator_ray.merge import (
    SparseEntries,
    apply_sparse,
    decode_sparse,
    decompose,
    decompose_layer,
    encode_sparse,
    encoded_nbytes,
    estimate_encoded_nbytes,
    keep_count,
    reconstruction_error,
)

DENSITIES = [0.0, 0.01, 0.1, 0.5, 1.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _experts(n: int, shape, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [(base + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


@pytest.mark.parametrize(
    "numel,density,expected",
    [
        (100, 0.1, 10),
        (30, 0.1, 3),
        (10, 0.25, 3),
        (7, 1e-9, 1),
        (7, 0.0, 0),
        (7, 1.0, 7),
        (0, 0.5, 0),
    ],
)
def test_keep_count_is_ceil_of_d_numel(numel, density, expected):
    assert keep_count(numel, density) == expected


@pytest.mark.parametrize("shape", [(40, 30), (257,), ()])
@pytest.mark.parametrize("density", DENSITIES)
def test_decompose_keeps_documented_count_of_largest_differences(shape, density):
    experts = _experts(3, shape)
    dense, sparse = decompose(experts, density)
    torch.testing.assert_close(dense, torch.stack(experts).mean(0))
    numel = math.prod(shape)
    for expert, entries in zip(experts, sparse, strict=True):
        k = keep_count(numel, density)
        assert entries.nnz == k
        assert torch.all(entries.indices[1:] > entries.indices[:-1])  # ascending, unique
        assert torch.equal(entries.values, expert.reshape(-1)[entries.indices])
        diff = (expert - dense).abs().reshape(-1)
        if 0 < k < numel:  # every kept |θ_i − D| ≥ every dropped one
            kept = torch.zeros(numel, dtype=torch.bool)
            kept[entries.indices] = True
            assert diff[kept].min() >= diff[~kept].max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_density_one_reconstructs_exactly_after_storage(dtype):
    # Large spread of magnitudes so D + (θ − D) would not round-trip; θ-values storage does.
    experts = [e * torch.logspace(-6, 3, 64).reshape(8, 8) for e in _experts(3, (8, 8))]
    experts = [e.to(dtype) for e in experts]
    dense, sparse = decompose(experts, 1.0)
    stored_dense = dense.to(dtype)
    for expert, entries in zip(experts, sparse, strict=True):
        decoded = decode_sparse(load(save(encode_sparse(entries, dtype))))
        rebuilt = apply_sparse(stored_dense, [decoded], [1.0])
        assert rebuilt.dtype == dtype
        assert torch.equal(rebuilt, expert)
        assert reconstruction_error(expert, dense, entries) == 0.0


def test_reconstruction_error_matches_definition():
    experts = _experts(4, (30, 20), seed=3)
    dense, sparse = decompose(experts, 0.1)
    for expert, entries in zip(experts, sparse, strict=True):
        rebuilt = entries.reconstruct(dense)
        expected = (expert - rebuilt).norm() / (expert - dense).norm()
        assert reconstruction_error(expert, dense, entries) == pytest.approx(float(expected))
        assert 0 < reconstruction_error(expert, dense, entries) < 1
    same = [torch.ones(5), torch.ones(5)]
    dense, sparse = decompose(same, 0.5)
    assert reconstruction_error(same[0], dense, sparse[0]) == 0.0  # 0/0 defined as 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64,), (16, 48), (2, 3, 40), (5, 70000)])
@pytest.mark.parametrize("density", DENSITIES)
def test_encode_decode_round_trip(dtype, shape, density):
    experts = _experts(2, shape, dtype=dtype, seed=1)
    _, sparse = decompose(experts, density)
    entries = sparse[0]
    encoded = encode_sparse(entries, dtype)
    assert all(isinstance(t, torch.Tensor) for t in encoded.values())
    decoded = decode_sparse(load(save(encoded)))  # survives safetensors
    assert decoded.shape == tuple(shape)
    assert torch.equal(decoded.indices, entries.indices)
    assert decoded.values.dtype == dtype
    assert torch.equal(decoded.values, entries.values)
    assert encoded_nbytes(encoded) == estimate_encoded_nbytes(shape, density, dtype.itemsize)


def test_wide_rows_use_wider_column_indices():
    entries = decompose(_experts(2, (2, 70000)), 0.001)[1][0]
    encoded = encode_sparse(entries)
    assert encoded["col"].dtype == torch.int32
    narrow = encode_sparse(decompose(_experts(2, (4, 65536)), 0.001)[1][0])
    assert narrow["col"].dtype == torch.uint16
    assert narrow["row_ptr"].dtype == torch.int32


def test_bf16_costs_at_most_4_bytes_per_kept_entry_at_density_0_1():
    entries = decompose(_experts(3, (256, 512), dtype=torch.bfloat16), 0.1)[1][0]
    encoded = encode_sparse(entries, torch.bfloat16)
    assert encoded_nbytes(encoded) / entries.nnz <= 4.0
    assert "bitmap" in encoded  # numel/8 + 2·nnz beats 4·nnz + 4·rows at d = 0.1


def test_csr_chosen_when_sparse_and_bitmap_when_dense():
    low = encode_sparse(decompose(_experts(2, (256, 512)), 0.01)[1][0], torch.bfloat16)
    high = encode_sparse(decompose(_experts(2, (256, 512)), 0.5)[1][0], torch.bfloat16)
    assert "col" in low and "bitmap" not in low
    assert "bitmap" in high and "col" not in high
    assert low["col"].dtype == torch.uint16


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_sparse_matches_dense_computation(dtype):
    experts = _experts(3, (20, 33), dtype=dtype, seed=5)
    dense, sparse = decompose(experts, 0.3)
    stored = dense.to(dtype)
    weights = [0.6, 0.0, 0.4]
    expected = stored.float() + sum(
        w * s.delta(stored) for w, s in zip(weights, sparse, strict=True)
    )
    encoded = [encode_sparse(s, dtype) for s in sparse]
    got = apply_sparse(stored, encoded, weights, out_dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert apply_sparse(stored, sparse, weights).dtype == dtype
    assert torch.equal(apply_sparse(stored, sparse, [0.0, 0.0, 0.0]), stored)


def test_decompose_layer_and_delta():
    layers = [{"w": e, "b": e[0]} for e in _experts(2, (6, 9), seed=7)]
    dense, sparse = decompose_layer(layers, 0.2)
    assert set(dense) == {"w", "b"} and len(sparse) == 2
    assert sparse[1]["b"].nnz == keep_count(9, 0.2)
    delta = sparse[0]["w"].delta(dense["w"])
    assert int((delta != 0).sum()) <= sparse[0]["w"].nnz
    torch.testing.assert_close(
        delta.reshape(-1)[sparse[0]["w"].indices],
        (layers[0]["w"] - dense["w"]).reshape(-1)[sparse[0]["w"].indices],
    )


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        decompose([torch.zeros(3), torch.zeros(4)], 0.5)
    with pytest.raises(ValueError, match="density"):
        decompose([torch.zeros(3)], 1.5)
    entries = SparseEntries((3,), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shape"):
        apply_sparse(torch.zeros(4), [entries], [1.0])
    with pytest.raises(ValueError, match="not a sparse encoding"):
        decode_sparse({"shape": torch.tensor([3]), "values": torch.zeros(1)})
