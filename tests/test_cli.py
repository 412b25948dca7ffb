"""The ``mediator-ray`` command line: merge, inspect (table and --json), clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from merge_helpers import manifest, write_calibration, zoo_config
from typer.testing import CliRunner

from mediator_ray.cli import app
from mediator_ray.testing import Zoo

runner = CliRunner()


@pytest.fixture(scope="module")
def merged(tiny_qwen_zoo: Zoo, tmp_path_factory: pytest.TempPathFactory, ray_cluster) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    config = {
        "base": str(tiny_qwen_zoo.base),
        "experts": [{"name": n, "uri": str(p)} for n, p in tiny_qwen_zoo.experts.items()],
        "method": "mediator",
        "options": {"plan": {"route_fraction": 0.5}},
        "output": str(folder / "out"),
        "dtype": "bfloat16",
    }
    (folder / "merge.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["merge", str(folder / "merge.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    return folder / "out"


def test_merge_then_inspect_json(merged: Path, tiny_qwen_zoo: Zoo) -> None:
    result = runner.invoke(app, ["inspect", str(merged), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    routed = [layer["name"] for layer in payload["layers"] if layer["action"] == "route"]
    assert routed == [f"block.{i}" for i in tiny_qwen_zoo.conflict_blocks]
    assert payload["expert_names"] == list(tiny_qwen_zoo.experts)
    assert payload["dtype"] == "bfloat16"
    assert "ceil(0.5*4)=2" in payload["plan"]["rule"]


def test_inspect_table_shows_routes_and_summary(merged: Path) -> None:
    result = runner.invoke(app, ["inspect", str(merged)], terminal_width=160)
    assert result.exit_code == 0, result.output
    assert "route" in result.stdout and "deviation" in result.stdout
    assert (
        "layers averaged / routed" in result.stdout and "5 / 2" in result.stdout
    )  # 7 layers: embed, 4 blocks, norm, lm_head


def test_failures_are_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "x", "experts": [], "output": "y"}))
    result = runner.invoke(app, ["merge", str(bad)])
    assert result.exit_code == 2
    assert "experts: List should have at least 1 item" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a committed mediator-ray checkpoint" in result.output


def test_a_config_is_validated_without_importing_torch(tmp_path: Path) -> None:
    """A bad config fails in well under a second: validating one needs no torch (~1.2 s)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "x", "experts": [{"name": "a"}], "output": "y"}))
    result = _run_in_fresh_python(f"rc = run_merge_command({str(bad)!r})\nassert rc == 2, rc\n")
    assert "experts.0.uri: Field required" in result


def test_the_merge_driver_never_imports_torch(
    tiny_qwen_zoo: Zoo, tmp_path: Path, ray_cluster
) -> None:
    """The whole job — catalog, both passes, plan, commit and the router fit — as run by
    ``jobs/merge.py``: tensors live in the workers only. (A job driver that loads torch after
    ``ray.init()`` can abort on a fresh cluster; see ``raysession.ensure_ray``.)"""
    calibration = write_calibration(tmp_path / "cal", tiny_qwen_zoo)
    config = zoo_config(tiny_qwen_zoo, str(tmp_path / "out"), options={"sparse": {"density": 1}})
    data = config.model_dump(mode="json", by_alias=True)
    for expert in data["experts"]:
        expert["calibration"] = calibration[expert["name"]]
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(data))
    code = f"rc = run_merge_command({str(tmp_path / 'merge.yaml')!r}, show_progress=False)\n"
    _run_in_fresh_python(code + "assert rc == 0, rc\n")  # attaches to RAY_ADDRESS
    assert manifest(tmp_path / "out")["router"]["heldout_accuracy"] > 0.5


def _run_in_fresh_python(code: str) -> str:
    """Run ``code`` after importing the CLI in a new interpreter; it must end without torch
    or transformers imported. Returns the output."""
    import subprocess
    import sys

    check = "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    script = "import sys\nfrom mediator_ray.cli import run_merge_command\n" + code + check
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr
