"""The expert registry on local folders and on S3 (moto): records, validation, atomicity, CLI.

Every refused ``add`` must leave the registry exactly as it was, so each failure test compares
the store's full object listing (and the bytes of ``registry.json``) before and after.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import typer
from typer.testing import CliRunner

from mediator_ray.checkpoint import open_checkpoint
from mediator_ray.errors import IncompatibleCheckpointError
from mediator_ray.registry import (
    RECORD_FILE,
    REGISTRY_FILE,
    ExpertRecord,
    Registry,
    RegistryError,
    RegistryInfo,
    base_fingerprint,
)
from mediator_ray.registry.cli import registry_app
from mediator_ray.storage import LocalStore, copy_tree, open_store
from mediator_ray.testing import Zoo, ZooSpec, build_zoo

#: The registered models: small and one shard each, so cataloguing them on moto is quick.
ZOO_SPEC = ZooSpec(
    num_layers=2, experts=("math", "code", "chat"), conflict_blocks=(1,), max_shard_size="10MB"
)
#: Models of another layout (hidden size 32): incompatible with ``ZOO_SPEC``'s.
OTHER_SPEC = ZooSpec(
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    experts=("math", "code"),
    conflict_blocks=(1,),
    max_shard_size="10MB",
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return build_zoo(tmp_path_factory.mktemp("zoo-registry"), ZOO_SPEC)


@pytest.fixture(scope="module")
def other_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return build_zoo(tmp_path_factory.mktemp("zoo-other"), OTHER_SPEC)


@dataclass(frozen=True)
class Models:
    """URIs of the models the tests register, on one kind of store."""

    base: str
    math: str
    code: str
    chat: str
    other_base: str
    other_math: str
    calibration: str


def _local_models(zoo: Zoo, other: Zoo, calibration: Path) -> Models:
    return Models(
        base=str(zoo.base),
        math=str(zoo.experts["math"]),
        code=str(zoo.experts["code"]),
        chat=str(zoo.experts["chat"]),
        other_base=str(other.base),
        other_math=str(other.experts["math"]),
        calibration=str(calibration),
    )


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "math.jsonl"
    path.write_text('{"prompt": "1 + 1 ="}\n')
    return path


@pytest.fixture(scope="module")
def s3_models(s3_server: str, zoo: Zoo, other_zoo: Zoo, calibration_file: Path) -> Models:
    """The same models copied once into an S3 bucket (the registry gets a fresh bucket)."""
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    local = _local_models(zoo, other_zoo, calibration_file)
    uris = {}
    for field, path in vars(local).items():
        uri = f"s3://{bucket}/{field}"
        if field == "calibration":
            uri += ".jsonl"
            open_store(f"s3://{bucket}").write(uri.rsplit("/", 1)[1], Path(path).read_bytes())
        else:
            copy_tree(LocalStore(path), open_store(uri))
        uris[field] = uri
    return Models(**uris)


@pytest.fixture(params=["local", "s3"])
def setup(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    zoo: Zoo,
    other_zoo: Zoo,
    calibration_file: Path,
) -> tuple[Registry, Models]:
    """An empty registry plus models, both on the local disk or both on S3."""
    if request.param == "local":
        return Registry(str(tmp_path / "registry")), _local_models(zoo, other_zoo, calibration_file)
    bucket: str = request.getfixturevalue("s3_bucket")
    return Registry(f"{bucket}/registry"), request.getfixturevalue("s3_models")


def snapshot(registry: Registry) -> dict[str, bytes]:
    """Every object of the registry with its bytes: what must not change on a refused add."""
    return {key: registry.store.read(key) for key in registry.store.list()}


# ---- the happy path ---------------------------------------------------------------------------


def test_add_list_get_remove(setup: tuple[Registry, Models]) -> None:
    registry, m = setup
    assert registry.list() == [] and registry.info() is None

    math = registry.add("math", m.math, base_uri=m.base, calibration=m.calibration)
    time.sleep(0.002)  # distinct created_at, so the order below is by time, not by name
    code = registry.add("code", m.code)  # the base is known from now on
    assert isinstance(math, ExpertRecord)
    assert (math.uri, math.calibration, code.calibration) == (m.math, m.calibration, None)

    info = registry.info()
    assert info is not None and info.base_uri == m.base
    fingerprint = base_fingerprint(open_checkpoint(m.base))
    assert info.base_fingerprint == fingerprint == math.base_fingerprint == code.base_fingerprint

    assert [r.name for r in registry.list()] == ["math", "code"]  # oldest first, not by name
    assert registry.list() == [math, code]
    assert registry.get("code") == code
    assert registry.store.list() == sorted(
        [f"code/{RECORD_FILE}", f"math/{RECORD_FILE}", REGISTRY_FILE]
    )
    # The record is plain JSON that other tools (the scheduled job, jq) can read.
    raw = json.loads(registry.store.read_text(f"math/{RECORD_FILE}"))
    assert raw["name"] == "math" and raw["uri"] == m.math and raw["created_at"]

    # A new client of the same prefix sees the same registry.
    assert Registry(registry.uri).list() == [math, code]

    assert registry.remove("math") == math
    assert registry.list() == [code]
    with pytest.raises(RegistryError, match=r"no expert 'math' in registry .*registered: code"):
        registry.get("math")
    with pytest.raises(RegistryError, match="no expert 'math'"):
        registry.remove("math")
    # Removing the last expert keeps the base: the registry still belongs to it.
    registry.remove("code")
    assert registry.list() == [] and registry.info() == info


def test_list_orders_by_time_then_name(tmp_path: Path, zoo: Zoo) -> None:
    registry = Registry(str(tmp_path / "registry"))
    for name in ("code", "chat"):
        registry.add(name, str(zoo.experts[name]), base_uri=str(zoo.base))
    stamp = registry.get("code").created_at
    for name in ("code", "chat"):  # same timestamp: the name decides
        record = registry.get(name).model_copy(update={"created_at": stamp})
        registry.store.write_text(f"{name}/{RECORD_FILE}", record.model_dump_json())
    assert [r.name for r in registry.list()] == ["chat", "code"]


def test_create_fixes_the_base_and_is_idempotent(setup: tuple[Registry, Models]) -> None:
    registry, m = setup
    Registry.create(registry.uri, m.base)
    assert snapshot(registry).keys() == {REGISTRY_FILE}
    before = snapshot(registry)
    Registry.create(registry.uri, m.base)  # same base again: nothing changes
    assert snapshot(registry) == before
    with pytest.raises(RegistryError, match="is not the base of registry"):
        Registry.create(registry.uri, m.other_base)
    assert snapshot(registry) == before
    registry.add("math", m.math)  # no --base needed after create
    assert [r.name for r in registry.list()] == ["math"]


def test_relative_local_paths_are_stored_absolute(
    tmp_path: Path, zoo: Zoo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record is read later by a job in another working directory."""
    monkeypatch.chdir(zoo.root)
    record = Registry(str(tmp_path / "r")).add("math", "experts/math", base_uri="base")
    assert record.uri == str(zoo.experts["math"])
    assert Registry(str(tmp_path / "r")).info().base_uri == str(zoo.base)


