"""The Mediator trade-off: accuracy against memory over the plan and density options.

One Mediator merge per grid point (route fraction × density × routing embeddings, plus the
other conflict metrics at METHOD.md's defaults), each served with its router and scored on the
in-distribution test prompts. This is how the operating point of the quality table was
chosen, and what a reader needs to judge it: the whole frontier, not one point.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediator_ray.quality.evaluate import (
    EvalLimits,
    MergeSettings,
    QualityReport,
    evaluate_zoo,
)
from mediator_ray.quality.tasks import TaskSuite

ROUTE_FRACTIONS = (0.25, 0.5, 1.0)
DENSITIES = (0.1, 0.25, 0.5)


@dataclass
class SweepPoint:
    options: dict[str, Any]
    routed_layers: list[str]
    accuracy: float
    per_task: dict[str, float]
    serving_bytes: int
    checkpoint_bytes: int


#: SmolLM2's sweep: each point costs a full merge and a router fit of a 135M model plus the
#: scoring, so only the middle ground the quality table leaves open — every layer routed at
#: lower densities, and half the blocks at the table's density.
SMOLLM2_GRID: tuple[dict[str, Any], ...] = tuple(
    {"plan": {"route_fraction": r, "route_embeddings": e}, "sparse": {"density": d}}
    for r, e, d in ((1.0, True, 0.1), (1.0, True, 0.25), (0.5, True, 0.5), (0.5, False, 0.25))
)


def grid() -> list[dict[str, Any]]:
    """The tiny zoo's grid: route fraction × routing embeddings × density, and the other
    conflict metrics at METHOD.md's defaults."""
    points = [
        {"plan": {"route_fraction": r, "route_embeddings": e}, "sparse": {"density": d}}
        for r, e, d in itertools.product(ROUTE_FRACTIONS, (False, True), DENSITIES)
    ]
    for metric in ("sign", "cosine"):
        points.append(
            {
                "conflict": {"metric": metric},
                "plan": {"route_fraction": 0.25},
                "sparse": {"density": 0.1},
            }
        )
    return points


def run_sweep(
    base: Path,
    experts: dict[str, Path],
    calibration: dict[str, Path],
    suite: TaskSuite,
    workdir: Path,
    limits: EvalLimits,
    log: Callable[[str], None],
    options_grid: Sequence[dict[str, Any]] | None = None,
) -> list[SweepPoint]:
    """One Mediator merge + router-scored evaluation per point of ``options_grid``
    (default: :func:`grid`)."""
    options_grid = list(options_grid or grid())
    points = []
    for index, options in enumerate(options_grid):
        report: QualityReport = evaluate_zoo(
            "sweep",
            base,
            experts,
            calibration,
            suite,
            workdir / f"point-{index:02d}",
            settings=MergeSettings(mediator=options),
            limits=limits,
            systems=("mediator",),
            splits=("test",),
        )
        row = report.row("mediator (router)")
        points.append(
            SweepPoint(
                options,
                row.extra["routed_layers"],
                row.mean("test"),
                row.scores["test"],
                row.serving_bytes,
                row.checkpoint_bytes,
            )
        )
        log(f"sweep {index + 1}/{len(options_grid)}: {options} → {row.mean('test'):.3f}")
    return points


def markdown(points: list[SweepPoint], reference: QualityReport) -> str:
    linear = reference.row("linear")
    experts = reference.row("experts (own task)")
    lines = [
        f"Reference: best static merge ({reference.best_static().system}) "
        f"{100 * reference.best_static().mean('test'):.1f} at {linear.serving_bytes / 2**20:.2f} "
        f"MiB; experts on their own tasks {100 * experts.mean('test'):.1f} at "
        f"{experts.serving_bytes / 2**20:.2f} MiB (all four kept).\n",
        "| metric | route fraction | route embeddings | density | routed layers | ID mean "
        "(router) | serving MiB | checkpoint MiB |",
        "|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for p in points:
        plan = p.options["plan"]
        lines.append(
            f"| {p.options.get('conflict', {}).get('metric', 'deviation')} "
            f"| {plan['route_fraction']} | {plan.get('route_embeddings', False)} "
            f"| {p.options['sparse']['density']} | {', '.join(p.routed_layers)} "
            f"| {100 * p.accuracy:.1f} | {p.serving_bytes / 2**20:.2f} "
            f"| {p.checkpoint_bytes / 2**20:.2f} |"
        )
    return "\n".join(lines) + "\n"


def parquet_bytes(points: list[SweepPoint], zoo: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "zoo": zoo,
            "metric": p.options.get("conflict", {}).get("metric", "deviation"),
            "route_fraction": p.options["plan"]["route_fraction"],
            "route_embeddings": bool(p.options["plan"].get("route_embeddings", False)),
            "density": p.options["sparse"]["density"],
            "routed_layers": ",".join(p.routed_layers),
            "accuracy": p.accuracy,
            "serving_bytes": p.serving_bytes,
            "checkpoint_bytes": p.checkpoint_bytes,
        }
        for p in points
    ]
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()
