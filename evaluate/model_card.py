"""MODEL_CARD.md next to the evaluated model: what it is for, what it was trained on, how well it does
(with bootstrap intervals), how it fails, how calibrated and how quantized it is."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from xray.common.artifacts import read_csv, sha256_file, write_text_atomic

MANIFEST = "manifest.csv"


def read_manifest(data_dir: Path) -> tuple[list[dict], dict[str, str]]:
    """The split's manifest rows (data/manifest.csv beside data/test) and {absolute file: source}."""
    manifest = data_dir.parent / MANIFEST
    if not manifest.is_file():
        return [], {}
    rows = read_csv(manifest)
    sources = {str((data_dir.parent / r["path"]).resolve()): r.get("source") or "unknown" for r in rows}
    return rows, sources


def leakage_check(rows: list[dict]) -> str:
    splits_of = {}
    for r in rows:
        splits_of.setdefault(r["group"], set()).add(r["split"])
    leaked = sum(len(s) > 1 for s in splits_of.values())
    return (f"{len(splits_of)} patient groups; {'no' if not leaked else leaked} group(s) in more than one split"
            " (patient-level split, exact duplicates grouped)")


def write_model_card(path: Path, loaded, data_dir: Path, m: dict, ci: dict, rows: list[dict], source_table: dict,
                     fails: dict) -> str:
    from .report import calibration_effect  # report imports nothing from here at module level

    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731  the card travels: paths from its own folder
    classes = m["classes"]
    lines = [f"# Model card — {loaded.name}", "",
             "## Intended use", "",
             "Research and triage assistance for chest X-ray classification "
             f"({', '.join(classes)}). **Not for diagnosis and not a medical device**: a clinician reads every image.",
             "Outputs are class probabilities; they are only as good as the data the model was trained and "
             "checked on (below).", "",
             "## Model", "",
             f"- Architecture: `{loaded.name}`, input {loaded.spec.input_size} px, {loaded.spec.channels} channel(s), "
             f"resize `{loaded.spec.resize_mode}`/{loaded.spec.interpolation}.",
             f"- Evaluated artifact: `{rel(loaded.path)}` ({loaded.kind}, sha256 `{sha256_file(loaded.path)[:16]}…`).",
             f"- Softmax temperature: {m.get('temperature', 1.0):.4f} ({m.get('temperature_source', 'uncalibrated')})."
             + calibration_effect(m.get("calibration_effect"))]
    lines += ["", "## Training data", ""]
    if rows:
        sources = Counter(r.get("source") or "unknown" for r in rows)
        lines += [f"- Sources: " + ", ".join(f"`{s}` ({n} images)" for s, n in sources.most_common()) + ".",
                  f"- Leakage guard: {leakage_check(rows)}.", "",
                  "| split | " + " | ".join(classes) + " | total |", "|---" * (len(classes) + 2) + "|"]
        for split in ("train", "val", "test"):
            counts = Counter(r["class"] for r in rows if r["split"] == split)
            lines.append(f"| {split} | " + " | ".join(str(counts.get(c, 0)) for c in classes)
                         + f" | {sum(counts.values())} |")
        if set(sources) == {"synthetic"}:
            lines += ["", "**Every image is synthetic** (scripts/make_synthetic.py): these figures describe the "
                          "pipeline on generated data, not performance on radiographs."]
    else:
        lines.append(f"No `{MANIFEST}` beside `{rel(data_dir)}`: provenance unknown.")
    lines += ["", f"## Performance on `{rel(data_dir)}` ({m['num_samples']} images, 95 % bootstrap intervals)", "",
              "| metric | value | 95 % CI |", "|---|---|---|",
              f"| accuracy | {m['accuracy']:.4f} | {ci['accuracy'][0]:.4f}–{ci['accuracy'][1]:.4f} |",
              f"| macro-F1 | {m['macro_f1']:.4f} | {ci['macro_f1'][0]:.4f}–{ci['macro_f1'][1]:.4f} |"]
    for c in classes:
        lo, hi = ci[f"recall_{c}"]
        lines.append(f"| recall {c} | {m['per_class'][c]['recall']:.4f} | {lo:.4f}–{hi:.4f} |")
    lines += ["", f"Expected calibration error: {m['ece']:.4f}."]
    if len(source_table) > 1:
        lines += ["", "Per source (a large gap means the model may separate sources rather than findings):", "",
                  "| source | images | accuracy |", "|---|---|---|"]
        lines += [f"| {s} | {v['images']} | {v['accuracy']:.4f} |" for s, v in source_table.items()]
    lines += ["", "## Known failure modes", ""]
    if fails:
        cm, idx = m["confusion_matrix"], {c: i for i, c in enumerate(classes)}
        pairs = sorted(fails, key=lambda tq: -cm[idx[tq[0]]][idx[tq[1]]])
        lines += [f"- {t} predicted as {q}: {cm[idx[t]][idx[q]]} image(s)" for t, q in pairs]
        maps = ", Grad-CAM maps `report/failures_gradcam.png`" if loaded.kind == "pytorch" else ""
        lines.append(f"- Examples: `report/failures.png`{maps}; every hard case: `report/hard_examples.csv`.")
    else:
        lines.append("No misclassified images in this split (a small split proves little: see the intervals).")
    if m.get("ood_guard"):
        from .report import guard_lines

        guard = guard_lines({**m["ood_guard"], "model": rel(m["ood_guard"]["model"])})
        lines += guard[:3] + [
            "The exported model scores how far every image's features lie from the training images'; "
            "above the threshold it says *not like the training data* (`xray-infer`: `ood=true`; "
            "`--ood-action abstain` withholds the diagnosis).", "",
            "- **It catches** inputs far from the training films: photographs, documents, screenshots, noise, blank "
            "or saturated images, and grossly transformed films (inverted, rotated, cropped, blurred), as the table "
            "shows for this model.",
            "- **It does not catch** a chest film that looks like the training data but is not what the model learned: "
            "another hospital's scanner or protocol, another population, a disease it was not trained on, a lateral "
            "or paediatric view close to the training films. Such an image may pass the guard and still be misread.",
            f"- By design it also flags about {100 - (m['ood_guard'].get('accept') or 0.95) * 100:g} % of genuine "
            "in-distribution images (the threshold's price); a flag means *look at the image*, not *the image is bad*.",
            ""] + guard[3:]
    export_report = _export_report(loaded)
    if export_report:
        g, met = export_report["gate"], export_report["metrics"]
        lines += ["", "## Quantization", "",
                  f"Exported by `xray-export` on {export_report.get('export_date', '?')}: ONNX fp32 accuracy "
                  f"{met['onnx_fp32']['accuracy']:.4f}, int8 accuracy {met['onnx_int8']['accuracy']:.4f}, int8 agrees "
                  f"with PyTorch on {g['agreement'] * 100:.1f} % of {export_report['eval']['images']} images; gate: "
                  f"**{g['int8_status']}**; int8 file {export_report['size_ratio'] * 100:.0f} % of fp32, "
                  f"{export_report['latency'].get('speedup_batch_1', float('nan')):.2f}x faster at batch 1."]
        c, cpus = export_report.get("calibration"), export_report.get("int8_cpu_classes")
        if c:
            q = [("val", "PyTorch", c["val"])] + [(export_report["eval"]["split"], {"pytorch": "PyTorch"}.get(k, "int8"), v)
                                                 for k, v in c.get("eval", {}).items()]
            lines.append(f"- Calibration: T = {c['temperature']:.4f}, {c['source']}; expected calibration error "
                         f"({c['ece_bins']} bins) before -> after: "
                         + "; ".join(f"{split} {who} {v['before']['ece']:.4f} -> {v['after']['ece']:.4f}"
                                     for split, who, v in q) + ".")
        if cpus:
            lines.append(f"- int8 is right by construction on {', '.join(cpus['covered'])}; verified on "
                         f"{', '.join(cpus['verified']) or 'none'} (`xray-infer` and `xray-serve` refuse it elsewhere).")
    text = "\n".join(lines) + "\n"
    write_text_atomic(path, text)
    return text


def _export_report(loaded) -> dict | None:
    folder = loaded.path.parent if loaded.kind == "onnx" else loaded.path.parent / "export"
    path = folder / "export_report.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None

