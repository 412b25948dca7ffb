"""Merge wall time and peak memory: our Ray merge job vs ``mergekit-yaml``, same inputs, one run.

Inputs: SmolLM2-135M (real weights, bf16) as the base and 4 synthetic experts = base + planted
task vectors (``mediator_ray.testing.zoo``'s planting: most blocks agree, ``CONFLICT_BLOCKS``
conflict), built once and cached under ``benchmarks/.cache``. Both tools read the same
safetensors folders and write a bf16 checkpoint; both compute in float32 (ours always does;
mergekit is given ``dtype: float32, out_dtype: bfloat16``; ``--mergekit-dtype bfloat16`` makes
it compute in bf16 instead, which is less work but not the same merge). The outputs are
compared at the end: identical for ``task_arithmetic``; for ``ties`` identical except where an
expert's |δ| ties at its top-k cut — bf16 deltas repeat values, and mergekit's unstable
``argsort`` keeps an unspecified subset of the tied entries where ours keeps the lowest indices
(``mediator_ray/merge/methods.py``); the script counts those entries and checks that every
difference is one of them.

    python benchmarks/merge_vs_mergekit.py [--repeats 3] [--methods ties task_arithmetic mediator]
        [--ray local|cluster] [--tasks-in-flight 4] [--cpus-per-task 1]

Each tool runs as its own subprocess — ``mergekit-yaml`` and ``jobs/merge.py`` — so wall time is
end to end: interpreter start and imports for both; with ``--ray local`` (default) also the
start and stop of the local Ray that our job brings up, as a user running the job on one
machine would see it. ``--ray cluster`` instead starts one local Ray "cluster" (``ray start
--head --block``) before the runs and lets every job attach to it, as ``ray job submit`` does:
the cluster's start-up is then not timed, but its memory is counted. The merge time our driver
records in its manifest (``stats.seconds``: catalog + Ray tasks + commit) is shown too. Runs
alternate between the tools, after an untimed warm-up that puts the input files in the page
cache, so neither pays a cold-disk read.

Memory: a sampler polls the measured process trees every ``--interval`` s — the subprocess and
all its descendants (Ray's GCS, raylet, agents and workers descend from the job's driver, or
from the ``ray start`` process in cluster mode) — reading ``/proc/PID/status``, and reports the
peaks of two per-sample sums:
  * private (the memory target's measure) = Σ RssAnon + max RssShmem: every process's own
    anonymous memory (heap, tensors; Ray starts its processes by fork+exec, so none of it is
    shared copy-on-write) plus Ray's object store counted once — it is shared memory in
    /dev/shm that the raylet maps whole and every worker reading an object maps again, so it
    is the largest RssShmem of any process, not their sum. File-backed pages are left out:
    shared libraries (the same libtorch in every Python process) and memory-mapped files —
    mergekit reads safetensors through mmap, and those clean page-cache pages of its inputs
    could be dropped under pressure, like the page cache both tools' reads go through;
  * Σ RSS: resident memory summed over the tree, file pages included — the usual number, but
    it counts every shared page once per process that maps it, so it overstates a
    multi-process tree such as Ray's.
(PSS would split shared pages exactly, but reading it walks page tables — ~60 ms for a 1.5 GB
process — and sampling it would cost most of a core and skew the timings.) CPU s is
user+system time summed over the tree's processes (each up to its last sample). This benchmark
needs an otherwise idle machine: each run waits for one (``--wait-idle``) and reports the CPU
time the *rest* of the machine used meanwhile (this script's sampler included, well under a
CPU second per run); the table shows the worst run's ("other CPU s"). More than a few seconds
there means another workload competed for the cores and the medians are not trustworthy; the
fastest run ("fastest s") is then the better estimate, as contention only ever adds time.
Everything else in the table is a median over the repeats.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from safetensors.torch import load_file

from mediator_ray.checkpoint import save_checkpoint
from mediator_ray.storage import LocalStore
from mediator_ray.testing.smollm2 import smollm2_checkpoint

# The zoo's own planting function, reused (not copied) so the experts are planted exactly as the
# test zoo's are; it takes any base tensor, a ZooSpec only supplies the recipe.
from mediator_ray.testing.zoo import ZooSpec, _task_vector

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
BIN = Path(sys.executable).parent
MERGEKIT_YAML = BIN / "mergekit-yaml"
JOB = REPO / "jobs" / "merge.py"

EXPERTS = ("math", "code", "chat", "json")
#: 4 of SmolLM2's 30 blocks get independent (conflicting) task vectors, the rest agree.
CONFLICT_BLOCKS = (3, 11, 19, 27)
#: The planting recipe (the zoo's, on SmolLM2's 30 blocks); it keys the input cache.
PLANT_SPEC = ZooSpec(num_layers=30, experts=EXPERTS, conflict_blocks=CONFLICT_BLOCKS, seed=0)
SHARD_BYTES = 100_000_000  # like the cached base: 3 shards per model

#: Options per method, identical for both tools (see ``mergekit_config``).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "ties": {"density": 0.2},  # weights 1, normalize (mergekit's default for ties)
    "task_arithmetic": {"weights": [0.25] * len(EXPERTS)},  # λ = 1, no normalize
    "mediator": {},
}
#: Targets from the issue: our wall time ≤ factor × mergekit's.
TARGETS = {"ties": 0.5, "task_arithmetic": 1.0}
JOB_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep Ray on 127.0.0.1
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    base: Path
    experts: dict[str, Path]

    def folders(self) -> list[Path]:
        return [self.base, *self.experts.values()]


def _fixed_config(folder: Path) -> bytes:
    """The base's config.json with ``architectures`` filled in.

    mergekit picks its architecture definition from ``architectures[0]``; the config that
    ``smollm2_checkpoint`` writes (from a GGUF load) has ``architectures: null``, which mergekit
    rejects. Both tools read the same fixed config."""
    config = json.loads((folder / "config.json").read_text())
    if not config.get("architectures"):
        config["architectures"] = ["LlamaForCausalLM"]
    return (json.dumps(config, indent=2) + "\n").encode()


def build_inputs(cache: Path) -> Inputs:
    """Base + planted experts as HF safetensors folders, built once per recipe and cached.

    Planted in float32 on the base's bf16 values and stored in bf16, as fine-tuned checkpoints
    usually are. The marker is written last, so an interrupted build is redone, not reused."""
    source = smollm2_checkpoint(cache, "bfloat16")
    key = hashlib.blake2b(repr(PLANT_SPEC).encode(), digest_size=4).hexdigest()
    root = cache / f"merge-bench-{key}"
    inputs = Inputs(root / "base", {e: root / "experts" / e for e in EXPERTS})
    marker = root / "inputs.json"
    if marker.exists():
        return inputs
    if root.exists():
        shutil.rmtree(root)
    print(f"building base + {len(EXPERTS)} planted experts under {root} ...", file=sys.stderr)
    base: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        base.update(load_file(file))
    extra = {"config.json": _fixed_config(source)}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            extra[name] = (source / name).read_bytes()
    store = LocalStore(str(inputs.base))
    save_checkpoint(base, store, max_shard_bytes=SHARD_BYTES, extra_files=extra)
    for expert, path in inputs.experts.items():
        planted = {
            name: (t.float() + _task_vector(PLANT_SPEC, expert, name, t.float())).to(t.dtype)
            for name, t in base.items()
        }
        store = LocalStore(str(path))
        save_checkpoint(planted, store, max_shard_bytes=SHARD_BYTES, extra_files=extra)
    marker.write_text(json.dumps({"spec": repr(PLANT_SPEC), "source": str(source)}) + "\n")
    return inputs


def warm_page_cache(inputs: Inputs) -> None:
    """Read every input file once so that no run pays a cold-disk read another does not."""
    for folder in inputs.folders():
        for file in folder.glob("*.safetensors"):
            with file.open("rb") as f:
                while f.read(1 << 24):
                    pass


# --------------------------------------------------------------------------- configs


def mergekit_config(method: str, inputs: Inputs, compute_dtype: str) -> dict[str, Any]:
    """mergekit's YAML for ``METHOD_OPTIONS[method]`` (the mapping of the parity tests)."""
    options = METHOD_OPTIONS[method]
    weights = options.get("weights", [1.0] * len(EXPERTS))
    models = []
    for path, weight in zip(inputs.experts.values(), weights, strict=True):
        parameters: dict[str, Any] = {"weight": weight}
        if method == "ties":
            parameters["density"] = options["density"]
        models.append({"model": str(path), "parameters": parameters})
    return {
        "merge_method": method,
        "base_model": str(inputs.base),
        "models": models,
        "dtype": compute_dtype,
        "out_dtype": "bfloat16",
    }


