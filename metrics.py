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
    probs = probs / np.maximum(probs.sum(1, keepdims=True), 1e-12)
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
        "log_loss": float(skm.log_loss(y_true, np.clip(probs, 1e-7, 1.0), labels=labels)),
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
