"""Static checks of everything under cluster/: it parses, matches the real schemas, and names
entry points, flags and import paths that exist in this repository.

Nothing here talks to a cloud or a Kubernetes API: the launcher config is checked with Ray's
own schema and validation code, the KubeRay objects against the field names of KubeRay's
``ray.io/v1`` Go types, the Serve config with Ray Serve's own schema, merge configs with
``mediator_ray.config``, and job flags by running each job script's own argparse.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from mediator_ray.config import parse_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
TORCH_PIN = "torch==2.13.0"

#: Every job script the manifests may run, with the flags they may pass it. A manifest naming
#: another script, or a script here that no manifest runs, fails the test: update this list
#: together with the manifests.
EXPECTED_ENTRYPOINTS: dict[str, set[str]] = {
    "jobs/merge.py": {"--config", "--no-progress"},
    "jobs/merge_new_experts.py": {"--registry", "--output", "--no-progress"},
}
#: Scripts that do not exist yet. strict: once the script lands the check passes, the xfail
#: turns into a failure, and the entry must be removed here.
#: (jobs/merge_new_experts.py was listed here until it landed.)
NOT_YET_LANDED: dict[str, str] = {}

#: json field names of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip
RAYSERVICE_SPEC_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
    "excludeHeadPodFromServeSvc", "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold",
}  # fmt: skip
RAYCLUSTER_SPEC_FIELDS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headServiceAnnotations",
    "headGroupSpec", "workerGroupSpecs", "suspend", "gcsFaultToleranceOptions", "managedBy",
    "upgradeStrategy",
}  # fmt: skip
HEAD_GROUP_FIELDS = {
    "serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources",
    "labels",
}  # fmt: skip
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts", "suspend", "resources",
    "labels",
}  # fmt: skip
KNOWN_KINDS = {
    ("ray.io/v1", "RayJob"),
    ("ray.io/v1", "RayService"),
    ("batch/v1", "CronJob"),
    ("v1", "ConfigMap"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
}


# ---- loading ------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object of cluster/kuberay, including manifests held in ConfigMaps."""
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in documents(path):
            where = path.relative_to(REPO).as_posix()
            yield where, doc
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    embedded = yaml.safe_load(text) if key.endswith((".yaml", ".yml")) else None
                    if isinstance(embedded, dict) and "kind" in embedded:
                        yield f"{where} (ConfigMap {doc['metadata']['name']}: {key})", embedded


def objects_of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(where, obj) for where, obj in k8s_objects() if obj.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(w, o["spec"]["rayClusterSpec"]) for w, o in objects_of_kind("RayJob")]
    return specs + [(w, o["spec"]["rayClusterConfig"]) for w, o in objects_of_kind("RayService")]


