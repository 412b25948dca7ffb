"""The conflict report (Parquet rows + a PNG chart) and the end-of-merge summary table."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from rich.table import Table

from mediator_ray.pipeline.progress import human_bytes

METRICS = ("deviation", "sign", "cosine")


def conflict_rows(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per layer × metric, with the plan's verdict and per-expert numbers as columns."""
    rows = []
    for layer in manifest["layers"]:
        conflict = layer.get("conflict") or {}
        for metric in METRICS:
            if metric not in conflict:
                continue
            rows.append(
                {
                    "layer": layer["name"],
                    "kind": layer["kind"],
                    "index": layer["index"],
                    "metric": metric,
                    "score": float(conflict[metric]),
                    "action": layer["action"],
                    "decided_by": metric == manifest["plan"]["metric"],
                    "tau_norms": [float(x) for x in conflict.get("tau_norms", [])],
                    "recon_errors": [
                        float(layer.get("recon_errors", {}).get(e, float("nan")))
                        for e in manifest["expert_names"]
                    ],
                }
            )
    return rows


def conflicts_parquet(manifest: Mapping[str, Any]) -> bytes:
    # Imported here: only a Mediator merge's commit writes Parquet, and every Ray worker that
    # imports this package would otherwise carry pyarrow (~22 MB resident each).
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(conflict_rows(manifest))
    table = table.replace_schema_metadata({"experts": ",".join(manifest["expert_names"])})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def conflicts_png(manifest: Mapping[str, Any]) -> bytes:
    """Bar chart of the deciding metric per layer, routed layers highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = manifest["plan"]["metric"]
    layers = manifest["layers"]
    names = [layer["name"] for layer in layers]
    scores = [float((layer.get("conflict") or {}).get(metric, 0.0)) for layer in layers]
    colors = ["#d62728" if layer["action"] == "route" else "#1f77b4" for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names)), 3.6), dpi=110)
    ax.bar(range(len(names)), scores, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel(f"conflict ({metric})")
    ax.set_title(f"Layer-wise conflict — red: routed ({manifest['plan']['rule']})", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def summary_table(manifest: Mapping[str, Any]) -> Table:
    """Layers averaged vs routed, checkpoint size vs base, bytes fetched, time."""
    sizes = manifest["sizes"]
    stats = manifest["stats"]
    actions = [layer["action"] for layer in manifest["layers"]]
    table = Table(title=f"merge summary — {manifest['method']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("output", manifest["output"])
    table.add_row("experts", ", ".join(manifest["expert_names"]))
    table.add_row(
        "layers averaged / routed", f"{actions.count('average')} / {actions.count('route')}"
    )
    ratio = sizes["total_bytes"] / sizes["base_bytes"] if sizes["base_bytes"] else float("nan")
    total, base = human_bytes(sizes["total_bytes"]), human_bytes(sizes["base_bytes"])
    table.add_row("checkpoint size", f"{total} ({ratio:.2f}x base {base})")
    if sizes.get("sparse_bytes"):
        table.add_row("  of which sparse experts", human_bytes(sum(sizes["sparse_bytes"].values())))
    table.add_row(
        "bytes fetched",
        f"{human_bytes(stats['bytes_fetched'])} of {human_bytes(stats['input_bytes'])} input",
    )
    table.add_row("layers resumed", str(stats["layers_resumed"]))
    table.add_row("time", f"{stats['seconds']:.1f} s")
    return table
