"""The quality table as Markdown, Parquet (one row per system × split × task) and a PNG chart,
plus a rich table for the terminal."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from mediator_ray.quality.evaluate import QualityReport, SystemResult


def _pct(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _mib(value: int) -> str:
    return f"{value / 2**20:.2f}"


def table_rows(report: QualityReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the Markdown and the terminal table."""
    header = [
        "system",
        *report.tasks,
        "ID mean",
        "OOD mean",
        "mixed",
        "checkpoint MiB",
        "serving MiB",
        "peak MiB",
    ]
    rows = []
    for r in report.results:
        rows.append(
            [
                r.system,
                *[_pct(r.scores.get("test", {}).get(t, math.nan)) for t in report.tasks],
                _pct(r.mean("test", report.tasks)),
                _pct(r.mean("ood", report.tasks)),
                _pct(r.scores.get("mixed", {}).get("all", math.nan)),
                _mib(r.checkpoint_bytes),
                _mib(r.serving_bytes),
                _mib(r.peak_bytes),
            ]
        )
    return header, rows


def markdown(report: QualityReport) -> str:
    header, rows = table_rows(report)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_lines(report: QualityReport) -> list[str]:
    """The comparisons the table exists for, in words."""
    lines = []
    experts = _maybe(report, "experts (own task)")
    mediator = _maybe(report, "mediator (router)")
    statics = [r for r in report.results if r.kind == "static"]
    if mediator and statics:
        best = report.best_static()
        lines.append(
            f"Mediator (router) ID mean {_pct(mediator.mean('test'))} vs best static merge "
            f"({best.system}) {_pct(best.mean('test'))}"
            + (f" and experts on their own tasks {_pct(experts.mean('test'))}" if experts else "")
        )
        if experts:
            lines.append(
                f"Serving memory: Mediator {_mib(mediator.serving_bytes)} MiB at load "
                f"({100 * mediator.serving_bytes / experts.serving_bytes:.0f}% of keeping all "
                f"experts, {_mib(experts.serving_bytes)} MiB), {_mib(mediator.peak_bytes)} MiB "
                "after serving with the runtime's LRU of materialised mixes"
            )
        extra = mediator.extra
        lines.append(
            f"Mediator routes {len(extra.get('routed_layers', []))} layers "
            f"({', '.join(extra.get('routed_layers', []))}) at density {extra.get('density')}; "
            f"router accuracy on test prompts {_pct(extra.get('router_test_accuracy', math.nan))}"
        )
    return lines


def _maybe(report: QualityReport, system: str) -> SystemResult | None:
    return next((r for r in report.results if r.system == system), None)


def records(report: QualityReport) -> list[dict[str, Any]]:
    out = []
    for r in report.results:
        for split, per_task in r.scores.items():
            for task, value in per_task.items():
                out.append(
                    {
                        "zoo": report.zoo,
                        "system": r.system,
                        "kind": r.kind,
                        "split": split,
                        "task": task,
                        "accuracy": value,
                        "checkpoint_bytes": r.checkpoint_bytes,
                        "serving_bytes": r.serving_bytes,
                        "peak_bytes": r.peak_bytes,
                        "eval_seconds": round(r.seconds, 2),
                    }
                )
    return out


def parquet_bytes(report: QualityReport) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records(report)), sink)
    return sink.getvalue()


def png_bytes(report: QualityReport) -> bytes:
    """Grouped bars: mean accuracy per split for every system, serving memory annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.results if r.kind != "expert"]
    splits = [("test", "in-distribution"), ("ood", "unseen phrasing"), ("mixed", "mixed")]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    width = 0.8 / len(splits)
    for k, (split, label) in enumerate(splits):
        values = [
            r.scores.get("mixed", {}).get("all", math.nan) if split == "mixed" else r.mean(split)
            for r in rows
        ]
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax.bar(xs, [0 if math.isnan(v) else 100 * v for v in values], width, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(
        [f"{r.system}\n{_mib(r.serving_bytes)} MiB" for r in rows], rotation=30, ha="right"
    )
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Quality on the {report.zoo} zoo (serving memory under each system)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    sink = io.BytesIO()
    fig.savefig(sink, format="png", dpi=110)
    plt.close(fig)
    return sink.getvalue()


def write_results(report: QualityReport, folder: Path, preamble: str = "") -> dict[str, Path]:
    """``quality-<zoo>.md``, ``.parquet`` and ``.png`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"quality-{report.zoo}"
    paths = {
        "md": stem.with_suffix(".md"),
        "parquet": stem.with_suffix(".parquet"),
        "png": stem.with_suffix(".png"),
    }
    text = preamble + markdown(report) + "\n" + "".join(f"- {s}\n" for s in summary_lines(report))
    paths["md"].write_text(text)
    paths["parquet"].write_bytes(parquet_bytes(report))
    paths["png"].write_bytes(png_bytes(report))
    return paths


def rich_table(report: QualityReport) -> Any:
    from rich.table import Table

    header, rows = table_rows(report)
    table = Table(title=f"Quality on the {report.zoo} zoo (exact match %, test split)")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for r, row in zip(report.results, rows, strict=True):
        style = "bold green" if r.system == "mediator (router)" else None
        table.add_row(*row, style=style)
    return table
