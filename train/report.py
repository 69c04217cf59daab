"""Run outputs for people and machines, from the same numbers: history.csv, metrics.json, plots, summary."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xray.common.artifacts import atomic_path, write_csv_atomic, write_json_atomic
from xray.common.metrics import metrics_markdown, roc_auc_ovr

HISTORY_COLUMNS = ("phase", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1",
                   "lr_head", "lr_backbone", "seconds", "images_per_s")


def write_history(run_dir: Path, rows: list[dict]) -> None:
    write_csv_atomic(run_dir / "history.csv", HISTORY_COLUMNS, rows)


def test_metrics(metrics: dict, probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    return {**metrics, "roc_auc_ovr": roc_auc_ovr(labels, probs, classes)}


def write_metrics(run_dir: Path, metrics: dict, checkpoint_meta: dict) -> str:
    write_json_atomic(run_dir / "metrics.json", {**metrics, "checkpoint": checkpoint_meta})
    auc = metrics["roc_auc_ovr"]
    text = metrics_markdown(metrics, title=f"Test split — {checkpoint_meta['model_name']} "
                                          f"(phase {checkpoint_meta['phase']}, epoch {checkpoint_meta['epoch']})")
    if auc["macro"] is not None:
        text += "\nOne-vs-rest ROC-AUC: " + ", ".join(
            f"{c} {v:.4f}" for c, v in auc["per_class"].items() if v is not None) + f" (macro {auc['macro']:.4f})\n"
    with atomic_path(run_dir / "summary.md") as tmp:
        tmp.write_text(text)
    return text


def save_plots(run_dir: Path, history: list[dict], metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    if history:
        x = np.arange(1, len(history) + 1)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for key, ax, title in (("loss", axes[0], "loss"), ("f1", axes[1], "val macro-F1 / accuracy")):
            if key == "loss":
                ax.plot(x, [float(r["train_loss"]) for r in history], marker="o", label="train")
                ax.plot(x, [float(r["val_loss"]) for r in history], marker="o", label="val")
            else:
                ax.plot(x, [float(r["val_macro_f1"]) for r in history], marker="o", label="val macro-F1")
                ax.plot(x, [float(r["val_accuracy"]) for r in history], marker="o", label="val accuracy")
            for i in range(1, len(history)):
                if history[i]["phase"] != history[i - 1]["phase"]:
                    ax.axvline(i + 0.5, color="grey", linestyle="--", linewidth=1)
            ax.set_title(title)
            ax.set_xlabel("epoch (phases in order)")
            ax.legend()
        fig.tight_layout()
        with atomic_path(plots / "curves.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)

    cm = np.array(metrics["confusion_matrix"])
    names = metrics["classes"]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 1.4 * len(names) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    with atomic_path(plots / "confusion_matrix.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