# ---- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_is_the_layout_not_the_location(
    tiny_zoo: Zoo, tiny_bf16_zoo: Zoo, other_zoo: Zoo, tmp_path: Path
) -> None:
    fingerprint = base_fingerprint(open_checkpoint(str(tiny_zoo.base)))
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    copy = tmp_path / "copy"
    copy_tree(LocalStore(str(tiny_zoo.base)), LocalStore(str(copy)))
    assert base_fingerprint(open_checkpoint(str(copy))) == fingerprint  # stable, location-free
    # Other dtype or other shapes: another base.
    assert base_fingerprint(open_checkpoint(str(tiny_bf16_zoo.base))) != fingerprint
    assert base_fingerprint(open_checkpoint(str(other_zoo.base))) != fingerprint
    # A config field outside the compared core does not change it; a core field does.
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"_name_or_path": "elsewhere"}))
    assert base_fingerprint(open_checkpoint(str(copy))) == fingerprint
    (copy / "config.json").write_text(json.dumps(config | {"vocab_size": 301}))
    assert base_fingerprint(open_checkpoint(str(copy))) != fingerprint


# ---- refused adds: a clear error and nothing written -------------------------------------------


@pytest.fixture
def populated(setup: tuple[Registry, Models]) -> tuple[Registry, Models, dict[str, bytes]]:
    registry, m = setup
    registry.add("math", m.math, base_uri=m.base)
    return registry, m, snapshot(registry)