def our_config(method: str, inputs: Inputs, output: Path, args: argparse.Namespace) -> dict:
    """Our merge.yaml for the same merge: bf16 output, compute options from the flags."""
    return {
        "base": str(inputs.base),
        "experts": [{"name": e, "uri": str(p)} for e, p in inputs.experts.items()],
        "method": method,
        "options": METHOD_OPTIONS[method],
        "output": str(output),
        "dtype": "bfloat16",
        "compute": {
            "tasks_in_flight": args.tasks_in_flight,
            "cpus_per_task": args.cpus_per_task,
        },
    }


# --------------------------------------------------------------------------- measuring

_STATUS_FIELDS = ("VmRSS", "RssAnon", "RssShmem")
_TICKS = os.sysconf("SC_CLK_TCK")


def read_status(pid: int) -> tuple[dict[str, int], float] | None:
    """(bytes per ``_STATUS_FIELDS``, user+system CPU seconds) of a process; None if gone.

    ``/proc/PID/status`` and ``stat`` are cheap (~0.1 ms). The proportional set size in
    ``smaps_rollup`` would be the ideal measure, but reading it walks the page tables — ~60 ms
    for a 1.5 GB process — so sampling it every 50 ms would eat most of a core and skew the
    very timings measured here."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    values = dict.fromkeys(_STATUS_FIELDS, 0)
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0]) * 1024
    fields = stat.rpartition(")")[2].split()  # after "(comm)"; utime, stime are fields 14, 15
    return values, (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass
class TreeSampler:
    """Polls process trees; keeps the peaks of per-sample sums over all their processes.

    The list of processes is refreshed every ``rescan`` s (a scan reads every process's
    ``/proc/PID/stat``); the memory of the known ones is read every ``interval`` s."""

    roots: list[int]
    interval: float
    rescan: float = 0.5
    peak_rss: int = 0
    peak_private: int = 0
    max_processes: int = 0
    cpu_seconds: dict[int, float] = field(default_factory=dict)  # latest user+system per PID
    #: CPU seconds of processes that already ran before the measurement (a running Ray
    #: cluster's), subtracted so that only what they spent during the run counts.
    cpu_before: dict[int, float] = field(default_factory=dict)
    _pids: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def snapshot_cpu(self) -> None:
        """Record the CPU time of every process now in the trees (call before the run)."""
        for pid in self._tree():
            read = read_status(pid)
            if read is not None:
                self.cpu_before[pid] = read[1]

    def cpu_total(self) -> float:
        return sum(cpu - self.cpu_before.get(pid, 0.0) for pid, cpu in self.cpu_seconds.items())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        last_scan = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_scan > self.rescan:
                self._pids = self._tree()
                last_scan = time.monotonic()
            self.sample()
            self._stop.wait(self.interval)

    def _tree(self) -> list[int]:
        pids = []
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                pids += [root.pid, *(child.pid for child in root.children(recursive=True))]
            except psutil.NoSuchProcess:
                continue
        return pids

    def sample(self) -> None:
        rss = anon = shmem = 0
        for pid in self._pids:
            read = read_status(pid)
            if read is None:
                continue
            values, cpu = read
            self.cpu_seconds[pid] = cpu
            rss += values["VmRSS"]
            anon += values["RssAnon"]
            shmem = max(shmem, values["RssShmem"])
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_private = max(self.peak_private, anon + shmem)
        self.max_processes = max(self.max_processes, len(self._pids))


@dataclass
class Run:
    seconds: float
    peak_private: int  # Σ RssAnon + max RssShmem
    peak_rss: int  # Σ VmRSS
    processes: int
    cpu_seconds: float
    other_cpu_seconds: float  # CPU time the rest of the machine used meanwhile (noise)
    merge_seconds: float | None = None  # our driver's own measure (manifest stats.seconds)
    best_seconds: float | None = None  # in a summary: the fastest run's wall time


def run_measured(
    command: list[str], env: dict[str, str], log: Path, interval: float, also: list[int]
) -> Run:
    """Run ``command`` to completion, timing it and sampling its tree (and ``also``'s trees)."""
    sampler = TreeSampler(list(also), interval)
    sampler.snapshot_cpu()
    machine_before = _busy_cpu_seconds()
    with log.open("w") as log_file:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        sampler.roots.insert(0, process.pid)
        sampler.start()
        rc = process.wait()
        seconds = time.perf_counter() - start
        sampler.stop()
    if rc != 0:
        raise RuntimeError(f"{command[0]} failed ({rc}); log:\n{log.read_text()[-4000:]}")
    tree_cpu = sampler.cpu_total()
    return Run(
        seconds,
        sampler.peak_private,
        sampler.peak_rss,
        sampler.max_processes,
        tree_cpu,
        max(0.0, _busy_cpu_seconds() - machine_before - tree_cpu),
    )


def wait_until_idle(max_wait: float, threshold: float = 0.25) -> None:
    """Wait (at most ``max_wait`` s) until the machine used < ``threshold`` cores for 2 s, so a
    run does not start while someone else's workload is busy; warn if it never got quiet."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = psutil.cpu_percent(interval=2.0) / 100 * (os.cpu_count() or 1)
        if busy < threshold:
            return
        if time.monotonic() > deadline:
            print(
                f"warning: machine still busy ({busy:.1f} cores) — timings are noisy",
                file=sys.stderr,
            )
            return


def _busy_cpu_seconds() -> float:
    """Non-idle CPU seconds of the whole machine so far."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


@dataclass
class Context:
    """What every run needs: inputs, a scratch folder, the flags, the subprocess environment
    and the Ray cluster, if any."""

    inputs: Inputs
    work: Path
    args: argparse.Namespace
    env: dict[str, str]
    ray_address: str | None = None
    ray_pid: int | None = None


def subprocess_env(ray_tmp: Path) -> dict[str, str]:
    """Our environment plus ``JOB_ENV``, with a private Ray temp dir and no RAY_ADDRESS.

    A private ``RAY_TMPDIR`` matters: ``ray.init()`` without an address attaches to the cluster
    recorded in ``<tmp>/ray/ray_current_cluster`` by the last ``ray start`` on the machine —
    possibly someone else's, or a dead one (then it hangs) — instead of starting its own."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | JOB_ENV | {"RAY_TMPDIR": str(ray_tmp)}


def run_mergekit(method: str, ctx: Context) -> Run:
    config = ctx.work / f"mergekit-{method}.yaml"
    config.write_text(yaml.safe_dump(mergekit_config(method, ctx.inputs, ctx.args.mergekit_dtype)))
    out = ctx.work / f"mergekit-{method}"
    shutil.rmtree(out, ignore_errors=True)
    command = [str(MERGEKIT_YAML), str(config), str(out), "--quiet", "--no-cuda"]
    log = ctx.work / "mergekit.log"
    return run_measured(command, ctx.env, log, ctx.args.interval, [])


def run_ours(method: str, ctx: Context) -> Run:
    out = ctx.work / f"ours-{method}"
    shutil.rmtree(out, ignore_errors=True)
    config = ctx.work / f"ours-{method}.yaml"
    config.write_text(yaml.safe_dump(our_config(method, ctx.inputs, out, ctx.args)))
    env = dict(ctx.env)
    also = []
    if ctx.ray_address:
        env["RAY_ADDRESS"] = ctx.ray_address
        also = [ctx.ray_pid] if ctx.ray_pid else []
    command = [sys.executable, str(JOB), "--config", str(config), "--no-progress"]
    run = run_measured(command, env, ctx.work / "ours.log", ctx.args.interval, also)
    manifest = json.loads((out / "mediator.json").read_text())
    run.merge_seconds = manifest["stats"]["seconds"]
    return run


@contextmanager
def ray_cluster(work: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """A local one-node Ray started with ``ray start --head --block`` (so its processes stay
    descendants of one PID we can sample); yields (address, PID) and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (work / "ray-start.log").open("w")
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ray start failed; see ray-start.log") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@dataclass(frozen=True)
class Agreement:
    """How our output compares with mergekit's, entry by entry."""

    max_abs_diff: float
    differing: int
    entries: int
    differing_at_ties: int  # of ``differing``: entries whose |δ_i| ties at some expert's cut

    def describe(self) -> str:
        text = f"max |ours − mergekit| = {self.max_abs_diff:.3g}"
        if self.differing:
            text += (
                f"; {self.differing} of {self.entries} entries differ "
                f"({self.differing / self.entries:.2%}), {self.differing_at_ties} of them where "
                "an expert's |delta| ties at its top-k cut (mergekit's unstable argsort keeps an "
                "unspecified subset of such ties, ours the lowest indices)"
            )
        return text


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def compare_outputs(method: str, work: Path, inputs: Inputs) -> Agreement:
    """Compare ours with mergekit's output — a check that both tools did the same merge, so the
    timings compare like with like. Where they differ, count the entries that sit at a TIES
    tie (an expert whose |θ_i − θ0| equals the magnitude of its top-k cut)."""
    ours, theirs = _load_folder(work / f"ours-{method}"), _load_folder(work / f"mergekit-{method}")
    if sorted(ours) != sorted(theirs):
        raise RuntimeError(f"{method}: tensor names differ: {sorted(set(ours) ^ set(theirs))}")
    if any(t.dtype != torch.bfloat16 for t in (*ours.values(), *theirs.values())):
        raise RuntimeError(f"{method}: an output tensor is not bfloat16")
    base = experts = None
    max_diff, differing, at_ties = 0.0, 0, 0
    for name in ours:
        diff = (ours[name].float() - theirs[name].float()).abs().reshape(-1)
        max_diff = max(max_diff, diff.max().item())
        where = diff.nonzero().reshape(-1)
        differing += where.numel()
        if not where.numel() or "density" not in METHOD_OPTIONS[method]:
            continue
        if base is None:
            base = _load_folder(inputs.base)
            experts = [_load_folder(path) for path in inputs.experts.values()]
        flat_base = base[name].float().reshape(-1)
        tied = torch.zeros(where.numel(), dtype=torch.bool)
        for expert in experts:
            magnitudes = (expert[name].float().reshape(-1) - flat_base).abs()
            k = max(1, int(METHOD_OPTIONS[method]["density"] * magnitudes.numel()))
            cut = torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values
            tied |= magnitudes[where] == cut
        at_ties += int(tied.sum())
    entries = sum(t.numel() for t in ours.values())
    return Agreement(max_diff, differing, entries, at_ties)


# --------------------------------------------------------------------------- report


def median_run(runs: list[Run]) -> Run:
    merge = [r.merge_seconds for r in runs if r.merge_seconds is not None]
    return Run(
        statistics.median(r.seconds for r in runs),
        int(statistics.median(r.peak_private for r in runs)),
        int(statistics.median(r.peak_rss for r in runs)),
        max(r.processes for r in runs),
        statistics.median(r.cpu_seconds for r in runs),
        max(r.other_cpu_seconds for r in runs),
        statistics.median(merge) if merge else None,
        min(r.seconds for r in runs),
    )


def markdown_table(results: dict[tuple[str, str], Run]) -> str:
    mb = 1e6
    lines = [
        "| method | tool | wall s | fastest s | merge s | CPU s | peak private MB | peak Σ RSS MB "
        "| procs | wall ours/mk (target) | private ours/mk (≤ 1) | Σ RSS ours/mk | other CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in dict.fromkeys(m for m, _ in results):
        theirs = results.get((method, "mergekit"))
        for tool in ("mergekit", "ours"):
            run = results.get((method, tool))
            if run is None:
                continue
            ratios = ["", "", ""]
            if tool == "ours" and theirs is not None:
                target = f" (≤ {TARGETS[method]:.1f})" if method in TARGETS else ""
                ratios = [
                    f"{run.seconds / theirs.seconds:.2f}{target}",
                    f"{run.peak_private / theirs.peak_private:.2f}",
                    f"{run.peak_rss / theirs.peak_rss:.2f}",
                ]
            merge = f"{run.merge_seconds:.1f}" if run.merge_seconds is not None else ""
            cells = [
                method,
                tool,
                f"{run.seconds:.1f}",
                f"{run.best_seconds:.1f}" if run.best_seconds is not None else "",
                merge,
                f"{run.cpu_seconds:.0f}",
                f"{run.peak_private / mb:.0f}",
                f"{run.peak_rss / mb:.0f}",
                str(run.processes),
                *ratios,
                f"{run.other_cpu_seconds:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["ties", "task_arithmetic", "mediator"],
        choices=list(METHOD_OPTIONS),
    )
    parser.add_argument(
        "--ray",
        choices=["local", "cluster"],
        default="local",
        help="local: each job starts and stops its own Ray (timed); cluster: jobs attach to "
        "one Ray started beforehand (start-up not timed, memory counted)",
    )
    parser.add_argument("--tasks-in-flight", type=int, default=4, help="our compute option")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="our compute option")
    parser.add_argument("--mergekit-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--interval", type=float, default=0.05, help="memory sampling period (s)")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        help="before each run, wait up to this many seconds for the machine to be idle",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep outputs and logs here")
    args = parser.parse_args()

    inputs = build_inputs(CACHE)
    warm_page_cache(inputs)
    work = args.keep or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # Short: Ray's Unix socket paths live below it and are limited to 107 characters.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    env = subprocess_env(ray_tmp)
    runs: dict[tuple[str, str], list[Run]] = {}
    diffs: dict[str, Agreement] = {}
    try:
        with ray_cluster(work, env) if args.ray == "cluster" else _nothing() as cluster:
            ctx = Context(inputs, work, args, env, *(cluster or (None, None)))
            for method in args.methods:
                tools = ("mergekit", "ours") if method != "mediator" else ("ours",)
                for repeat in range(args.repeats):
                    for tool in tools:  # alternating, so drift on the machine hits both alike
                        wait_until_idle(args.wait_idle)
                        run = (run_mergekit if tool == "mergekit" else run_ours)(method, ctx)
                        runs.setdefault((method, tool), []).append(run)
                        print(
                            f"{method:<16} {tool:<8} #{repeat + 1}: {run.seconds:6.1f} s, "
                            f"private {run.peak_private / 1e6:5.0f} MB, "
                            f"Σ RSS {run.peak_rss / 1e6:5.0f} MB, {run.processes} processes, "
                            f"CPU {run.cpu_seconds:4.0f} s, rest of machine "
                            f"{run.other_cpu_seconds:4.1f} CPU s",
                            file=sys.stderr,
                        )
                if "mergekit" in tools:
                    diffs[method] = compare_outputs(method, work, inputs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    results = {key: median_run(value) for key, value in runs.items()}
    print(
        f"\nSmolLM2-135M bf16, base + {len(EXPERTS)} experts, bf16 output, median of "
        f"{args.repeats} runs, {os.cpu_count()} CPUs; ours: --ray {args.ray}, "
        f"tasks_in_flight={args.tasks_in_flight}, cpus_per_task={args.cpus_per_task}; "
        f"mergekit: dtype={args.mergekit_dtype}, out_dtype=bfloat16\n"
    )
    print(markdown_table(results))
    print()
    for method, agreement in diffs.items():
        print(f"{method}: {agreement.describe()}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
