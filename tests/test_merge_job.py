"""The distributed merge job on a real two-node Ray cluster: plan, outputs, S3, validation."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from merge_helpers import (
    decoded_sparse,
    manifest,
    object_bytes,
    read_checkpoint_tensors,
    zoo_config,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mediator_ray.config import load_config, parse_config
from mediator_ray.errors import ConfigError, IncompatibleCheckpointError
from mediator_ray.merge import apply_sparse
from mediator_ray.pipeline import run_merge
from mediator_ray.storage import LocalStore, copy_tree, open_store
from mediator_ray.testing import Zoo

pytestmark = pytest.mark.usefixtures("ray_cluster")
PROMPT = torch.tensor([[1, 17, 42, 99, 150, 230, 12, 3]])


def expert_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def mediator_run(tiny_zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("mediator") / "out"
    outcome = run_merge(zoo_config(tiny_zoo, str(out)), show_progress=False)
    return {"out": out, "manifest": outcome.manifest}


def test_plan_routes_exactly_the_planted_blocks_and_says_why(
    mediator_run: dict, tiny_zoo: Zoo
) -> None:
    m = mediator_run["manifest"]
    routed = [layer["name"] for layer in m["layers"] if layer["action"] == "route"]
    assert routed == [f"block.{i}" for i in tiny_zoo.conflict_blocks]
    assert m["plan"]["metric"] == "deviation"
    assert "ceil(0.25*8)=2" in m["plan"]["rule"]
    for layer in m["layers"]:
        assert 0.0 <= layer["conflict"]["deviation"] <= 1.0
        if layer["action"] == "route":
            assert layer["conflict"]["deviation"] > 0.6
            assert set(layer["recon_errors"]) == set(tiny_zoo.experts)
        else:
            assert layer["conflict"]["deviation"] < 0.1 and layer["recon_errors"] == {}
    # The committed manifest is the one returned, and written last.
    assert manifest(mediator_run["out"])["plan"] == m["plan"]


def test_report_files_describe_every_layer(mediator_run: dict) -> None:
    out: Path = mediator_run["out"]
    table = pq.read_table(out / "report" / "conflicts.parquet").to_pylist()
    layers = mediator_run["manifest"]["layers"]
    assert len(table) == 3 * len(layers)
    deciding = {r["layer"]: r for r in table if r["decided_by"]}
    assert {n for n, r in deciding.items() if r["action"] == "route"} == {"block.2", "block.5"}
    assert (out / "report" / "conflicts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dense_part_loads_with_transformers_and_is_the_expert_average(
    mediator_run: dict, tiny_zoo: Zoo
) -> None:
    model = AutoModelForCausalLM.from_pretrained(mediator_run["out"]).eval()
    with torch.no_grad():
        assert torch.isfinite(model(PROMPT).logits).all()
    dense = read_checkpoint_tensors(LocalStore(str(mediator_run["out"])))
    experts = [expert_tensors(p) for p in tiny_zoo.experts.values()]
    for name, tensor in dense.items():
        mean = torch.stack([e[name] for e in experts]).mean(0)
        torch.testing.assert_close(tensor, mean, rtol=0, atol=1e-6)


def test_sparse_experts_keep_density_entries(mediator_run: dict, tiny_zoo: Zoo) -> None:
    store = LocalStore(str(mediator_run["out"]))
    routed = {f"model.layers.{i}." for i in tiny_zoo.conflict_blocks}
    for expert in tiny_zoo.experts:
        sparse = decoded_sparse(store, expert)
        assert sparse and all(any(n.startswith(p) for p in routed) for n in sparse)
        for name, entries in sparse.items():
            assert entries.nnz == max(1, -(-entries.numel // 10)), name  # ceil(0.1·numel)


def test_density_one_reconstructs_every_expert_exactly(tiny_zoo: Zoo, tmp_path: Path) -> None:
    out = tmp_path / "d1"
    config = zoo_config(tiny_zoo, str(out), options={"sparse": {"density": 1.0}})
    run_merge(config, show_progress=False)
    store = LocalStore(str(out))
    dense = read_checkpoint_tensors(store)
    for expert, path in tiny_zoo.experts.items():
        original = expert_tensors(path)
        for name, entries in decoded_sparse(store, expert).items():
            rebuilt = apply_sparse(dense[name], [entries], [1.0])
            assert torch.equal(rebuilt, original[name]), (expert, name)


def test_s3_to_s3_is_byte_identical_to_local_and_fetches_each_byte_once(
    tiny_zoo: Zoo, mediator_run: dict, s3_bucket: str
) -> None:
    copy_tree(LocalStore(str(tiny_zoo.root)), open_store(f"{s3_bucket}/zoo"))
    config = zoo_config(
        tiny_zoo,
        f"{s3_bucket}/out",
        base=f"{s3_bucket}/zoo/base",
        experts={name: f"{s3_bucket}/zoo/experts/{name}" for name in tiny_zoo.experts},
    )
    m = run_merge(config, show_progress=False).manifest
    assert object_bytes(f"{s3_bucket}/out") == object_bytes(str(mediator_run["out"]))
    assert m["plan"] == mediator_run["manifest"]["plan"]
    stats = m["stats"]
    assert stats["input_bytes"] <= stats["bytes_fetched"] <= 1.05 * stats["input_bytes"]


def test_layers_are_built_on_both_nodes(mediator_run: dict) -> None:
    nodes = {layer["node_id"] for layer in mediator_run["manifest"]["layers"]}
    assert len(nodes) == 2


def test_config_on_s3_and_baseline_method(tiny_zoo: Zoo, s3_bucket: str, tmp_path: Path) -> None:
    text = (
        f"base: {tiny_zoo.base}\n"
        "experts:\n"
        + "".join(f"  - {{name: {n}, uri: {p}}}\n" for n, p in tiny_zoo.experts.items())
        + f"method: task_arithmetic\noptions: {{lambda: 0.5}}\noutput: {tmp_path / 'ta'}\n"
        "dtype: bfloat16\n"
    )
    open_store(s3_bucket).write_text("configs/ta.yaml", text)
    config = load_config(f"{s3_bucket}/configs/ta.yaml")
    m = run_merge(config, show_progress=False).manifest
    assert m["method"] == "task_arithmetic" and {x["action"] for x in m["layers"]} == {"average"}
    merged = read_checkpoint_tensors(LocalStore(str(tmp_path / "ta")))
    base = expert_tensors(tiny_zoo.base)
    experts = [expert_tensors(p) for p in tiny_zoo.experts.values()]
    name = "model.layers.3.mlp.up_proj.weight"
    expected = base[name] + 0.5 * sum(e[name] - base[name] for e in experts)
    assert merged[name].dtype == torch.bfloat16
    torch.testing.assert_close(merged[name].float(), expected.to(torch.bfloat16).float())
    assert not (tmp_path / "ta" / "experts").exists()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"method": "average"}, "method: Input should be 'mediator'"),
        ({"experts": []}, "experts: List should have at least 1 item"),
        (
            {"options": {"sparse": {"density": 0}}},
            "options.sparse.density: Input should be greater",
        ),
        ({"options": {"plan": {"route_fraction": 2}}}, "options.plan.route_fraction"),
        ({"dtype": "int8"}, "dtype: Input should be 'bfloat16'"),
        ({"options": {"weights": [1, 2]}}, "options.weights: 2 values for 4 experts"),
        ({"compute": {"device": "tpu"}}, "compute.device"),
        ({"output_dir": "x"}, "output_dir: Extra inputs are not permitted"),
    ],
)
def test_bad_configs_name_the_key(tiny_zoo: Zoo, tmp_path: Path, patch: dict, message: str) -> None:
    data = {
        "base": str(tiny_zoo.base),
        "experts": [{"name": n, "uri": str(p)} for n, p in tiny_zoo.experts.items()],
        "output": str(tmp_path / "out"),
    }
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config(data | patch)


def test_bad_yaml_and_duplicate_expert_names(tiny_zoo: Zoo, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read merge config"):
        load_config(str(tmp_path / "missing.yaml"))
    duplicate = {
        "base": str(tiny_zoo.base),
        "experts": [{"name": "math", "uri": "a"}, {"name": "math", "uri": "b"}],
        "output": str(tmp_path / "o"),
    }
    with pytest.raises(ConfigError, match=r"experts: duplicate names \['math'\]"):
        parse_config(duplicate)
    same_as_input = duplicate | {
        "experts": [{"name": "a", "uri": "/x"}, {"name": "b", "uri": "/y"}],
        "output": "/y/",
    }
    with pytest.raises(ConfigError, match="output: /y/ is also the input 'b'"):
        parse_config(same_as_input)


def test_incompatible_expert_fails_before_any_task(tiny_zoo: Zoo, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    copy_tree(LocalStore(str(tiny_zoo.experts["code"])), LocalStore(str(broken)))
    name = "model.layers.4.mlp.up_proj.weight"
    shard = next(p for p in sorted(broken.glob("*.safetensors")) if name in load_file(p))
    tensors = load_file(shard)
    tensors[name] = tensors[name][:-1]  # one row short
    save_file(tensors, shard, metadata={"format": "pt"})
    _fix_index_sizes(broken)
    out = tmp_path / "out"
    experts = {n: str(p) for n, p in tiny_zoo.experts.items()} | {"code": str(broken)}
    with pytest.raises(IncompatibleCheckpointError, match=rf"expert 'code'.*{name}.*shape"):
        run_merge(zoo_config(tiny_zoo, str(out), experts=experts), show_progress=False)
    assert not out.exists()  # nothing was written, no task ran


def _fix_index_sizes(folder: Path) -> None:
    """Keep the edited checkpoint valid as a checkpoint (only the shape is wrong)."""
    import json

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    total = sum(
        t.numel() * t.element_size()
        for f in folder.glob("*.safetensors")
        for t in load_file(f).values()
    )
    index["metadata"]["total_size"] = total
    index_path.write_text(json.dumps(index))