def test_incompatible_expert_is_refused(
    populated: tuple[Registry, Models, dict[str, bytes]],
) -> None:
    registry, m, before = populated
    with pytest.raises(IncompatibleCheckpointError, match=r"expert 'small'.*incompatible") as e:
        registry.add("small", m.other_math)
    assert "config field hidden_size = 32 differs from the base's 64" in str(e.value)
    assert snapshot(registry) == before


def test_incompatible_expert_is_refused_on_an_empty_registry(
    setup: tuple[Registry, Models],
) -> None:
    registry, m = setup
    with pytest.raises(IncompatibleCheckpointError, match="expert 'small'"):
        registry.add("small", m.other_math, base_uri=m.base)
    assert snapshot(registry) == {}  # not even registry.json


def test_other_base_is_refused(populated: tuple[Registry, Models, dict[str, bytes]]) -> None:
    registry, m, before = populated
    # The expert fits the base it names, but that base is not the registry's.
    with pytest.raises(
        RegistryError,
        match=r"cannot register expert 'small': base .* is not the base of registry",
    ):
        registry.add("small", m.other_math, base_uri=m.other_base)
    assert snapshot(registry) == before


def test_changed_base_is_refused(tmp_path: Path, zoo: Zoo, other_zoo: Zoo) -> None:
    """The recorded base location now holds another model: refuse rather than guess."""
    base = tmp_path / "base"
    copy_tree(LocalStore(str(zoo.base)), LocalStore(str(base)))
    registry = Registry(str(tmp_path / "r"))
    registry.add("math", str(zoo.experts["math"]), base_uri=str(base))
    before = snapshot(registry)
    for key in LocalStore(str(base)).list():
        (base / key).unlink()
    copy_tree(LocalStore(str(other_zoo.base)), LocalStore(str(base)))
    with pytest.raises(RegistryError, match=r"registry's base .* changed since it was recorded"):
        registry.add("code", str(zoo.experts["code"]))
    assert snapshot(registry) == before


def test_first_expert_needs_a_base(setup: tuple[Registry, Models]) -> None:
    registry, m = setup
    with pytest.raises(RegistryError, match=r"'math'.* has no base yet; pass the base"):
        registry.add("math", m.math)
    assert snapshot(registry) == {}


def test_duplicate_name_is_refused(populated: tuple[Registry, Models, dict[str, bytes]]) -> None:
    registry, m, before = populated
    with pytest.raises(RegistryError, match=r"'math': the name is taken .*remove it first"):
        registry.add("math", m.code)
    assert snapshot(registry) == before


