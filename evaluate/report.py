"""report.md and metrics.json of an evaluation, from the same numbers."""
from __future__ import annotations

import os
from pathlib import Path

from xray.common.artifacts import write_csv_atomic, write_json_atomic, write_text_atomic
from xray.common.metrics import metrics_markdown

from .analysis import HARD_COLUMNS


def write_report(out: Path, m: dict, model, data_dir: Path, failures: dict, hard: list[dict], plots: list[str]) -> str:
    """Every path in what is written here is relative to `out`: the report travels and still resolves."""
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    if m.get("calibration"):
        m = {**m, "calibration": {**m["calibration"], "val_split": rel(m["calibration"]["val_split"])}}
    if m.get("ood_guard"):
        m = {**m, "ood_guard": {**m["ood_guard"], "model": rel(m["ood_guard"]["model"])}}
    failures = {pair: [f | {"path": rel(f["path"])} for f in fs] for pair, fs in failures.items()}
    write_json_atomic(out / "metrics.json", {**m, "model": {"kind": model.kind, "path": rel(model.path),
                                                           "model_name": model.name}, "data": rel(data_dir),
                                             "failures": {f"{t}->{q}": v for (t, q), v in failures.items()}})
    write_csv_atomic(out / "hard_examples.csv", HARD_COLUMNS, [r | {"path": rel(r["path"])} for r in hard])
    auc, ap = m["roc_auc_ovr"], m["average_precision"]
    lines = [f"# Evaluation — {model.name} ({model.kind}: `{rel(model.path)}`) on `{rel(data_dir)}`", "",
             "Paths are relative to this report's folder.", "",
             metrics_markdown(m, title="Metrics").rstrip(), "",
             "| Class | ROC-AUC (one vs rest) | Average precision |", "|---|---|---|"]
    lines += [f"| {c} | {_f(auc['per_class'][c])} | {_f(ap[c])} |" for c in m["classes"]]
    lines += ["", f"Macro ROC-AUC {_f(auc['macro'])}. Expected calibration error (15 bins, top-1 confidence): "
                  f"{m['ece']:.4f}" + (f" (probabilities with temperature T = {m['temperature']:.4f}, "
                                       f"{m.get('temperature_source', '')})" if m.get("temperature", 1.0) != 1.0 else "")
                  + "." + calibration_effect(m.get("calibration_effect"))]
    c = m.get("calibration")
    if c:
        lines += ["", "## Calibration (temperature scaling)", "",
                  f"T = {c['temperature']:.4f}, fitted on `{c['val_split']}` by minimising NLL; stored in the checkpoint "
                  "sidecar, so `xray-export` bakes it into the ONNX graph.", "",
                  "| split | NLL before | NLL after | ECE before | ECE after |", "|---|---|---|---|---|"]
        for name, label in (("val", "val (fit)"), ("eval", "this split")):
            b, a = c[name]["before"], c[name]["after"]
            lines.append(f"| {label} | {b['nll']:.4f} | {a['nll']:.4f} | {b['ece']:.4f} | {a['ece']:.4f} |")
    if len(m.get("per_source", {})) > 1:
        lines += ["", "## Per source (shortcut check)", "", "| source | images | accuracy |", "|---|---|---|"]
        lines += [f"| {s} | {v['images']} | {v['accuracy']:.4f} |" for s, v in m["per_source"].items()]
    if m.get("ood_guard"):
        lines += guard_lines(m["ood_guard"])
    lines += ["", "## Failure modes", ""]
    if failures:
        lines += ["Most confident wrong predictions per confusion pair (`failures.png`):", "",
                  "| true → predicted | images | most confident (p) |", "|---|---|---|"]
        cm, idx = m["confusion_matrix"], {c: i for i, c in enumerate(m["classes"])}
        for (t, q), fs in failures.items():
            lines.append(f"| {t} → {q} | {cm[idx[t]][idx[q]]} | `{Path(fs[0]['path']).name}` ({fs[0]['probability']:.3f}) |")
    else:
        lines.append("No misclassified images.")
    lines += ["", f"`hard_examples.csv`: {len(hard)} misclassified or low-margin images (hard-example mining input).",
              "", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "report.md", text)
    return text


def guard_lines(g: dict) -> list[str]:
    """The out-of-distribution guard's table (also in MODEL_CARD.md)."""
    lines = ["", "## Out-of-distribution guard", "",
             f"Score `{g['score']}` of `{g['model']}`, threshold {g['threshold']:.4g} (fitted by xray-export to accept "
             f"{(g.get('accept') or 0) * 100:g} % of val images): **{g['in_distribution_acceptance'] * 100:.1f} %** of "
             f"these {g['images']} images accepted. Probe families (`ood_histograms.png`):", "",
             "| probe family | group | images | AUROC | FPR@95 | flagged |", "|---|---|---|---|---|---|"]
    lines += [f"| {f} | {v['group']} | {v['images']} | {_f(v['auroc'])} | {_f(v['fpr_at_95'])} | "
              f"{v['flagged'] * 100:.0f} % |" for f, v in g["families"].items()]
    return lines


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def calibration_effect(c: dict | None) -> str:
    """What the temperature does to this split's probabilities (NLL / ECE before and after)."""
    if not c:
        return ""
    b, a = c["before"], c["after"]
    return (f" On the evaluated split: NLL {b['nll']:.4f} -> {a['nll']:.4f}, expected calibration error "
            f"{b['ece']:.4f} -> {a['ece']:.4f} ({c['ece_bins']} equal-width bins).")
