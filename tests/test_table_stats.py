"""The accuracy table's statistics (metrics.py) and files (report.py) on constructed runs: no training."""
import csv
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

import metrics
import report

PAIRS = [("masked-only_report", "raw_report")]
SPLITS = ("WBC_1", "WBC_10")


def row(split, method, recipe="report"):
    return SimpleNamespace(name=f"{split}_{method}_{recipe}", split=split, method=method, recipe=recipe,
                           label=f"{method} ({recipe})", percent=int(split.split("_")[1]))


def run(tmp_path, r, seed, correct, accuracy=None, collapsed=False, paths=None):
    """A finished run's record, with a val_predictions.csv of the given per-image correctness."""
    folder = tmp_path / f"{r.name}_seed{seed}"
    folder.mkdir()
    paths = paths or [f"img{i}.png" for i in range(len(correct))]
    with open(folder / "val_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "correct"])
        w.writerows([p, "a", "a" if c else "b", c] for p, c in zip(paths, correct))
    acc = float(np.mean(correct)) if accuracy is None else accuracy
    m = {k: acc for k, _ in report.TABLE_METRICS}
    m.update({"collapsed_to_majority": collapsed, "majority_baseline": 0.5, "classes": ["a", "b"],
              "per_class_recall": {"a": 1.0, "b": 0.0}, "confusion_matrix": [[1, 0], [1, 0]]})
    return {"row": r, "seed": seed, "dir": folder, "metrics": m}


def test_flatten_spreads_dicts_and_writes_lists_as_json():
    flat = metrics.flatten({"accuracy": 0.5, "per_class_recall": {"a": 1.0, "b": 0.0}, "confusion_matrix": [[1, 0]]})
    assert flat == {"accuracy": 0.5, "per_class_recall_a": 1.0, "per_class_recall_b": 0.0,
                    "confusion_matrix": "[[1, 0]]"}


def test_mean_std_is_the_sample_deviation_and_one_seed_has_none():
    mean, std = metrics.mean_std([0.5, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(math.sqrt(0.02))  # ddof 1, not 0.1
    mean, std = metrics.mean_std([0.5])
    assert mean == 0.5 and math.isnan(std)
    assert report.mean_std_text([0.5, 0.7]) == "0.600 ± 0.141" and report.mean_std_text([0.5]) == "0.500"


def test_paired_comparisons_per_seed_and_over_seeds(tmp_path):
    a, b = row("WBC_1", "masked-only"), row("WBC_1", "raw")
    # Seed 0: A right on 8 images B gets wrong, B right on 1 A gets wrong; seed 1: the same images, milder.
    ca0, cb0 = [1] * 8 + [0] + [1] * 11, [0] * 8 + [1] + [1] * 11
    ca1, cb1 = [1] * 3 + [0] * 2 + [1] * 15, [0] * 3 + [1] * 2 + [1] * 15
    records = [run(tmp_path, a, 0, ca0), run(tmp_path, b, 0, cb0), run(tmp_path, a, 1, ca1),
               run(tmp_path, b, 1, cb1), run(tmp_path, row("WBC_10", "raw"), 0, [1, 0])]  # no partner: no pair
    out = metrics.paired_comparisons(records, PAIRS, SPLITS, n_resamples=500)
    assert [(c["split"], c["seed"]) for c in out] == [("WBC_1", 0), ("WBC_1", 1), ("WBC_1", "mean")]
    for c, (x, y) in zip(out, ((ca0, cb0), (ca1, cb1))):
        assert (c["a"], c["b"]) == ("WBC_1_masked-only_report", "WBC_1_raw_report")
        expected = metrics.mcnemar_exact(x, y)
        assert (c["only_a"], c["only_b"], c["p_value"]) == (expected["only_a"], expected["only_b"],
                                                            expected["p_value"])
        assert c["difference"] == pytest.approx(np.mean(x) - np.mean(y))
    # Benjamini-Hochberg over the two tests: the smaller p is doubled, the larger kept.
    p0, p1 = out[0]["p_value"], out[1]["p_value"]
    assert p0 < p1 and out[0]["p_adjusted"] == pytest.approx(min(1.0, 2 * p0)) and \
        out[1]["p_adjusted"] == pytest.approx(p1)
    # Over seeds: each image's correctness averaged, no McNemar test.
    mean = out[2]
    assert "p_value" not in mean and mean["images"] == 20
    assert mean["difference"] == pytest.approx((np.mean(ca0) + np.mean(ca1) - np.mean(cb0) - np.mean(cb1)) / 2)


def test_runs_on_different_images_are_not_compared(tmp_path):
    a, b = row("WBC_1", "masked-only"), row("WBC_1", "raw")
    records = [run(tmp_path, a, 0, [1, 0], paths=["x.png", "y.png"]),
               run(tmp_path, b, 0, [1, 0], paths=["x.png", "z.png"])]
    out = metrics.paired_comparisons(records, PAIRS, SPLITS, n_resamples=100)
    assert out == [{"split": "WBC_1", "a": a.name, "b": b.name, "seed": 0,
                    "note": "different validation images; not compared"}]
    assert "different validation images" in report.comparisons_md(out, {}, 100, SPLITS)


def test_table_md_orders_splits_marks_collapse_and_shows_mean_and_std(tmp_path):
    records = [run(tmp_path, row("WBC_10", "raw"), 0, [1, 1], accuracy=0.9),
               run(tmp_path, row("WBC_1", "raw"), 0, [1, 0], accuracy=0.5, collapsed=True),
               run(tmp_path, row("WBC_1", "raw"), 1, [1, 0], accuracy=0.7)]
    text = report.table_md(records, {"demo": True, "epochs": 3}, [], ("epochs",), SPLITS)
    assert "Synthetic demo data" in text and "Settings: epochs 3." in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| WBC_")]
    assert lines[0].startswith("| WBC_1 | raw ⚠ | 0.600 ± 0.141 |") and lines[0].endswith("| 2 | 1/2 |")
    assert lines[1].startswith("| WBC_10 | raw | 0.900 |")  # fewest labels first, whatever the record order
    failed = report.table_md(records, {}, [{"row": "WBC_1_raw_report", "seed": 2, "exit": 1, "reason": "error: x",
                                            "log": "l"}], (), SPLITS)
    assert "## Runs that failed" in failed and "| WBC_1_raw_report | 2 | 1 | error: x | l |" in failed


def test_results_csv_has_a_row_per_run_with_its_label_percentage_and_flat_metrics(tmp_path):
    records = [run(tmp_path, row("WBC_10", "raw"), 3, [1, 0])]
    rows = list(csv.DictReader(io.StringIO(report.results_csv(records))))
    assert len(rows) == 1
    r = rows[0]
    assert (r["row"], r["label_percent"], r["seed"], r["per_class_recall_a"]) == ("WBC_10_raw_report", "10", "3", "1.0")
    assert json.loads(r["confusion_matrix"]) == [[1, 0], [1, 0]] and r["run_dir"].endswith("WBC_10_raw_report_seed3")


def test_label_efficiency_plot_is_written(tmp_path):
    records = [run(tmp_path, row(s, "raw"), k, [1, 0]) for s in SPLITS for k in (0, 1)]
    report.plot_table_label_efficiency(records, tmp_path / "eff.png", demo=True)
    assert (tmp_path / "eff.png").stat().st_size > 1000
