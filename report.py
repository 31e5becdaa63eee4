"""Plots and tables. matplotlib with the Agg backend: runs on servers without a display."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path):
    """Write beside, then rename: a reader never sees half a PNG."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(history: list[dict], path: Path, selected_epoch: int | None = None, title: str = ""):
    """Loss and accuracy per epoch for train, hold-out and validation; the selected epoch marked."""
    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for part, style in (("train", "-"), ("holdout", "--"), ("val", "-")):
            values = [float(r.get(f"{part}_{metric}", "nan") or "nan") for r in history]
            if not np.all(np.isnan(values)):
                ax.plot(epochs, values, style, marker=".", label=part)
        if selected_epoch:
            ax.axvline(selected_epoch, color="grey", lw=0.8, ls=":", label=f"selected (epoch {selected_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_confusion(matrix, classes, path: Path, title: str = "validation confusion matrix"):
    """Counts with row-normalised colour, so small classes are as visible as large ones."""
    cm = np.asarray(matrix, dtype=np.float64)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.1 * len(classes) + 1.8))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=35, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save(fig, path)


def plot_label_efficiency(series: dict, path: Path, metrics: dict, title: str = "", references: dict | None = None):
    """Metric against the percentage of training labels, one line per method, error bars across seeds.

    series: {line label: {metric key: [(percent, mean, std), ...]}}; metrics: {metric key: axis label},
    one panel per metric; references: {metric key: (y, label)}, a dashed line such as the majority baseline.
    A log x-axis, because the course's splits are 1, 10, 50 and 100 %."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    percents = sorted({p for by_metric in series.values() for pts in by_metric.values() for p, _, _ in pts})
    for ax, (key, label) in zip(axes[0], metrics.items()):
        for name, by_metric in series.items():
            points = sorted(by_metric.get(key, []))
            if not points:
                continue
            x, mean, std = (np.asarray(v, dtype=np.float64) for v in zip(*points))
            ax.errorbar(x, mean, yerr=np.nan_to_num(std), marker="o", capsize=3, label=name)
        if key in (references or {}):
            y, ref_label = references[key]
            ax.axhline(y, color="grey", ls="--", lw=1, label=ref_label)
        ax.set_xscale("log")
        if percents:
            ax.set_xticks(percents, [f"{p:g}%" for p in percents])
            ax.minorticks_off()
        ax.set_xlabel("training labels (% of WBC_100)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table; '|' inside a cell is escaped so it cannot split the cell."""
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_pretraining(history: list[dict], path: Path, kept_epoch: int | None = None, title: str = ""):
    """Self-supervised pre-training: its loss per epoch, and the frozen-feature probe's validation scores."""
    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    trained = [(e, float(r["loss"])) for e, r in zip(epochs, history) if np.isfinite(float(r["loss"]))]
    if trained:
        axes[0].plot(*zip(*trained), marker=".", label="pre-training loss")
    for key, label in (("probe_balanced_accuracy", "balanced accuracy"), ("probe_macro_f1", "macro-F1")):
        points = [(e, float(r[key])) for e, r in zip(epochs, history) if np.isfinite(float(r[key]))]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=f"probe, val {label}")
    for ax, ylabel in zip(axes, ("loss", "score")):
        if kept_epoch:
            ax.axvline(kept_epoch, color="grey", lw=0.8, ls=":", label=f"encoder.h5 (epoch {kept_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)
