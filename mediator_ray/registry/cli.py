"""``mediator-ray registry add | list | remove``: the expert registry from the shell.

A typer sub-app mounted by :mod:`mediator_ray.cli`. Like the main CLI, a refused operation
prints one line (no traceback) and exits with code 2, so cron jobs and CI can tell a user
error from a crash.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mediator_ray.errors import MediatorError

registry_app = typer.Typer(
    name="registry",
    help="Announce fine-tuned experts for the scheduled batch merge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

RegistryArg = Annotated[str, typer.Argument(help="registry prefix: a folder or an s3:// URI")]


def _fail(error: MediatorError) -> typer.Exit:
    # Same one-line format as mediator_ray.cli._fail (not imported: that module mounts this one).
    console.print(f"[bold red]error:[/] {error}", soft_wrap=True, highlight=False)
    return typer.Exit(2)


@registry_app.command("add")
def add(
    registry_uri: RegistryArg,
    name: Annotated[str, typer.Argument(help="expert name (becomes a folder name)")],
    model_uri: Annotated[str, typer.Argument(help="the expert's checkpoint folder")],
    base: Annotated[
        str | None, typer.Option("--base", help="base model; required for the first expert")
    ] = None,
    calibration: Annotated[
        str | None, typer.Option("--calibration", help="JSONL of {'prompt': ...} lines")
    ] = None,
) -> None:
    """Validate an expert against the registry's base and announce it."""
    from mediator_ray.registry.registry import Registry

    try:
        record = Registry(registry_uri).add(name, model_uri, base_uri=base, calibration=calibration)
    except MediatorError as e:
        raise _fail(e) from None
    console.print(f"[green]registered[/] {record.name} → {registry_uri}", highlight=False)


@registry_app.command("list")
def list_(
    registry_uri: RegistryArg,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List the registered experts, oldest first."""
    from mediator_ray.registry.registry import Registry

    try:
        registry = Registry(registry_uri)
        info = registry.info()
        records = registry.list()
    except MediatorError as e:
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    out = Console()
    if info is None:
        out.print(f"{registry_uri}: empty registry (no base yet)", highlight=False, soft_wrap=True)
        return
    out.print(
        f"[bold]{registry_uri}[/] — base {info.base_uri} "
        f"(fingerprint {info.base_fingerprint[:12]}), {len(records)} experts",
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    for column in ("name", "model", "calibration", "added (UTC)"):
        table.add_column(column)
    for r in records:
        table.add_row(r.name, r.uri, r.calibration or "-", f"{r.created_at:%Y-%m-%d %H:%M:%S}")
    out.print(table)


@registry_app.command("remove")
def remove(
    registry_uri: RegistryArg,
    name: Annotated[str, typer.Argument(help="expert to withdraw")],
) -> None:
    """Withdraw an expert (its checkpoint is left untouched)."""
    from mediator_ray.registry.registry import Registry

    try:
        Registry(registry_uri).remove(name)
    except MediatorError as e:
        raise _fail(e) from None
    console.print(f"[green]removed[/] {name} from {registry_uri}", highlight=False)
