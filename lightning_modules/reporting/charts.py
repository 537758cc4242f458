"""Plots on matplotlib's Agg canvas: heatmaps, bar charts, ROC curves and λ paths, each written as a PNG."""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

from datamodules.cache import atomic_write_bytes


def short_name(name: str) -> str:
    """A model or dataset name for labels: a path's last part, a registry name as is."""
    return Path(name).name if ("/" in name or "\\" in name) else name


def wrap_title(width_inches: float, text: str) -> str:
    """A plot title wrapped to the figure's width."""
    return textwrap.fill(text, width=int(width_inches * 11))


def figure(width: float, height: float):
    """A matplotlib Figure drawn off-screen (no pyplot state), laid out automatically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def heatmap(matrix: Sequence[Sequence[float | None]], labels: Sequence[str], title: str, path: Path,
            diverging: bool = False) -> Path:
    """An N×N heatmap (rows: source, columns: target), each cell annotated; None cells stay blank."""
    import numpy as np

    values = np.array([[math.nan if v is None else v for v in row] for row in matrix], dtype=float)
    n = len(labels)
    fig = figure(1.6 + 1.1 * n, 1.2 + 0.9 * n)
    ax = fig.subplots()
    finite = values[np.isfinite(values)]
    if diverging:
        bound = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
        image = ax.imshow(values, cmap="coolwarm", vmin=-bound, vmax=bound)
    else:
        image = ax.imshow(values, cmap="viridis")
    fig.colorbar(image, ax=ax, shrink=0.8)
    for i in range(n):
        for j in range(n):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="black", bbox={"facecolor": "white", "alpha": 0.6, "lw": 0, "pad": 1})
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("target (its head / space)")
    ax.set_ylabel("source (mapped)")
    ax.set_title(wrap_title(1.6 + 1.1 * n, title), fontsize=10)
    return save_png(fig, path)


def bar_chart(values: dict[str, float], title: str, ylabel: str, path: Path, ylim: tuple[float, float] | None = None
              ) -> Path:
    width = max(4.0, 1.5 + 1.0 * len(values))
    fig = figure(width, 3.4)
    ax = fig.subplots()
    bars = ax.bar(list(values), list(values.values()), color="tab:blue")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(wrap_title(width, title), fontsize=10)
    ax.tick_params(axis="x", labelrotation=20)
    return save_png(fig, path)


def roc_chart(curves: dict[str, dict[str, dict[str, list[float]]]], title: str, path: Path) -> Path:
    """One panel per OOD set: {set: {view: {"fpr": [...], "tpr": [...]}}}."""
    width = 3.0 * len(curves) + 0.5
    fig = figure(width, 3.4)
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, views) in zip(axes, curves.items()):
        for view, roc in views.items():
            ax.plot(roc["fpr"], roc["tpr"], label=view)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set(xlabel="FPR (ID flagged)", ylabel="TPR (OOD flagged)", xlim=(0, 1), ylim=(0, 1.01))
        ax.set_title(short_name(name), fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(wrap_title(width, title), fontsize=10)
    return save_png(fig, path)


CRITERION_MARKERS = {"gcv": "o", "val_mse": "s", "head": "^"}


def lambda_path_chart(panels: dict[str, dict[str, dict[str, Any]]], title: str, path: Path) -> Path:
    """Mapped accuracy along the λ path: one panel per task, one thin line per pair, each λ criterion's
    choice marked. `panels`: {task: {pair: {"lambdas": [...], "accuracy": [...], "chosen": {criterion: λ}}}}."""
    width = 3.2 * len(panels) + 0.6
    fig = figure(width, 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (task, pairs) in zip(axes, panels.items()):
        for i, (pair, p) in enumerate(pairs.items()):
            color = f"C{i % 10}"
            ax.plot(p["lambdas"], p["accuracy"], lw=0.9, color=color, label=pair)
            for criterion, lam in p["chosen"].items():
                if lam is not None and lam in p["lambdas"]:
                    ax.plot([lam], [p["accuracy"][p["lambdas"].index(lam)]], CRITERION_MARKERS.get(criterion, "x"),
                            color=color, ms=5, mfc="none")
        ax.set_xscale("log")
        ax.set(xlabel="λ (relative)", ylabel="mapped test accuracy", ylim=(0, 1.02))
        ax.set_title(short_name(task), fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], ls="", marker=m, color="grey", mfc="none") for m in CRITERION_MARKERS.values()]
    labels += [f"chosen by {c}" for c in CRITERION_MARKERS]
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.suptitle(wrap_title(width, title), fontsize=10)
    return save_png(fig, path)
