"""Metrics for honest reporting: everything beside plain accuracy that would have exposed a collapsed model.

Computed with scikit-learn from integer labels and predicted probabilities."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

# A model that gives one class to at least this share of the images has collapsed to that class.
COLLAPSE_SHARE = 0.95


def classification_metrics(y_true, probs, classes) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class recall, confusion matrix, majority baseline, collapse."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    # Low-precision softmax outputs sum to 1 only within rounding: renormalise for the log-loss.
    # Clip first (log(0)), then renormalise: sklearn's log_loss insists the rows sum to one.
    probs = np.clip(probs, 1e-7, 1.0)
    probs = probs / probs.sum(1, keepdims=True)
    y_pred = probs.argmax(1)
    labels = list(range(len(classes)))
    present = [c for c in labels if (y_true == c).any()]
    recall = skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    counts = np.bincount(y_true, minlength=len(classes))
    pred_counts = np.bincount(y_pred, minlength=len(classes))
    majority = int(counts.argmax())
    top_pred_share = float(pred_counts.max() / max(1, len(y_pred)))
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        # Balanced accuracy over the classes present in y_true: the mean per-class recall.
        "balanced_accuracy": float(np.mean([recall[c] for c in present])) if present else 0.0,
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class_recall": {classes[c]: float(recall[c]) for c in labels},
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "majority_baseline": float(counts[majority] / max(1, len(y_true))),
        "majority_class": classes[majority],
        "predicted_class_share": {classes[c]: float(pred_counts[c] / max(1, len(y_pred))) for c in labels},
        "collapsed_to_majority": bool(top_pred_share >= COLLAPSE_SHARE),
        "log_loss": float(skm.log_loss(y_true, probs, labels=labels)),
    }


def best_mean_last(values) -> dict:
    """The original report's three columns over the epochs of one run."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"best": float("nan"), "mean": float("nan"), "last": float("nan")}
    return {"best": float(values.max()), "mean": float(values.mean()), "last": float(values[-1])}


def select_epoch(holdout_accuracy, holdout_loss) -> int:
    """Index of the epoch with the best hold-out accuracy; ties go to the lower hold-out loss, then earlier."""
    acc = np.asarray(holdout_accuracy, dtype=np.float64)
    loss = np.asarray(holdout_loss, dtype=np.float64)
    order = np.lexsort((np.arange(len(acc)), loss, -acc))
    return int(order[0])


# ----------------------------------------------------------------------------------------------
# Paired comparisons of two models on the same validation images (reproduce_table.py's comparisons.md)
# ----------------------------------------------------------------------------------------------

