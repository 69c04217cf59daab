"""The evaluation's PNGs: confusion matrices, ROC and precision-recall curves, reliability diagram,
per-class probability histograms, and a contact sheet of the most confident failures."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xray.common.artifacts import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path):
    plt = _plt()
    if fig.get_layout_engine() is None:  # contact sheets bring their own (constrained) layout
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def confusion_matrices(cm, classes, path: Path):
    """Counts and row-normalised (recall per true class) side by side; rows true, columns predicted."""
    plt = _plt()
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    k = len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(3.2 * k + 3, 1.4 * k + 2))
    for ax, data, title, fmt in ((axes[0], cm, "counts", "{:d}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        ax.imshow(data, cmap="Blues", vmin=0)
        ax.set_xticks(range(k), classes, rotation=30, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        top = data.max() if data.size else 0
        for i in range(k):
            for j in range(k):
                v = int(data[i, j]) if fmt == "{:d}" else float(data[i, j])
                ax.text(j, i, fmt.format(v), ha="center", va="center", color="white" if data[i, j] > top / 2 else "black")
    _save(fig, path)


def roc_pr_curves(probs, labels, classes, average_precision: dict, path: Path):
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    plt = _plt()
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, c in enumerate(classes):
        positive = np.asarray(labels) == i
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, i])
        roc_ax.plot(fpr, tpr, label=f"{c} (AUC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(positive, probs[:, i])
        pr_ax.plot(recall, precision, label=f"{c} (AP {average_precision[c]:.3f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one vs rest")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall, one vs rest", ylim=(0, 1.02))
    roc_ax.legend(loc="lower right")
    pr_ax.legend(loc="lower left")
    _save(fig, path)


def reliability_diagram(bins, ece: float, path: Path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    width = bins[0]["high"] - bins[0]["low"]
    used = [b for b in bins if b["count"]]
    x = [(b["low"] + b["high"]) / 2 for b in used]
    acc, conf = [b["accuracy"] for b in used], [b["confidence"] for b in used]
    ax.bar(x, acc, width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
    ax.bar(x, [abs(c - a) for a, c in zip(acc, conf)], bottom=[min(a, c) for a, c in zip(acc, conf)],
           width=width * 0.95, fill=False, edgecolor="tab:red", hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    _save(fig, path)


def probability_histograms(probs, labels, classes, path: Path):
    """For each class: its predicted probability on images of that class vs on the others."""
    plt = _plt()
    k = len(classes)
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.2), squeeze=False)
    edges = np.linspace(0, 1, 21)
    for i, (ax, c) in enumerate(zip(axes[0], classes)):
        positive = np.asarray(labels) == i
        ax.hist(probs[positive, i], bins=edges, alpha=0.7, label=f"true {c}")
        ax.hist(probs[~positive, i], bins=edges, alpha=0.7, label="other classes")
        ax.set(title=f"P({c})", xlabel="probability", ylabel="images")
        ax.legend(fontsize=8)
    _save(fig, path)


def _sheet(n: int, per_row: int, cell: float, caption_lines: int, fontsize: float = 7):
    """A grid of square image cells, each with room for its caption above it. The constrained layout
    places every caption between its image and the row above; tight_layout let a second row's
    captions run into the first row's images (the aspect-locked images fill the cell)."""
    plt = _plt()
    rows, cols = -(-n // per_row), min(per_row, n)
    caption_in = caption_lines * fontsize * 1.3 / 72 + 0.1
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, (cell + caption_in) * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def failure_sheet(failures: dict, path: Path, thumb: int = 160, per_row: int = 6):
    """Thumbnails of the most confident wrong predictions, captioned true -> predicted (probability)."""
    from xray.common.imageio import load_image

    plt = _plt()
    items = [(t, q, f) for (t, q), fs in failures.items() for f in fs]
    if not items:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        _save(fig, path)
        return
    fig, axes = _sheet(len(items), per_row, cell=2.1, caption_lines=2)
    for ax, (t, q, f) in zip(axes.flat, items):
        img = load_image(f["path"], draft_size=thumb)
        img.thumbnail((thumb, thumb))
        ax.imshow(np.asarray(img), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{t} → {q}\np={f['probability']:.2f}  {Path(f['path']).name[:18]}", fontsize=7)
    _save(fig, path)


def gradcam_sheet(entries, path: Path, per_row: int = 6):
    """entries: [(model-view gray image HxW uint8, cam HxW in [0, 1], caption)] -> heatmaps over the images."""
    lines = max((caption.count("\n") + 1 for _, _, caption in entries), default=1)
    fig, axes = _sheet(len(entries), per_row, cell=2.3, caption_lines=lines)
    for ax, (img, cam, caption) in zip(axes.flat, entries):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=7)
    _save(fig, path)


def embedding_projection(points, labels, wrong, classes, path: Path, method: str):
    """2-D projection of penultimate features, coloured by true class, misclassified images ringed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for i, c in enumerate(classes):
        sel = np.asarray(labels) == i
        ax.scatter(points[sel, 0], points[sel, 1], s=14, alpha=0.8, label=c)
    wrong = np.asarray(wrong, dtype=bool)
    if wrong.any():
        ax.scatter(points[wrong, 0], points[wrong, 1], s=60, facecolors="none", edgecolors="black",
                   linewidths=1.2, label="misclassified")
    ax.set(title=f"penultimate features ({method})", xticks=[], yticks=[])
    ax.legend(fontsize=8)
    _save(fig, path)


def ood_histograms(scores: dict, threshold: float, path: Path, per_row: int = 4):
    """One panel per probe family: its out-of-distribution scores against the evaluated split's, with the
    guard's threshold; log scale, as strange inputs score orders of magnitude above chest films."""
    plt = _plt()
    families = [f for f in scores if f != "eval"]
    rows = -(-len(families) // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(3.3 * per_row, 2.6 * rows), squeeze=False)
    every = np.concatenate(list(scores.values()))
    lo, hi = max(float(every[every > 0].min()) if (every > 0).any() else 1e-3, 1e-3), max(float(every.max()), threshold) * 1.5
    edges = np.geomspace(lo, hi, 40)
    for ax, family in zip(axes.ravel(), families):
        ax.hist(np.clip(scores["eval"], lo, hi), bins=edges, alpha=0.7, label="eval split")
        ax.hist(np.clip(scores[family], lo, hi), bins=edges, alpha=0.7, label=family, color="tab:red")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
        ax.set_xscale("log")
        ax.set(title=family, xlabel="ood_score", ylabel="images")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(families):]:
        ax.axis("off")
    _save(fig, path)
