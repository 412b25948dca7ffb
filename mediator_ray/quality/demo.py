"""``mediator-ray demo``: the whole story on a laptop in a few minutes.

Builds (or reuses) the tiny *trained* zoo, merges it with every method through ``run_merge``
on a local Ray — Mediator with its router fitted from the calibration prompts — prints the
quality table and a few routed generations, and optionally serves the Mediator checkpoint
with Ray Serve and queries it over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from mediator_ray.quality.evaluate import EvalLimits, evaluate_zoo
from mediator_ray.quality.report import rich_table, summary_lines
from mediator_ray.quality.tiny_zoo import build_trained_zoo, load_trained_zoo


def demo_limits(examples: int) -> EvalLimits:
    """``examples`` test prompts per task, half as many OOD ones, as many mixed ones."""
    return EvalLimits(test=examples, ood=max(1, examples // 2), mixed=examples)


#: Enough examples for a stable table, small enough for the demo's time budget.
DEMO_LIMITS = demo_limits(100)
SERVE_APP = "mediator-demo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demo_prompts(zoo: Any, per_task: int = 2) -> list[tuple[str, str, str]]:
    """(task, prompt, expected answer): unseen test prompts (beyond those the table scores)."""
    return [
        (task, example.prompt, example.answer)
        for task in zoo.tasks.tasks
        for example in zoo.tasks.splits[task]["test"][-per_task:]
    ]


def run_demo(
    workdir: Path, serve: bool, console: Console, limits: EvalLimits = DEMO_LIMITS
) -> None:
    """Build the zoo if missing, merge, print the quality table and routed generations;
    with ``serve``, also serve the Mediator checkpoint and send it real HTTP requests.

    Needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` set before ``ray`` is first imported when a
    local Ray is to stay on 127.0.0.1 (the CLI does that at import)."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matrices are too small to share out
    try:
        _run(Path(workdir).absolute(), serve, console, limits)
    finally:
        torch.set_num_threads(threads)


def _run(workdir: Path, serve: bool, console: Console, limits: EvalLimits) -> None:
    started = time.perf_counter()
    zoo_dir = workdir / "tiny-zoo"
    zoo = load_trained_zoo(zoo_dir)
    if zoo is None:
        console.print(f"[bold]training the tiny expert zoo[/] in {zoo_dir} (a few minutes) …")
        with console.status("training …") as status:
            zoo = build_trained_zoo(zoo_dir, log=lambda m: status.update(f"training: {m}"))
        console.print(f"zoo built in {zoo.build_seconds:.0f}s")
    else:
        console.print(f"reusing the trained zoo in {zoo_dir}")

    console.print("[bold]merging[/] (linear, task arithmetic, TIES, DARE, Mediator) and scoring …")
    with console.status("evaluating …") as status:
        report = evaluate_zoo(
            "tiny",
            zoo.base,
            zoo.experts,
            zoo.calibration,
            zoo.tasks,
            workdir / "merges",
            limits=limits,
            systems=(
                "experts",
                "linear",
                "task_arithmetic",
                "ties",
                "dare_ties",
                "mediator",
                "mediator-defaults",
            ),
            log=lambda m: status.update(f"evaluating: {m}"),
        )
    console.print(rich_table(report))
    for line in summary_lines(report):
        console.print(f"• {line}")

    from mediator_ray.runtime import MediatorModel

    checkpoint = workdir / "merges" / "mediator"
    model = MediatorModel.from_pretrained(str(checkpoint), device="cpu")
    console.print("\n[bold]routed generations[/] (unseen prompts, two per task):")
    cases = _demo_prompts(zoo)
    for (task, prompt, expected), out in zip(
        cases, model.generate([p for _, p, _ in cases], max_new_tokens=24), strict=True
    ):
        mark = "[green]✓[/]" if out.text.strip() == expected.strip() else "[red]✗[/]"
        console.print(f"[dim]{prompt!r}[/]")
        console.print(
            f"  → {out.text.strip()!r} {mark}  routed {out.routing.mode} to {out.routing.mix} "
            f"(task: {task}, uncertainty {out.routing.uncertainty:.2f})"
        )
    if serve:
        _serve_and_query(checkpoint, cases[1::2], console)
    console.print(f"\ndemo finished in {time.perf_counter() - started:.0f}s; outputs in {workdir}")


def _serve_and_query(checkpoint: Path, cases: list[tuple[str, str, str]], console: Console) -> None:
    import requests
    from ray import serve

    from mediator_ray.quality.evaluate import start_ray
    from mediator_ray.serve import ServeOptions, build

    start_ray()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    console.print(f"\n[bold]serving[/] {checkpoint.name} with Ray Serve on {url} …")
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": "127.0.0.1", "port": port},
        logging_config=quiet,
    )
    try:
        options = ServeOptions(
            checkpoint=str(checkpoint), model_name="tiny", replicas=1, num_cpus=0.5, device="cpu"
        )
        serve.run(build(options), name=SERVE_APP, route_prefix="/", logging_config=quiet)
        for task, prompt, expected in cases:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0}
            response = requests.post(f"{url}/v1/completions", json=body, timeout=120)
            response.raise_for_status()
            data = response.json()
            routing = data.get("mediator", {})
            console.print(
                f"POST /v1/completions ({task}) → {data['choices'][0]['text'].strip()!r} "
                f"(expected {expected.strip()!r}; mix {routing.get('mix')}, "
                f"mode {routing.get('mode')})"
            )
    finally:
        serve.shutdown()
        console.print("Serve shut down")