def test_concurrent_add_of_one_name_has_one_winner(
    populated: tuple[Registry, Models, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another client registers the name between our duplicate check and our write."""
    registry, m, before = populated
    monkeypatch.setattr(registry.store, "exists", lambda key: False)  # the check saw no "math"
    with pytest.raises(RegistryError, match=r"'math': the name was taken .* while"):
        registry.add("math", m.code)
    assert snapshot(registry) == before  # the first registration is intact


def test_concurrent_first_adds_cannot_both_fix_the_base(
    setup: tuple[Registry, Models], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, m = setup
    real_info = registry.info
    reads: list[str] = []

    def info_read_before_the_rival_wrote() -> RegistryInfo | None:
        reads.append("info")
        return None if len(reads) == 1 else real_info()

    monkeypatch.setattr(registry, "info", info_read_before_the_rival_wrote)
    Registry(registry.uri).add("small", m.other_math, base_uri=m.other_base)
    before = snapshot(registry)
    with pytest.raises(RegistryError, match=r"'math': base .* is not the base of registry"):
        registry.add("math", m.math, base_uri=m.base)
    assert snapshot(registry) == before and [r.name for r in registry.list()] == ["small"]
    assert len(reads) == 2  # the stale read, then the re-read after the refused create


@pytest.mark.parametrize("which", ["missing", "not_a_checkpoint", "bad_base"])
def test_unreadable_model_is_refused(
    populated: tuple[Registry, Models, dict[str, bytes]], which: str
) -> None:
    registry, m, before = populated
    missing = m.math.rsplit("/", 1)[0] + "/no-such-model"
    if which == "missing":
        args, pattern = ("code", missing), r"'code': model .*no-such-model is not readable"
    elif which == "not_a_checkpoint":
        # The registry folder itself exists but has no config.json.
        args, pattern = ("code", registry.uri), r"'code': model .* is not readable: .*config.json"
    else:
        args, pattern = ("code", m.code, missing), r"'code': base .*no-such-model is not readable"
    with pytest.raises(RegistryError, match=pattern):
        registry.add(*args)
    assert snapshot(registry) == before


def test_missing_calibration_is_refused(
    populated: tuple[Registry, Models, dict[str, bytes]],
) -> None:
    registry, m, before = populated
    with pytest.raises(RegistryError, match=r"'code': calibration data .*nope.jsonl"):
        registry.add("code", m.code, calibration=m.calibration.rsplit("/", 1)[0] + "/nope.jsonl")
    assert snapshot(registry) == before


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65, "sp ace"])
def test_invalid_name_is_refused(
    populated: tuple[Registry, Models, dict[str, bytes]], name: str
) -> None:
    registry, m, before = populated
    with pytest.raises(RegistryError, match="is not a valid expert name"):
        registry.add(name, m.code)
    with pytest.raises(RegistryError, match="is not a valid expert name"):
        registry.remove(name)
    assert snapshot(registry) == before


def test_corrupt_record_is_named(tmp_path: Path, zoo: Zoo) -> None:
    registry = Registry(str(tmp_path / "r"))
    registry.add("math", str(zoo.experts["math"]), base_uri=str(zoo.base))
    registry.store.write_text(f"code/{RECORD_FILE}", "{not json")
    with pytest.raises(RegistryError, match=r"code/expert.json is not a valid expert record"):
        registry.list()


# ---- CLI ---------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(scope="module")
def cli_app() -> typer.Typer:
    """The sub-app mounted as the main CLI mounts it."""
    app = typer.Typer()
    app.add_typer(registry_app, name="registry")

    @app.command()
    def version() -> None:  # a second command, so typer keeps the "registry" group level
        """Unused."""

    return app


def test_cli_add_list_remove(setup: tuple[Registry, Models], cli_app: typer.Typer) -> None:
    registry, m = setup
    uri = registry.uri
    result = runner.invoke(
        cli_app,
        ["registry", "add", uri, "math", m.math, "--base", m.base, "--calibration", m.calibration],
    )
    assert result.exit_code == 0, result.output
    assert "registered math" in result.output
    result = runner.invoke(cli_app, ["registry", "add", uri, "code", m.code])
    assert result.exit_code == 0, result.output

    result = runner.invoke(cli_app, ["registry", "list", uri, "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [r["name"] for r in listed] == ["math", "code"]
    assert listed[0]["calibration"] == m.calibration and listed[1]["uri"] == m.code

    result = runner.invoke(cli_app, ["registry", "list", uri], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "2 experts" in result.stdout and "math" in result.stdout and "code" in result.stdout

    result = runner.invoke(cli_app, ["registry", "remove", uri, "math"])
    assert result.exit_code == 0, result.output
    assert [r.name for r in registry.list()] == ["code"]


def test_cli_errors_are_one_line_and_exit_2(
    populated: tuple[Registry, Models, dict[str, bytes]], cli_app: typer.Typer
) -> None:
    registry, m, before = populated
    cases = [
        (["add", registry.uri, "math", m.code], "the name is taken"),
        (["add", registry.uri, "small", m.other_math], "incompatible with the base"),
        (["add", registry.uri, "bad/name", m.code], "is not a valid expert name"),
        (["remove", registry.uri, "ghost"], "no expert 'ghost'"),
    ]
    for args, message in cases:
        result = runner.invoke(cli_app, ["registry", *args], terminal_width=1000)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert snapshot(registry) == before


def test_cli_list_of_an_empty_registry(tmp_path: Path, cli_app: typer.Typer) -> None:
    result = runner.invoke(cli_app, ["registry", "list", str(tmp_path / "none"), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    result = runner.invoke(cli_app, ["registry", "list", str(tmp_path / "none")])
    assert result.exit_code == 0 and "empty registry" in result.stdout
