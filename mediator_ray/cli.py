"""``mediator-ray`` command line: merge, inspect, demo.

Errors a user can cause are printed as one clear message (no traceback) with exit code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mediator_ray.errors import MediatorError
from mediator_ray.registry.cli import registry_app


def prefer_loopback_for_local_ray() -> None:
    """Make a local Ray (no ``RAY_ADDRESS``) bind and advertise 127.0.0.1 only.

    Ray otherwise advertises the machine's external address even for a single-node, local
    instance. It reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is imported,
    so this runs at CLI import, before anything imports Ray. With ``RAY_ADDRESS`` set (a real
    cluster, or ``ray job submit``) nothing changes: drivers there must advertise a reachable
    address.
    """
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


prefer_loopback_for_local_ray()

app = typer.Typer(
    name="mediator-ray",
    help="Merge fine-tuned experts of one base model into a Mediator checkpoint, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
app.add_typer(registry_app, name="registry")


def _fail(error: MediatorError) -> int:
    console.print(f"[bold red]error:[/] {error}", soft_wrap=True, highlight=False)
    return 2


def run_merge_command(config_uri: str, show_progress: bool = True) -> int:
    """Shared by ``mediator-ray merge`` and ``jobs/merge.py``."""
    from mediator_ray.config import load_config

    try:
        config = load_config(config_uri)  # torch-free: a bad config fails fast
        from mediator_ray.pipeline import run_merge

        outcome = run_merge(config, console=console, show_progress=show_progress)
    except MediatorError as e:
        return _fail(e)
    console.print(f"[green]merged[/] → {outcome.output}")
    return 0


def run_merge_new_command(
    registry: str,
    output: str,
    template_uri: str | None,
    retain: int,
    show_progress: bool = True,
    lease_ttl_s: float = 120.0,
) -> int:
    """Shared by ``mediator-ray merge-new`` and ``jobs/merge_new_experts.py``."""
    import yaml

    from mediator_ray.errors import ConfigError
    from mediator_ray.registry.merge_new import merge_new_experts
    from mediator_ray.storage import open_store

    try:
        template = None
        if template_uri:
            parent, _, key = template_uri.rpartition("/")
            template = yaml.safe_load(open_store(parent or ".").read_text(key)) or {}
            if not isinstance(template, dict):
                raise ConfigError(f"{template_uri}: expected a mapping of merge options")
        result = merge_new_experts(
            registry,
            output,
            template,
            retain=retain,
            lease_ttl_s=lease_ttl_s,
            console=console,
            show_progress=show_progress,
        )
    except MediatorError as e:
        return _fail(e)
    if result.status == "published":
        saved = 1 - result.bytes_fetched / result.full_merge_bytes if result.full_merge_bytes else 0
        console.print(
            f"[green]published version {result.version}[/] with {result.experts} "
            f"(new: {result.new_experts}); fetched {result.bytes_fetched:,} bytes vs "
            f"{result.full_merge_bytes:,} for a full re-merge ({saved:.0%} saved)"
        )
    else:
        console.print(f"{result.status}: latest version {result.version}, nothing published")
    return 0


@app.command("merge-new")
def merge_new(
    registry: Annotated[str, typer.Argument(help="registry prefix (path or s3://)")],
    output: Annotated[str, typer.Argument(help="versioned output root (path or s3://)")],
    config: Annotated[
        str | None, typer.Option(help="merge options template YAML (options, dtype, compute)")
    ] = None,
    retain: Annotated[int, typer.Option(help="published versions to keep")] = 3,
    lease_ttl: Annotated[
        float,
        typer.Option(help="seconds without renewal before a dead run's lease may be taken over"),
    ] = 120.0,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Merge newly registered experts into a new version of OUTPUT (scheduled batch merge)."""
    raise typer.Exit(run_merge_new_command(registry, output, config, retain, progress, lease_ttl))


