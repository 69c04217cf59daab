"""The numbers of an evaluation: metrics, calibration (ECE), failure modes and hard examples."""
from __future__ import annotations

import numpy as np

from xray.common.metrics import classification_metrics, log_loss, roc_auc_ovr
from xray.common.metrics import expected_calibration_error  # noqa: F401  (moved to common: export and infer use it)

HARD_COLUMNS = ("path", "true", "predicted", "probability", "true_probability", "margin", "reason")


def evaluate(probs, labels, classes) -> dict:
    from sklearn.metrics import average_precision_score

    probs, labels = np.asarray(probs), np.asarray(labels)
    m = classification_metrics(labels, probs.argmax(axis=1), classes)
    m["loss"] = log_loss(labels, probs)
    m["roc_auc_ovr"] = roc_auc_ovr(labels, probs, classes)
    m["average_precision"] = {c: (float(average_precision_score(labels == i, probs[:, i]))
                                  if 0 < (labels == i).sum() < len(labels) else None) for i, c in enumerate(classes)}
    m["ece"], m["reliability"] = expected_calibration_error(probs, labels)
    return m


def margins(probs) -> np.ndarray:
    top2 = np.sort(np.asarray(probs), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def failures(files, probs, labels, classes, per_pair: int = 8) -> dict[tuple[str, str], list[dict]]:
    """The most confident wrong predictions for each (true, predicted) pair, most confident first."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    pred = probs.argmax(axis=1)
    out = {}
    for t in range(len(classes)):
        for q in range(len(classes)):
            idx = np.flatnonzero((labels == t) & (pred == q)) if t != q else []
            if len(idx):
                idx = idx[np.argsort(-probs[idx, q], kind="stable")][:per_pair]
                out[(classes[t], classes[q])] = [{"path": files[i], "probability": float(probs[i, q])} for i in idx]
    return out


def hard_examples(files, probs, labels, classes, low_margin: float = 0.2) -> list[dict]:
    """Every misclassified or low-margin (top-1 minus top-2 probability below `low_margin`) file,
    hardest first: the input for hard-example mining."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    pred, margin = probs.argmax(axis=1), margins(probs)
    rows = []
    for i in np.argsort(probs[np.arange(len(labels)), labels], kind="stable"):
        wrong, low = pred[i] != labels[i], margin[i] < low_margin
        if wrong or low:
            rows.append({"path": files[i], "true": classes[labels[i]], "predicted": classes[pred[i]],
                         "probability": f"{probs[i, pred[i]]:.6f}", "true_probability": f"{probs[i, labels[i]]:.6f}",
                         "margin": f"{margin[i]:.6f}", "reason": "misclassified" if wrong else "low_margin"})
    return rows


def bootstrap_ci(labels, pred, classes, n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals (resampling images) for accuracy, macro-F1 and per-class recall."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    rng = np.random.default_rng(seed)
    draws = {"accuracy": [], "macro_f1": []} | {f"recall_{c}": [] for c in classes}
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        m = classification_metrics(labels[idx], pred[idx], classes)
        draws["accuracy"].append(m["accuracy"])
        draws["macro_f1"].append(m["macro_f1"])
        for c in classes:
            draws[f"recall_{c}"].append(m["per_class"][c]["recall"])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] for k, v in draws.items()}


def per_source(files, labels, pred, sources: dict) -> dict:
    """Accuracy per manifest source (a model that separates sources rather than findings shows it here)."""
    out = {}
    for f, t, p in zip(files, labels, pred):
        s = sources.get(f)
        if s is not None:
            row = out.setdefault(s, {"images": 0, "correct": 0})
            row["images"] += 1
            row["correct"] += int(t == p)
    return {s: {**v, "accuracy": v["correct"] / v["images"]} for s, v in sorted(out.items())}
