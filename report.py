"""Plots and tables: training curves, confusion matrices, Grad-CAM pictures and the accuracy table's files.

matplotlib with the Agg backend: runs on servers without a display."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path, dpi: int = 110, tight: bool = True):
    """Write beside, then rename: a reader never sees half a PNG."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    os.replace(tmp, path)


def _epoch_axes(ax, ylabel: str, marked_epoch: int | None, mark_label: str):
    """Label a per-epoch axis, with a dotted line at the epoch that was kept."""
    if marked_epoch:
        ax.axvline(marked_epoch, color="grey", lw=0.8, ls=":", label=mark_label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_curves(history: list[dict], path: Path, selected_epoch: int | None = None, title: str = ""):
    """Loss and accuracy per epoch for train, hold-out and validation; the selected epoch marked."""
    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for part, style in (("train", "-"), ("holdout", "--"), ("val", "-")):
            values = [float(r.get(f"{part}_{metric}", "nan") or "nan") for r in history]
            if not np.all(np.isnan(values)):
                ax.plot(epochs, values, style, marker=".", label=part)
        _epoch_axes(ax, metric, selected_epoch, f"selected (epoch {selected_epoch})")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_confusion(matrix, classes, path: Path, title: str = "validation confusion matrix"):
    """Each cell: its count and its share of the true class's images (row-normalised, also the colour), so a
    rare class's row reads as clearly as a common one's."""
    cm = np.asarray(matrix, dtype=np.float64)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.3 * len(classes) + 2.5, 1.1 * len(classes) + 1.8))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}\n{rates[i, j]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=35, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (row: % of its images)")
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


def plot_heatmap(picture, text: str, path: Path, cmap: str = "jet") -> tuple[int, int]:
    """A heatmap overlay (uint8 RGB) at its own pixel size, its caption above and a colour bar beside it
    (0: the class score does not depend on that place; 1: it depends on it most). Returns the picture's top-left
    corner in the PNG, in pixels (x, y)."""
    import textwrap
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    h, w = picture.shape[:2]
    dpi, font, margin, bar = 100, 8, 6, 60  # bar: pixels right of the picture for the bar and its labels
    width = w + bar
    lines = textwrap.wrap(text, max(16, int(width / 5.0))) or [""]
    top = 13 * len(lines) + 2 * margin
    height = h + top + margin
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, margin / height, w / width, h / height))
    ax.imshow(picture, interpolation="nearest")
    ax.set_axis_off()
    fig.text(margin / width, 1 - margin / height, "\n".join(lines), va="top", ha="left", fontsize=font)
    cax = fig.add_axes(((w + 8) / width, margin / height, 10 / width, h / height))
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=cax, ticks=[0, 0.5, 1])
    cax.tick_params(labelsize=font - 1)
    _save(fig, path, dpi=dpi, tight=False)
    return 0, top


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
        _epoch_axes(ax, ylabel, kept_epoch, f"encoder.h5 (epoch {kept_epoch})")
    if title:
        fig.suptitle(title)
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# The accuracy table's files (reproduce_table.py): results.csv, table.md, comparisons.md, label_efficiency.png.
# A record is one finished run (metrics.py): {"row": its table row (.name, .split, .method, .recipe, .label,
# .percent), "seed", "dir", "metrics": its metrics.json}
# ----------------------------------------------------------------------------------------------

TABLE_METRICS = [("val_accuracy_best", "Best"), ("val_accuracy_mean", "Mean"), ("val_accuracy_last", "Last"),
                 ("val_accuracy_selected", "Selected epoch"), ("balanced_accuracy", "Balanced acc."),
                 ("macro_f1", "Macro-F1"), ("majority_baseline", "Majority baseline")]
SECTIONS = [("report", "The report's recipe (its CNN with a flatten head, its augmentation, no class weights)"),
            ("default", "The project's default recipe (docs/results.md)"),
            ("resnet", "ResNet50 (pretrain_resnet.py)")]
PLOT_METRICS = {"val_accuracy_selected": "val accuracy (hold-out-selected epoch)",
                "balanced_accuracy": "val balanced accuracy"}


def mean_std_text(values) -> str:
    """'mean ± std' across seeds with three decimals; the mean alone for one seed."""
    import math
    from metrics import mean_std
    mean, std = mean_std(values)
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def results_csv(records: list[dict]) -> str:
    """A row per run: its table row, split, label percentage, method, recipe, seed, every metric, its folder."""
    import csv
    import io
    from metrics import flatten
    ids = ["row", "split", "label_percent", "method", "recipe", "seed"]
    flats = [flatten(r["metrics"]) for r in records]
    columns = []
    for flat in flats:
        columns += [k for k in flat if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ids + columns + ["run_dir"], restval="")
    w.writeheader()
    for rec, flat in zip(records, flats):
        row = rec["row"]
        w.writerow({"row": row.name, "split": row.split, "label_percent": row.percent, "method": row.method,
                    "recipe": row.recipe, "seed": rec["seed"], **flat, "run_dir": str(rec["dir"])})
    return buf.getvalue()