@app.command()
def merge(
    config: Annotated[str, typer.Argument(help="merge.yaml: a path or an s3:// URI")],
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run a merge job (attaches to RAY_ADDRESS, else starts a local Ray on 127.0.0.1)."""
    raise typer.Exit(run_merge_command(config, show_progress=progress))


def read_manifest(uri: str) -> dict[str, Any]:
    """The committed manifest of a checkpoint; an error if the checkpoint is incomplete."""
    from mediator_ray.checkpoint import read_manifest as read_committed_manifest
    from mediator_ray.storage import open_store

    return read_committed_manifest(open_store(uri))


@app.command()
def inspect(
    uri: Annotated[str, typer.Argument(help="checkpoint folder: a path or an s3:// URI")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print a checkpoint's plan and layer-wise conflict table."""
    try:
        manifest = read_manifest(uri)
    except MediatorError as e:
        raise typer.Exit(_fail(e)) from None
    if as_json:
        keys = ("method", "base", "expert_names", "dtype", "plan", "sparse", "sizes", "stats")
        payload = {k: manifest[k] for k in keys} | {
            "layers": [
                {k: layer[k] for k in ("name", "kind", "action", "conflict", "recon_errors")}
                for layer in manifest["layers"]
            ]
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    out = Console()
    out.print(
        f"[bold]{uri}[/] — method {manifest['method']}, experts "
        f"{', '.join(manifest['expert_names'])}, dtype {manifest['dtype']}"
    )
    out.print(f"plan: {manifest['plan']['rule']}")
    table = Table()
    for column in ("layer", "kind", "action", "deviation", "sign", "cosine", "max recon err"):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for layer in manifest["layers"]:
        conflict = layer.get("conflict") or {}
        errors = layer.get("recon_errors") or {}
        table.add_row(
            layer["name"],
            layer["kind"],
            "[red]route[/]" if layer["action"] == "route" else "average",
            *(
                f"{conflict[m]:.3f}" if m in conflict else "-"
                for m in ("deviation", "sign", "cosine")
            ),
            f"{max(errors.values()):.3f}" if errors else "-",
        )
    out.print(table)
    from mediator_ray.pipeline.report import summary_table

    out.print(summary_table(manifest))


@app.command("serve")
def serve_command(
    checkpoint: Annotated[str, typer.Argument(help="committed checkpoint: path or s3:// URI")],
    host: Annotated[str, typer.Option(help="HTTP bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    replicas: Annotated[int, typer.Option(help="expert-pool replicas")] = 1,
    num_cpus: Annotated[float, typer.Option(help="CPUs per replica")] = 1.0,
    num_gpus: Annotated[float, typer.Option(help="GPUs per replica")] = 0.0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    cache_size: Annotated[int, typer.Option(help="materialised mixes per replica")] = 4,
) -> None:
    """Serve a checkpoint with Ray Serve: OpenAI-style /v1/completions, /v1/chat/completions,
    /v1/route, /v1/models, /healthz. Runs until interrupted."""
    from ray import serve

    from mediator_ray.raysession import ensure_ray
    from mediator_ray.serve import ServeOptions, build

    try:
        options = ServeOptions(
            checkpoint=checkpoint,
            replicas=replicas,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            device=device,  # type: ignore[arg-type]
            cache_size=cache_size,
        )
        read_manifest(checkpoint)  # fail fast, before any replica starts
    except MediatorError as e:
        raise typer.Exit(_fail(e)) from None
    ensure_ray()
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    console.print(f"serving {checkpoint} at http://{host}:{port}/v1 (Ctrl-C to stop)")
    serve.run(build(options), name="mediator", route_prefix="/", blocking=True)


@app.command("fit-router")
def fit_router_command(
    checkpoint: Annotated[str, typer.Argument(help="committed checkpoint: path or s3:// URI")],
    calibration: Annotated[
        list[str] | None,
        typer.Option(
            "--calibration",
            help="NAME=URI of a JSONL of {'prompt': ...} lines; repeat per expert "
            "(default: the URIs recorded in the checkpoint's merge config)",
        ),
    ] = None,
) -> None:
    """Fit (or refit) a checkpoint's task router from calibration prompts."""
    from mediator_ray.errors import ConfigError
    from mediator_ray.pipeline import MANIFEST
    from mediator_ray.router.checkpoint import fit_checkpoint_router
    from mediator_ray.storage import open_store

    try:
        manifest = read_manifest(checkpoint)
        uris = {e["name"]: e["calibration"] for e in manifest["experts"] if e.get("calibration")}
        for item in calibration or []:
            name, sep, uri = item.partition("=")
            if not sep or not name or not uri:
                raise ConfigError(f"--calibration expects NAME=URI, got {item!r}")
            uris[name] = uri
        routed_blocks = [
            layer["index"]
            for layer in manifest["layers"]
            if layer["action"] == "route" and layer["kind"] == "block"
        ]
        files, summary = fit_checkpoint_router(
            checkpoint, uris, manifest["expert_names"], routed_blocks
        )
    except MediatorError as e:
        raise typer.Exit(_fail(e)) from None
    store = open_store(checkpoint)
    for key, data in files.items():
        store.write(key, data)
    manifest["router"] = summary
    store.write_text(MANIFEST, json.dumps(manifest, indent=1) + "\n")  # last, atomically
    console.print(
        f"[green]router fitted[/]: held-out accuracy {summary['heldout_accuracy']:.3f} "
        f"on {summary['n_heldout']} prompts; u_low {summary['thresholds']['u_low']:.3f}, "
        f"u_high {summary['thresholds']['u_high']:.3f}"
    )


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the zoo and outputs go")] = Path("data/demo"),
    serve: Annotated[
        bool, typer.Option(help="also serve the Mediator checkpoint and query it over HTTP")
    ] = False,
    examples: Annotated[
        int,
        typer.Option(min=1, help="test prompts scored per task (half as many OOD, as many mixed)"),
    ] = 100,
) -> None:
    """The main job on the embedded default: train (or reuse) the tiny expert zoo, merge it
    with every method and with Mediator on a local Ray, print the quality table and routed
    generations."""
    from mediator_ray.quality.demo import demo_limits, run_demo

    try:
        run_demo(workdir, serve=serve, console=console, limits=demo_limits(examples))
    except MediatorError as e:
        raise typer.Exit(_fail(e)) from None


if __name__ == "__main__":
    app()
