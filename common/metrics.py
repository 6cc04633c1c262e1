"""The metrics every task reports, computed the same way everywhere."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def gender_metrics(gender_true, p_female, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1 (female = positive class), ROC AUC and the confusion matrix."""
    y_true = np.asarray(gender_true).astype(int).ravel()
    p = np.asarray(p_female, dtype=float).ravel()
    y_pred = (p >= threshold).astype(int)
    both_classes = len(np.unique(y_true)) == 2
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, p)) if both_classes else float("nan"),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist(),
        "n": int(len(y_true)),
    }


def age_metrics(age_true, age_pred) -> dict:
    """MAE, MSE, RMSE in years and CS@5 (share of faces within 5 years)."""
    true = np.asarray(age_true, dtype=float).ravel()
    pred = np.asarray(age_pred, dtype=float).ravel()
    error = pred - true
    mse = float(np.mean(error**2))
    return {
        "mae": float(np.mean(np.abs(error))),
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "cs5": float(np.mean(np.abs(error) <= 5.0)),
        "n": int(len(true)),
    }


# the comparison's columns (compare, readme): (key, header, format, better); better is "max", "min" or None
THROUGHPUT_BATCH = 64  # compare's batched timing
GENDER_COLUMNS = [("accuracy", "accuracy", "{:.4f}", "max"), ("precision", "precision", "{:.4f}", "max"),
                  ("recall", "recall", "{:.4f}", "max"), ("f1", "F1", "{:.4f}", "max"),
                  ("roc_auc", "ROC AUC", "{:.4f}", "max")]
AGE_COLUMNS = [("mae", "MAE (years)", "{:.2f}", "min"), ("mse", "MSE", "{:.1f}", "min"),
               ("rmse", "RMSE", "{:.2f}", "min"), ("cs5", "CS@5", "{:.3f}", "max")]
COST_COLUMNS = [("backend", "runs", "{}", None), ("parameters", "parameters", "{:,.0f}", "min"),
                ("size_mb", "file MB", "{:.2f}", "min"),
                ("ms_batch1", "CPU ms/image (batch 1)", "{:.2f}", "min"),
                ("images_per_s", f"images/s (batch {THROUGHPUT_BATCH})", "{:,.0f}", "max")]
METRIC_COLUMNS = GENDER_COLUMNS + AGE_COLUMNS