def entrypoint_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, args) of every ``python jobs/X.py …`` a RayJob runs."""
    found = []
    for where, job in objects_of_kind("RayJob"):
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[0] in {"python", "python3"} and words[1].startswith("jobs/"), (
            f"{where}: entrypoint {job['spec']['entrypoint']!r} is not `python jobs/<script>.py …`"
        )
        found.append((where, words[1], words[2:]))
    return found


# ---- every file ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_under_cluster_parses(path: Path) -> None:
    assert documents(path), f"{path} has no YAML document"


def test_every_cluster_file_is_covered() -> None:
    """New recipes must come with checks: fail on a YAML file this module does not know."""
    known = {
        "ray-cluster.yaml",
        "merge.example.yaml",
        "serve-config.yaml",
        "kuberay/rayjob-merge.yaml",
        "kuberay/rayservice.yaml",
        "kuberay/cronjob-merge-new.yaml",
    }
    assert {p.relative_to(CLUSTER).as_posix() for p in yaml_files()} == known


# ---- Ray cluster launcher -----------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def test_launcher_config_matches_rays_schema(launcher: dict[str, Any]) -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))
    # What `ray up` does before launching anything: merge the provider defaults, then validate
    # (schema again, head type known, per-type worker bounds within max_workers, …).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))


def test_launcher_has_a_cpu_head_and_autoscaling_gpu_workers(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    for node_type in gpu:
        assert node_type["min_workers"] < node_type["max_workers"] <= launcher["max_workers"]
        assert ray.__version__ in node_type["docker"]["worker_image"]
    assert ray.__version__ in launcher["docker"]["image"]  # same Ray as the submitting laptop


def _installs_pinned_torch_first(commands: list[str]) -> None:
    torch = [i for i, c in enumerate(commands) if TORCH_PIN in c]
    project = [i for i, c in enumerate(commands) if "mediator-ray" in c and "pip install" in c]
    assert torch and project and torch[0] < project[0], commands


def test_launcher_pins_torch_before_installing_the_project(launcher: dict[str, Any]) -> None:
    _installs_pinned_torch_first(launcher["setup_commands"])
    for node_type in launcher["available_node_types"].values():
        if "worker_setup_commands" in node_type:  # replaces setup_commands for that type
            _installs_pinned_torch_first(node_type["worker_setup_commands"])


def test_dockerfile_matches_ray_and_pins_torch() -> None:
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}" in text
    lines = text.splitlines()
    torch_line = next(i for i, line in enumerate(lines) if TORCH_PIN in line)
    project_line = next(
        i
        for i, line in enumerate(lines)
        if "pip install" in line and "/home/ray/mediator-ray" in line
    )
    assert torch_line < project_line
    for copied in re.findall(r"^COPY .*? (\S+) /home/ray/", text, flags=re.M):
        assert (REPO / copied).exists(), f"Dockerfile copies {copied}, which does not exist"


# ---- KubeRay ------------------------------------------------------------------------------


def test_kubernetes_objects_have_known_kinds_and_names() -> None:
    objects = list(k8s_objects())
    assert {obj["kind"] for _, obj in objects} >= {"RayJob", "RayService", "CronJob"}
    for where, obj in objects:
        assert (obj.get("apiVersion"), obj.get("kind")) in KNOWN_KINDS, where
        meta = obj.get("metadata") or {}
        assert meta.get("name") or meta.get("generateName"), f"{where}: no metadata.name"


def _check_fields(where: str, what: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(data) - allowed
    assert not unknown, f"{where}: {what} has fields KubeRay does not know: {sorted(unknown)}"


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_kuberay_specs_use_real_field_names(kind: str) -> None:
    objects = objects_of_kind(kind)
    assert objects
    for where, obj in objects:
        spec = obj["spec"]
        if kind == "RayJob":
            _check_fields(where, "spec", spec, RAYJOB_SPEC_FIELDS)
            assert spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True, where
            runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
            assert isinstance(runtime_env, dict), f"{where}: runtimeEnvYAML is not a mapping"
        else:
            _check_fields(where, "spec", spec, RAYSERVICE_SPEC_FIELDS)
            assert isinstance(spec["serveConfigV2"], str), f"{where}: serveConfigV2 is a string"


def test_ray_cluster_specs_are_complete() -> None:
    for where, spec in cluster_specs():
        _check_fields(where, "cluster spec", spec, RAYCLUSTER_SPEC_FIELDS)
        assert spec["rayVersion"] == ray.__version__, where
        head = spec["headGroupSpec"]
        _check_fields(where, "headGroupSpec", head, HEAD_GROUP_FIELDS)
        assert head["template"]["spec"]["containers"], where
        groups = spec["workerGroupSpecs"]
        assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: group names"
        for group in groups:
            _check_fields(where, f"worker group {group['groupName']}", group, WORKER_GROUP_FIELDS)
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            assert group["template"]["spec"]["containers"], where
            for container in group["template"]["spec"]["containers"]:
                limits = container.get("resources", {}).get("limits", {})
                if group["groupName"] == "gpu":
                    assert limits.get("nvidia.com/gpu") == "1", f"{where}: GPU group without GPU"


# ---- entry points -------------------------------------------------------------------------


def test_manifests_run_exactly_the_expected_entrypoints() -> None:
    scripts = {script for _, script, _ in entrypoint_commands()}
    assert scripts == set(EXPECTED_ENTRYPOINTS)
    for where, script, args in entrypoint_commands():
        flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
        assert flags <= EXPECTED_ENTRYPOINTS[script], f"{where}: {script} given {flags}"


class _Parsed(Exception):
    """Raised instead of running a job once its argparse has accepted the arguments."""


def parse_job_args(script: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``script``'s main() up to the end of argument parsing; return the namespace."""
    spec = importlib.util.spec_from_file_location(f"_job_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> Any:
        raise _Parsed(original(self, *a, **kw))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    takes_argv = bool(inspect.signature(module.main).parameters)
    try:
        module.main(args) if takes_argv else module.main()
    except _Parsed as parsed:
        return parsed.args[0]
    except SystemExit as e:
        pytest.fail(f"{script.name} rejects {args}: argparse exited with {e.code}")
    pytest.fail(f"{script.name}: main() returned without parsing arguments with argparse")


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=NOT_YET_LANDED[s]))
        if s in NOT_YET_LANDED
        else s
        for s in sorted(EXPECTED_ENTRYPOINTS)
    ],
)
def test_entrypoint_exists_and_accepts_the_manifests_flags(
    script: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = REPO / script
    assert path.is_file(), f"{script} does not exist, but a manifest runs it"
    calls = [(where, args) for where, s, args in entrypoint_commands() if s == script]
    assert calls
    for where, args in calls:
        namespace = parse_job_args(path, args, monkeypatch)
        for flag in (a for a in args if a.startswith("--")):
            dest = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
            assert hasattr(namespace, dest), f"{where}: {script} ignores {flag}"


# ---- configs embedded in the recipes -------------------------------------------------------


def merge_configs() -> Iterator[tuple[str, Any]]:
    """Merge configs: the example file and any inline one (a mapping with base + experts)."""
    for path in yaml_files():
        for doc in documents(path):
            if isinstance(doc, dict) and {"base", "experts"} <= set(doc):
                yield path.relative_to(REPO).as_posix(), doc
    for where, obj in k8s_objects():
        for key, text in (obj.get("data") or {}).items() if obj.get("kind") == "ConfigMap" else []:
            embedded = yaml.safe_load(text)
            if isinstance(embedded, dict) and {"base", "experts"} <= set(embedded):
                yield f"{where}: {key}", embedded


def test_merge_configs_validate() -> None:
    configs = list(merge_configs())
    assert configs, "no example merge config under cluster/"
    for where, data in configs:
        config = parse_config(data, source=where)
        for uri in [config.base, config.output, *(e.uri for e in config.experts)]:
            assert uri.startswith("s3://"), f"{where}: {uri} is not reachable from a cluster"


def test_rayjob_reads_a_config_from_s3() -> None:
    for where, script, args in entrypoint_commands():
        if script == "jobs/merge.py":
            assert args[args.index("--config") + 1].startswith("s3://"), where


def serve_configs() -> list[tuple[str, dict[str, Any]]]:
    """Serve configs: stand-alone files (with ``applications``) and every RayService's."""
    found = [
        (path.relative_to(REPO).as_posix(), doc)
        for path in yaml_files()
        for doc in documents(path)
        if isinstance(doc, dict) and "applications" in doc
    ]
    return found + [
        (where, yaml.safe_load(service["spec"]["serveConfigV2"]))
        for where, service in objects_of_kind("RayService")
    ]


def test_serve_configs_run_the_mediator_app() -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from mediator_ray.serve import ServeOptions, app

    configs = serve_configs()
    assert len(configs) >= 2  # cluster/serve-config.yaml and the RayService
    assert callable(app)
    for where, data in configs:
        serve = ServeDeploySchema.model_validate(data)
        assert serve.applications, where
        for application in serve.applications:
            module, _, attribute = application.import_path.partition(":")
            assert (module, attribute) == ("mediator_ray.serve", "app"), where
            options = ServeOptions(**application.args)  # what the app builder will accept
            assert options.checkpoint.startswith("s3://"), where
            if options.autoscaling:
                AutoscalingConfig(**options.autoscaling)


def test_rayservice_serves_what_the_nightly_merge_publishes() -> None:
    """The CronJob's --output is the versioned root the RayService's replicas poll."""
    (_, service), *_ = objects_of_kind("RayService")
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    outputs = [
        args[args.index("--output") + 1]
        for _, script, args in entrypoint_commands()
        if script == "jobs/merge_new_experts.py"
    ]
    assert outputs == [application["args"]["checkpoint"]]
    assert application["args"].get("reload_interval_s"), "new versions would never be served"
    gpu_groups = [
        g
        for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        if g["groupName"] == "gpu"
    ]
    max_replicas = application["args"]["autoscaling"]["max_replicas"]
    assert max_replicas <= sum(g["maxReplicas"] for g in gpu_groups)  # one GPU per replica


# ---- the CronJob ---------------------------------------------------------------------------


def test_cronjob_creates_rayjobs_with_just_enough_rights() -> None:
    path = KUBERAY / "cronjob-merge-new.yaml"
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents(path)}
    cron = next(doc for (kind, _), doc in objects.items() if kind == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["schedule"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert ("ServiceAccount", account) in objects

    bindings = [doc for (kind, _), doc in objects.items() if kind == "RoleBinding"]
    roles = [
        objects[("Role", b["roleRef"]["name"])]
        for b in bindings
        if {"kind": "ServiceAccount", "name": account} in b["subjects"]
    ]
    granted = {
        (group, resource, verb)
        for role in roles
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert {("ray.io", "rayjobs", v) for v in ("create", "get")} <= granted
    assert all(group == "ray.io" for group, _, _ in granted), "grants beyond RayJobs"

    # The pod creates the RayJob held by the ConfigMap it mounts.
    script = " ".join(pod["containers"][0].get("command", []) + pod["containers"][0]["args"])
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    created = re.search(r"kubectl create -f (\S+)", script)
    assert created, "the CronJob does not `kubectl create` anything"
    folder, _, key = created.group(1).rpartition("/")
    volume = next(name for name, mount in mounts.items() if mount == folder)
    rayjob = yaml.safe_load(objects[("ConfigMap", volumes[volume])]["data"][key])
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["generateName"]
    assert "jobs/merge_new_experts.py" in rayjob["spec"]["entrypoint"]
