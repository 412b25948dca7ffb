"""The quality evaluation: every merge method against the experts, on the same prompts.

Systems (rows of the table):

* ``base`` — the shared base model (reference).
* ``expert:<task>`` — each expert alone, on every task; ``experts (own task)`` is the
  diagonal: each task answered by its own expert (the upper bound, at N× the memory).
* static merges through our ``run_merge`` on Ray: ``linear`` (plain average),
  ``task_arithmetic``, ``ties``, ``dare_ties``.
* ``mediator (router)`` — the Mediator checkpoint serving with its fitted router;
  ``mediator (oracle)`` — the same checkpoint with each prompt pinned to its task's expert
  (``generate(..., weights=[{task: 1.0}])``), which separates merge loss from routing loss.
* ``mediator-defaults (router)`` — METHOD.md's default plan (route ¼ of the blocks, density
  0.1), next to the operating point chosen for the tiny zoo.
* ``route-every-layer (router)`` — every layer (embeddings included) routed at density 1, so
  every expert is kept exactly: what the router alone costs, at ~N× memory.

Columns: exact-match accuracy per task on ``test`` (in distribution), the mean over tasks on
``ood`` (unseen phrasings) and on ``mixed`` (two-task concatenations, either answer counts),
checkpoint bytes (all ``.safetensors`` files: weights, sparse experts, router) and serving
bytes (``MediatorModel.resident_bytes()["total"]`` right after loading; for a plain model its
parameter bytes; for "experts" all N models), and the peak after serving the evaluation, which
for Mediator adds the LRU of ``MIX_CACHE`` materialised mixes (each a copy of the routed
layers — when every layer is routed, a whole model per cached mix). Oracle routing has no
meaning on ``mixed`` prompts (which task?), so that cell is empty.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mediator_ray.quality.generation import (
    GenerateFn,
    accuracy,
    answer_budget,
    greedy,
    quiet_transformers,
)
from mediator_ray.quality.tasks import Example, TaskSuite

Log = Callable[[str], None]
STATIC_METHODS: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "dare_ties")
#: Materialised mixes a MediatorModel keeps (the runtime's default LRU size).
MIX_CACHE = 4
ALL_SYSTEMS: tuple[str, ...] = (
    "base",
    "experts",
    *STATIC_METHODS,
    "mediator",
    "mediator-defaults",
    "route-every-layer",
)


@dataclass(frozen=True)
class EvalLimits:
    """How many examples per task (and in total for ``mixed``) each system is scored on."""

    test: int = 200
    ood: int = 100
    mixed: int = 200


@dataclass(frozen=True)
class MergeSettings:
    """The merge options of every evaluated system (kept together so the table states them)."""

    #: The operating point the quality claim is made for. On the tiny zoo every layer
    #: conflicts about equally (deviation ≈ (N−1)/N everywhere), so no layer can be averaged
    #: for free; see ``benchmarks/results/quality-tiny-sweep.md`` for the whole trade-off.
    mediator: dict[str, Any] = field(
        default_factory=lambda: {
            "plan": {"route_fraction": 1.0, "route_embeddings": True},
            "sparse": {"density": 0.5},
        }
    )
    #: METHOD.md's defaults (route the top quarter of blocks, keep 10 % per sparse expert).
    mediator_defaults: dict[str, Any] = field(
        default_factory=lambda: {"plan": {"route_fraction": 0.25}, "sparse": {"density": 0.1}}
    )
    route_every_layer: dict[str, Any] = field(
        default_factory=lambda: {
            "plan": {"route_fraction": 1.0, "route_embeddings": True},
            "sparse": {"density": 1.0},
        }
    )
    static: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "linear": {},
            "task_arithmetic": {"lambda": 0.5},
            "ties": {"density": 0.2, "lambda": 1.0},
            "dare_ties": {"drop_rate": 0.5, "lambda": 1.0},
        }
    )
    dtype: str = "float32"


@dataclass
class SystemResult:
    """One row: accuracy per (split, task), sizes, and how long its evaluation took."""

    system: str
    kind: str  # base | expert | experts | static | mediator
    scores: dict[str, dict[str, float]]  # split -> task -> accuracy ("mixed" -> {"all": …})
    checkpoint_bytes: int
    serving_bytes: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: Bytes held after the evaluation: for Mediator this adds the LRU of materialised mixes.
    peak_bytes: int = 0

    def __post_init__(self) -> None:
        self.peak_bytes = self.peak_bytes or self.serving_bytes

    def mean(self, split: str, tasks: Sequence[str] | None = None) -> float:
        values = self.scores.get(split, {})
        chosen = [values[t] for t in (tasks or list(values)) if t in values]
        return sum(chosen) / len(chosen) if chosen else math.nan


@dataclass
class QualityReport:
    """All rows plus the context needed to read them."""

    zoo: str
    tasks: list[str]
    results: list[SystemResult]
    settings: dict[str, Any]
    seconds: float = 0.0

    def row(self, system: str) -> SystemResult:
        return next(r for r in self.results if r.system == system)

    def best_static(self) -> SystemResult:
        statics = [r for r in self.results if r.kind == "static"]
        return max(statics, key=lambda r: r.mean("test"))


# --------------------------------------------------------------------------- scoring


def _examples(suite: TaskSuite, limits: EvalLimits) -> dict[str, dict[str, list[Example]]]:
    return {
        "test": {t: suite.splits[t]["test"][: limits.test] for t in suite.tasks},
        "ood": {t: suite.splits[t]["ood"][: limits.ood] for t in suite.tasks},
        "mixed": {"all": suite.mixed[: limits.mixed]},
    }


def score_system(
    generate: GenerateFn,
    tokenizer: Any,
    examples: dict[str, dict[str, list[Example]]],
    splits: Sequence[str] = ("test", "ood", "mixed"),
) -> dict[str, dict[str, float]]:
    """Accuracy per split and task for one system's generate function."""
    scores: dict[str, dict[str, float]] = {}
    for split in splits:
        scores[split] = {}
        for task, chosen in examples[split].items():
            if not chosen:
                continue
            predictions = generate([e.prompt for e in chosen], answer_budget(tokenizer, chosen))
            scores[split][task] = accuracy(predictions, chosen)
    return scores