def table_md(records: list[dict], config: dict, failures: list[dict], config_keys, splits) -> str:
    """table.md: a section per recipe, a line per row (splits in `splits` order, rows in the order the records
    come), each cell mean ± std across seeds; the failed runs at the end."""
    by_row = {}
    for rec in records:
        by_row.setdefault(rec["row"].name, []).append(rec)
    order = sorted(by_row, key=lambda n: (list(splits).index(by_row[n][0]["row"].split), list(by_row).index(n)))
    lines = ["# Validation accuracy table", ""]
    if config.get("demo"):
        lines += ["**Synthetic demo data** (drawn cells): these numbers show that the code runs, nothing about "
                  "real blood cells.", ""]
    lines += [f"Settings: {', '.join(f'{k} {config.get(k)}' for k in config_keys if config.get(k) is not None)}.",
              "", "Best / Mean / Last: the report's columns, over the epochs of a run (Best and Mean look at the "
              "validation set, so they are optimistic). Selected epoch: validation accuracy of the epoch chosen on "
              "a hold-out of the training split, the honest number. Each cell: mean ± standard deviation across "
              "seeds. ⚠ marks rows where a run predicted one class for ≥ 95% of the images (it collapsed, usually to "
              "the majority class); compare those with the majority baseline.", ""]
    for recipe, title in SECTIONS:
        section = [r for r in order if by_row[r][0]["row"].recipe == recipe]
        if not section:
            continue
        body = []
        for name in section:
            recs = sorted(by_row[name], key=lambda r: r["seed"])
            row = recs[0]["row"]
            collapsed = sum(bool(r["metrics"].get("collapsed_to_majority")) for r in recs)
            body.append([row.split, row.method + (" ⚠" if collapsed else ""),
                         *[mean_std_text([r["metrics"][k] for r in recs]) for k, _ in TABLE_METRICS],
                         len(recs), f"{collapsed}/{len(recs)}"])
        headers = ["Split", "Method", *[h for _, h in TABLE_METRICS], "Seeds", "Collapsed"]
        lines += [f"## {title}", "", markdown_table(headers, body)]
    if failures:
        lines += ["## Runs that failed", "", markdown_table(
            ["Row", "Seed", "Exit", "Reason", "Log"],
            [[f["row"], f["seed"], f["exit"], f["reason"], f["log"]] for f in failures])]
    return "\n".join(lines)


def comparisons_md(results: list[dict], config: dict, n_resamples: int, splits) -> str:
    """comparisons.md from metrics.paired_comparisons: a table per split, a line per comparison."""
    lines = ["# Paired comparisons on the same validation images", ""]
    if config.get("demo"):
        lines += ["**Synthetic demo data**: these numbers show that the code runs, nothing about real cells.", ""]
    lines += ["A − B: accuracy of A minus accuracy of B at each run's hold-out-selected epoch, with a paired "
              f"bootstrap 95% interval ({n_resamples} resamples of the validation images, seeded). "
              "Only A / only B: images one model gets right and the other wrong; McNemar's exact test asks whether "
              "that split is lopsided beyond chance (two-sided). BH p: Benjamini-Hochberg adjusted over every test "
              "in this file. Seed 'mean': each image's correctness averaged over the seeds, then bootstrapped, so "
              "the interval reflects the validation images, not the spread between training runs "
              "(see table.md for that).", ""]
    if not results:
        return "\n".join(lines + ["No pair of rows has finished runs with a shared seed yet.", ""])
    for split in splits:
        body = []
        for c in (c for c in results if c["split"] == split):
            if "note" in c:
                body.append([c["a"], c["b"], c["seed"], "", "", "", "", "", "", "", c["note"]])
                continue
            tested = "p_value" in c
            body.append([c["a"].removeprefix(split + "_"), c["b"].removeprefix(split + "_"), c["seed"], c["images"],
                         f"{c['accuracy_a']:.3f}", f"{c['accuracy_b']:.3f}",
                         f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]",
                         f"{c['only_a']} / {c['only_b']}" if tested else "",
                         f"{c['p_value']:.3g}" if tested else "", f"{c['p_adjusted']:.3g}" if tested else "",
                         _verdict(c)])
        if body:
            lines += [f"## {split}", "", markdown_table(
                ["A", "B", "Seed", "Images", "Acc. A", "Acc. B", "A − B [95% CI]", "Only A / only B",
                 "McNemar p", "BH p", "Reading"], body)]
    return "\n".join(lines)


def _verdict(c: dict) -> str:
    if "p_value" in c:
        return "differ (BH p < 0.05)" if c["p_adjusted"] < 0.05 else "no clear difference"
    return "interval excludes 0" if c["low"] > 0 or c["high"] < 0 else "interval includes 0"


def plot_table_label_efficiency(records: list[dict], path: Path, demo: bool):
    """label_efficiency.png: PLOT_METRICS against the label percentage, a line per method (mean ± std across
    seeds), with what always answering one class would score."""
    from metrics import mean_std
    values = {}  # label -> metric -> percent -> [value per seed]
    for rec in records:
        for key in PLOT_METRICS:
            by_pct = values.setdefault(rec["row"].label, {}).setdefault(key, {})
            by_pct.setdefault(rec["row"].percent, []).append(rec["metrics"][key])
    series = {label: {key: [(p, *mean_std(v)) for p, v in by_pct.items()] for key, by_pct in by_metric.items()}
              for label, by_metric in values.items()}
    # What a model that always answers the majority class scores: accuracy = its share, balanced = 1 / classes.
    first = records[0]["metrics"]
    references = {"val_accuracy_selected": (first["majority_baseline"], "majority-class baseline"),
                  "balanced_accuracy": (1 / len(first["classes"]), "one-class baseline")}
    plot_label_efficiency(series, path, PLOT_METRICS, references=references,
                          title=("synthetic demo data; " if demo else "") + "mean ± std across seeds")
