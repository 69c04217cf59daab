"""Classification metrics in plain numpy (the edge side has no scikit-learn).

Conventions follow scikit-learn: a class with no predictions has precision 0, with no support recall 0;
macro averages are unweighted means over classes, weighted averages use support.
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """counts[i, j] = images of true class i predicted as j (rows true, columns predicted)."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred differ in length")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError("label outside 0..num_classes-1")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def classification_metrics(y_true, y_pred, class_names) -> dict:
    """Accuracy, macro/weighted F1, per-class precision/recall/F1/support and the confusion matrix."""
    names = list(class_names)
    cm = confusion_matrix(y_true, y_pred, len(names))
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = int(cm.sum())
    weights = _safe_div(support, total) if total else np.zeros(len(names))
    return {
        "num_samples": total,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * weights).sum()),
        "per_class": {
            n: {"precision": float(precision[i]), "recall": float(recall[i]),
                "f1": float(f1[i]), "support": int(support[i])}
            for i, n in enumerate(names)
        },
        "classes": names,
        "confusion_matrix": cm.tolist(),
    }


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature in float64 (rows sum to 1)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def log_loss(y_true, probs, eps: float = 1e-12) -> float:
    """Mean cross-entropy of the true class under `probs` (N x C, rows summing to 1)."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(y_true, dtype=np.int64)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(t)), t], eps, 1.0))))


ECE_BINS = 15  # equal-width confidence bins of every ECE the project reports


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """ECE of the top-1 confidence over equal-width bins, and the bins (for the reliability diagram)."""
    p = np.asarray(probs)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = pred == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    table, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        n = int(inside.sum())
        acc = float(correct[inside].mean()) if n else None
        mean_conf = float(conf[inside].mean()) if n else None
        if n:
            ece += n / len(conf) * abs(acc - mean_conf)
        table.append({"low": float(lo), "high": float(hi), "count": n, "accuracy": acc, "confidence": mean_conf})
    return float(ece), table


def binary_roc_auc(is_positive, scores) -> float | None:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) statistic, ties counted half.
    None when only one class is present (AUC undefined)."""
    y = np.asarray(is_positive, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks of tied groups
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_ovr(y_true, probs, class_names) -> dict:
    """One-vs-rest ROC-AUC per class and their macro mean (over classes where it is defined)."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(y_true, dtype=np.int64)
    per = {n: binary_roc_auc(t == i, p[:, i]) for i, n in enumerate(class_names)}
    defined = [v for v in per.values() if v is not None]
    return {"per_class": per, "macro": float(np.mean(defined)) if defined else None}


def metrics_markdown(m: dict, title: str | None = None) -> str:
    """The seed-style tables (summary, per-class, confusion matrix) from a classification_metrics dict."""
    names = m["classes"]
    lines = [f"## {title}", ""] if title else []
    lines += ["| Metric | Value |", "|---|---|",
              f"| Accuracy | {m['accuracy'] * 100:.2f}% |",
              f"| Macro F1 | {m['macro_f1']:.4f} |",
              f"| Weighted F1 | {m['weighted_f1']:.4f} |"]
    if "loss" in m:
        lines.append(f"| Loss (cross-entropy) | {m['loss']:.4f} |")
    lines.append(f"| Images | {m['num_samples']} |")
    lines += ["", "| Class | Precision | Recall | F1 | Support |", "|---|---|---|---|---|"]
    for n in names:
        c = m["per_class"][n]
        lines.append(f"| {n} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    lines += ["", "Confusion matrix (rows = true, columns = predicted):", "",
              "| true \\ pred | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for n, row in zip(names, m["confusion_matrix"]):
        lines.append(f"| {n} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def ood_separation(in_scores, out_scores) -> dict:
    """How well an out-of-distribution score (higher = less like the training data) separates out-of-
    distribution images from in-distribution ones: AUROC (OOD as positives), and FPR@95 — the share of
    OOD images still accepted at the score that accepts 95 % of the in-distribution images."""
    s_in, s_out = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    cut = float(np.quantile(s_in, 0.95, method="higher"))
    auroc = binary_roc_auc(np.r_[np.zeros(len(s_in), bool), np.ones(len(s_out), bool)], np.r_[s_in, s_out])
    return {"auroc": auroc, "fpr_at_95": float((s_out <= cut).mean()) if len(s_out) else None}