def _paired_correctness(correct_a, correct_b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(correct_a).astype(bool)
    b = np.asarray(correct_b).astype(bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired tests need two equal-length 1-D correctness vectors, got {a.shape} and {b.shape}")
    return a, b


def mcnemar_exact(correct_a, correct_b) -> dict:
    """McNemar's exact test on per-image correctness of two models on the same images.

    Only the discordant images carry information: under 'both models are equally accurate' each of the
    n = only_a + only_b discordant images is equally likely to favour either model, so only_a ~ Binomial(n, 1/2);
    the two-sided exact binomial p-value (scipy.stats.binomtest). No discordant images: p = 1."""
    from scipy.stats import binomtest
    a, b = _paired_correctness(correct_a, correct_b)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    return {"images": int(a.size), "both_correct": int((a & b).sum()), "both_wrong": int((~a & ~b).sum()),
            "only_a": only_a, "only_b": only_b,
            "p_value": float(binomtest(only_a, n, 0.5).pvalue) if n else 1.0}


def paired_bootstrap_difference(correct_a, correct_b, n_resamples: int = 10000, confidence: float = 0.95,
                                seed: int = 0) -> dict:
    """Accuracy of A minus accuracy of B with a seeded paired bootstrap percentile interval.

    Images are resampled with replacement, the same images for both models (scipy.stats.bootstrap on the
    per-image difference), so the interval accounts for the two models being scored on the same images.
    Inputs may be 0/1 correctness or per-image fractions (e.g. correctness averaged over seeds)."""
    from scipy.stats import bootstrap
    a = np.asarray(correct_a, dtype=np.float64)  # 0/1 correctness, or a per-image mean over seeds
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired tests need two equal-length 1-D vectors, got {a.shape} and {b.shape}")
    diff = a - b
    out = {"accuracy_a": float(a.mean()) if a.size else float("nan"),
           "accuracy_b": float(b.mean()) if b.size else float("nan"),
           "difference": float(diff.mean()) if diff.size else float("nan"),
           "confidence": confidence, "n_resamples": int(n_resamples), "bootstrap_seed": int(seed)}
    if diff.size == 0:
        return {**out, "low": float("nan"), "high": float("nan")}
    if np.all(diff == diff[0]):  # every resample gives the same difference: the interval is that point
        return {**out, "low": float(diff[0]), "high": float(diff[0])}
    res = bootstrap((diff,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                    method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return {**out, "low": float(res.confidence_interval.low), "high": float(res.confidence_interval.high)}


def adjust_p_values(p_values) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (scipy), for a file that reports many comparisons at once."""
    from scipy.stats import false_discovery_control
    p = np.asarray(p_values, dtype=np.float64)
    return false_discovery_control(p).tolist() if p.size else []


# ----------------------------------------------------------------------------------------------
# The accuracy table's statistics (reproduce_table.py). A record is one finished run: {"row": its table row
# (.name, .split), "seed": int, "dir": the folder of its metrics.json and val_predictions.csv, "metrics": dict}
# ----------------------------------------------------------------------------------------------

def flatten(values: dict) -> dict:
    """metrics.json as CSV columns: dicts become key_subkey columns, lists become JSON text."""
    import json
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        elif isinstance(value, list):
            flat[key] = json.dumps(value)
        else:
            flat[key] = value
    return flat


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) across seeds; the deviation is NaN for a single seed."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def read_correctness(run_dir) -> dict[str, int]:
    """{image path: 1 if the run's selected model got it right, else 0} from its val_predictions.csv."""
    import csv
    from pathlib import Path
    with open(Path(run_dir) / "val_predictions.csv", newline="") as f:
        return {r["path"]: int(r["correct"]) for r in csv.DictReader(f)}


def paired_comparisons(records: list[dict], pairs, splits, n_resamples: int) -> list[dict]:
    """For each split and pair (a suffix, b suffix) of row names: a McNemar test and a paired bootstrap per shared
    seed, and a bootstrap on each image's correctness averaged over the seeds; p-values Benjamini-Hochberg
    adjusted over every test returned. Runs on different validation images get a note instead."""
    runs = {(r["row"].name, r["seed"]): r for r in records}
    out = []
    for split in splits:
        for a_suffix, b_suffix in pairs:
            a_name, b_name = f"{split}_{a_suffix}", f"{split}_{b_suffix}"
            seeds = sorted(s for (n, s) in runs if n == a_name and (b_name, s) in runs)
            if not seeds:
                continue
            per_seed_a, per_seed_b = [], []
            for seed in seeds:
                ca, cb = read_correctness(runs[a_name, seed]["dir"]), read_correctness(runs[b_name, seed]["dir"])
                if ca.keys() != cb.keys():
                    out.append({"split": split, "a": a_name, "b": b_name, "seed": seed,
                                "note": "different validation images; not compared"})
                    continue
                images = sorted(ca)
                a = np.array([ca[p] for p in images])
                b = np.array([cb[p] for p in images])
                per_seed_a.append(a)
                per_seed_b.append(b)
                out.append({"split": split, "a": a_name, "b": b_name, "seed": seed, **mcnemar_exact(a, b),
                            **paired_bootstrap_difference(a, b, n_resamples, seed=seed)})
            if len(per_seed_a) > 1:
                # Each image's correctness averaged over seeds, then the paired bootstrap over images.
                a, b = np.mean(per_seed_a, 0), np.mean(per_seed_b, 0)
                out.append({"split": split, "a": a_name, "b": b_name, "seed": "mean",
                            "images": len(a), **paired_bootstrap_difference(a, b, n_resamples, seed=0)})
    tested = [c for c in out if "p_value" in c]
    for c, p in zip(tested, adjust_p_values([c["p_value"] for c in tested])):
        c["p_adjusted"] = p
    return out