def safetensors_bytes(folder: Path) -> int:
    """Bytes of every ``.safetensors`` file under ``folder`` (weights, sparse experts, router)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def parameter_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class ResultCache:
    """Finished rows on disk (one JSON per system), keyed by the inputs and settings."""

    def __init__(self, folder: Path | None, context: dict[str, Any]):
        self.folder = folder
        self.context = context

    def _key(self, name: str, inputs: Sequence[Path]) -> str:
        return hashlib.sha256(
            json.dumps([name, self.context, _stamp(inputs)], sort_keys=True).encode()
        ).hexdigest()

    def _file(self, name: str) -> Path:
        assert self.folder is not None
        return self.folder / (name.replace(":", "_").replace(" ", "_") + ".json")

    def get(self, name: str, inputs: Sequence[Path]) -> list[SystemResult] | None:
        if self.folder is None or not self._file(name).is_file():
            return None
        data = json.loads(self._file(name).read_text())
        if data.get("key") != self._key(name, inputs):
            return None
        return [SystemResult(**row) for row in data["rows"]]

    def put(self, name: str, inputs: Sequence[Path], rows: Sequence[SystemResult]) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {"key": self._key(name, inputs), "rows": [asdict(r) for r in rows]}
        self._file(name).write_text(json.dumps(data, indent=1, default=str))


def _stamp(folders: Sequence[Path]) -> list[tuple[str, int, int]]:
    """Identity of the weights under ``folders`` (path, size, mtime of every safetensors)."""
    return [
        (str(p), p.stat().st_size, p.stat().st_mtime_ns)
        for folder in folders
        for p in sorted(Path(folder).rglob("*.safetensors"))
    ]


# --------------------------------------------------------------------------- merging


def start_ray() -> None:
    """Attach to ``RAY_ADDRESS`` when set, else start a *new* local Ray on 127.0.0.1.

    ``ray.init()`` without an address joins any Ray it finds through
    ``/tmp/ray/ray_current_cluster`` — on a shared machine, someone else's test cluster, which
    may shut down mid-merge (``OwnerDiedError``). ``address="local"`` always starts our own."""
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
    else:
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level="WARNING",
        )


def merge_config(
    base: Path,
    experts: dict[str, Path],
    output: Path,
    method: str,
    options: dict[str, Any],
    calibration: dict[str, Path] | None,
    dtype: str,
) -> dict[str, Any]:
    entries = []
    for name, uri in experts.items():
        entry = {"name": name, "uri": str(uri)}
        if calibration:
            entry["calibration"] = str(calibration[name])
        entries.append(entry)
    return {
        "base": str(base),
        "experts": entries,
        "method": method,
        "options": options,
        "output": str(output),
        "dtype": dtype,
    }


def run_cached_merge(data: dict[str, Any], log: Log) -> Path:
    """``run_merge`` unless the output already holds a merge of exactly this config.

    The key is a hash of the config *and* of the inputs' weight files' sizes and mtimes, so a
    rebuilt zoo is never merged from stale outputs."""
    from mediator_ray.config import parse_config
    from mediator_ray.pipeline import run_merge

    output = Path(data["output"])
    inputs = [Path(data["base"])] + [Path(e["uri"]) for e in data["experts"]]
    key = hashlib.sha256(json.dumps([data, _stamp(inputs)], sort_keys=True).encode()).hexdigest()
    key_file = output.parent / f".{output.name}.key"
    done = (output / "mediator.json").is_file() and key_file.is_file()
    if done and key_file.read_text() == key:
        return output
    started = time.perf_counter()
    start_ray()
    run_merge(parse_config(data, source=f"quality:{output.name}"), show_progress=False)
    key_file.write_text(key)
    log(f"merged {output.name} ({data['method']}) in {time.perf_counter() - started:.1f}s")
    return output


# --------------------------------------------------------------------------- systems


def _load_hf(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _mediator_fn(model: Any, pin: dict[str, float] | None, batch_size: int = 64) -> GenerateFn:
    def run(prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            weights = None if pin is None else [pin] * len(chunk)
            outputs = model.generate(chunk, weights=weights, max_new_tokens=max_new_tokens)
            texts += [g.text for g in outputs]
        return texts

    return run


def _evaluate_mediator(
    name: str,
    folder: Path,
    examples: dict[str, dict[str, list[Example]]],
    tasks: Sequence[str],
    oracle: bool,
    splits: Sequence[str],
    log: Log,
) -> list[SystemResult]:
    from mediator_ray.runtime import MediatorModel

    started = time.perf_counter()
    model = MediatorModel.from_pretrained(str(folder), device="cpu", cache_size=MIX_CACHE)
    resident = model.resident_bytes()["total"]
    ckpt = safetensors_bytes(folder)
    manifest = model.manifest
    routed = [entry["name"] for entry in manifest["layers"] if entry["action"] == "route"]
    router = manifest.get("router", {})
    scores = score_system(_mediator_fn(model, None), model.tokenizer, examples, splits)
    routing = _routing_accuracy(model, examples["test"])
    extra = {
        "routed_layers": routed,
        "density": manifest["sparse"]["density"],
        "router_heldout_accuracy": router.get("heldout_accuracy"),
        "router_test_accuracy": routing,
        "resident_after_eval": model.resident_bytes(),
    }
    results = [
        SystemResult(
            f"{name} (router)",
            "mediator",
            scores,
            ckpt,
            resident,
            time.perf_counter() - started,
            extra,
            model.resident_bytes()["total"],
        )
    ]
    log(f"{name} (router): test mean {results[0].mean('test'):.3f}, routing {routing:.3f}")
    if oracle:
        started = time.perf_counter()
        pinned: dict[str, dict[str, float]] = {}
        for split in [s for s in splits if s != "mixed"]:
            pinned[split] = {}
            for task, chosen in examples[split].items():
                run = _mediator_fn(model, {task: 1.0})
                predictions = run(
                    [e.prompt for e in chosen], answer_budget(model.tokenizer, chosen)
                )
                pinned[split][task] = accuracy(predictions, chosen)
        results.append(
            SystemResult(
                f"{name} (oracle)",
                "mediator",
                pinned,
                ckpt,
                resident,
                time.perf_counter() - started,
                {"routed_layers": routed, "density": manifest["sparse"]["density"]},
                model.resident_bytes()["total"],
            )
        )
        log(f"{name} (oracle): test mean {results[1].mean('test'):.3f}")
    return results


def _routing_accuracy(model: Any, test: dict[str, list[Example]]) -> float:
    """Share of in-distribution test prompts whose top routed expert is their own task."""
    hits = total = 0
    for task, chosen in test.items():
        for routing in model.route([e.prompt for e in chosen]):
            top = max(routing.weights, key=routing.weights.get) if routing.weights else None
            hits += top == task
            total += 1
    return hits / max(1, total)


@quiet_transformers()
def evaluate_zoo(
    zoo_name: str,
    base: Path,
    experts: dict[str, Path],
    calibration: dict[str, Path],
    suite: TaskSuite,
    workdir: Path,
    *,
    settings: MergeSettings | None = None,
    limits: EvalLimits | None = None,
    systems: Sequence[str] | None = None,
    splits: Sequence[str] = ("test", "ood", "mixed"),
    log: Log | None = None,
    model_dtype: torch.dtype = torch.float32,
    cache: Path | None = None,
) -> QualityReport:
    """Merge (cached) and evaluate every system; see the module docstring.

    ``systems`` restricts the rows (names as in the table, without the "(router)" suffix:
    ``base``, ``experts``, the static methods, ``mediator``, ``mediator-defaults``,
    ``route-every-layer``);
    ``splits`` the columns. With ``cache``, each finished row is stored there and a rerun
    with the same inputs and settings reuses it: a long evaluation (SmolLM2) resumes where it
    stopped instead of starting over."""
    settings = settings or MergeSettings()
    limits = limits or EvalLimits()
    say = log or (lambda _m: None)
    wanted = set(systems or ALL_SYSTEMS)
    started = time.perf_counter()
    tasks = list(suite.tasks)
    examples = _examples(suite, limits)
    results: list[SystemResult] = []
    workdir.mkdir(parents=True, exist_ok=True)
    rows = ResultCache(cache, {"limits": asdict(limits), "splits": list(splits)})

    def plain(
        name: str, kind: str, folder: Path, extra: dict[str, Any] | None = None
    ) -> SystemResult:
        hit = rows.get(name, [folder])
        if hit:
            say(f"{name}: cached (test mean {hit[0].mean('test'):.3f})")
            return hit[0]
        t0 = time.perf_counter()
        model, tokenizer = _load_hf(folder, model_dtype)
        scores = score_system(
            lambda prompts, n: greedy(model, tokenizer, prompts, n), tokenizer, examples, splits
        )
        result = SystemResult(
            name,
            kind,
            scores,
            safetensors_bytes(folder),
            parameter_bytes(model),
            time.perf_counter() - t0,
            extra or {},
        )
        say(f"{name}: test mean {result.mean('test'):.3f} ({result.seconds:.0f}s)")
        rows.put(name, [folder], [result])
        return result

    if "base" in wanted:
        results.append(plain("base", "base", base))
    if "experts" in wanted:
        per_expert = [plain(f"expert:{t}", "expert", experts[t]) for t in tasks]
        results += per_expert
        diagonal = {
            split: {t: r.scores[split][t] for t, r in zip(tasks, per_expert, strict=True)}
            for split in splits
            if split != "mixed"
        }
        results.append(
            SystemResult(
                "experts (own task)",
                "experts",
                diagonal,
                sum(r.checkpoint_bytes for r in per_expert),
                sum(r.serving_bytes for r in per_expert),
                0.0,
            )
        )
    for method in STATIC_METHODS:
        if method not in wanted:
            continue
        data = merge_config(
            base,
            experts,
            workdir / method,
            method,
            settings.static[method],
            None,
            settings.dtype,
        )
        folder = run_cached_merge(data, say)
        results.append(plain(method, "static", folder, {"options": settings.static[method]}))
    for name, options, oracle in (
        ("mediator", settings.mediator, True),
        ("mediator-defaults", settings.mediator_defaults, False),
        ("route-every-layer", settings.route_every_layer, False),
    ):
        if name not in wanted:
            continue
        data = merge_config(
            base, experts, workdir / name, "mediator", options, calibration, settings.dtype
        )
        folder = run_cached_merge(data, say)
        rows_of = rows.get(name, [folder])
        if rows_of is None:
            rows_of = _evaluate_mediator(name, folder, examples, tasks, oracle, splits, say)
            for r in rows_of:
                r.extra["options"] = options
            rows.put(name, [folder], rows_of)
        else:
            say(f"{name}: cached (test mean {rows_of[0].mean('test'):.3f})")
        results += rows_of
    return QualityReport(
        zoo_name,
        tasks,
        results,
        {
            "merge": {
                "mediator": settings.mediator,
                "mediator_defaults": settings.mediator_defaults,
                "route_every_layer": settings.route_every_layer,
                "static": settings.static,
                "dtype": settings.dtype,
            },
            "limits": {"test": limits.test, "ood": limits.ood, "mixed": limits.mixed},
        },
        time.perf_counter() - started,
    )
