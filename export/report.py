"""export_report.json for machines and export_report.md for people, from the same dict."""
from __future__ import annotations

from pathlib import Path

from xray.common.artifacts import write_json_atomic, write_text_atomic


def markdown(r: dict) -> str:
    classes = r["classes"]
    lines = [f"# Export report — {r['model_name']}", "",
             f"Checkpoint `{r['checkpoint']}` (sha256 `{r['checkpoint_sha256'][:16]}…`), exported {r['export_date']}.",
             f"Evaluated on {r['eval']['images']} images of `{r['eval']['split']}` (paths are relative to this report)."
             + (f" Temperature scaling T = {r['temperature']:.4f} ({r['calibration']['source']}) is part of both graphs."
                if r.get("calibration") else ""), "",
             "## Verification", "",
             "| backend | accuracy | macro-F1 | " + " | ".join(f"recall {c}" for c in classes)
             + " | agreement with PyTorch | max abs logit diff |",
             "|---" * (5 + len(classes)) + "|"]
    for name, m in r["metrics"].items():
        lines.append(f"| {name} | {m['accuracy'] * 100:.2f}% | {m['macro_f1']:.4f} | "
                     + " | ".join(f"{m['recall'][c]:.4f}" for c in classes)
                     + f" | {m['agreement'] * 100:.2f}% | {m['max_abs_logit_diff']:.2e} |")
    g = r["gate"]
    lines += ["", f"- fp32 parity: max |Δlogit| {r['metrics']['onnx_fp32']['max_abs_logit_diff']:.2e} "
                  f"(limit {g['parity_tolerance']:g}): {'pass' if g['parity_ok'] else 'FAIL'}"]
    if "onnx_int8" in r["metrics"]:
        lines.append(f"- int8 gate: accuracy drop {g['accuracy_drop_points']:.2f} points (limit {g['max_accuracy_drop']:g}), "
                     f"agreement {g['agreement'] * 100:.2f}% (minimum {g['min_agreement'] * 100:g}%): "
                     f"**{g['int8_status']}**")
    if g.get("warning"):
        lines.append(f"- **WARNING: {g['warning']}**")
    flips = r.get("int8_flips")
    if flips is not None:
        m = r["metrics"]["onnx_int8"]
        lines += [f"- int8 changes the class of {m['flips']} of {r['eval']['images']} images; {m['flips_near_tie']} of them "
                  f"are near-ties for PyTorch itself (top-2 probabilities within {r['near_tie']:g}). "
                  f"Mean |Δlogit| int8 vs PyTorch: {m['mean_abs_logit_diff']:.3f}."]
        if flips:
            lines += ["", "### Images int8 classifies differently (widest PyTorch margin first)", "",
                      "| image | label | PyTorch | p | top-2 gap | int8 | p |", "|---|---|---|---|---|---|---|"]
            lines += [f"| `{f['path']}` | {f['label']} | {f['pytorch']} | {f['pytorch_probability']:.3f} | "
                      f"{f['pytorch_top2_gap']:.3f} | {f['int8']} | {f['int8_probability']:.3f} |" for f in flips[:20]]
            if len(flips) > 20:
                lines.append(f"\n({len(flips) - 20} more in export_report.json)")
    if r.get("calibration"):
        lines += calibration_section(r["calibration"], r["eval"])
    if r.get("int8_cpu_classes"):
        lines += cpu_classes_section(r["int8_cpu_classes"])
    if r.get("trust"):
        lines += trust_section(r["trust"], r["eval"])
    lines += ["", "## Size and latency", "",
              f"Median of {r['latency']['runs']} runs, {r['latency']['threads']} threads, onnxruntime {r['onnxruntime']}.", "",
              "| model | file | size MB | batch 1 ms | batch 16 ms |", "|---|---|---|---|---|"]
    for name, f in r["files"].items():
        lat = r["latency"].get(name, {})
        lines.append(f"| {name} | `{f['path']}` | {f['mb']:.2f} | {lat.get('batch_1', float('nan')):.2f} | "
                     f"{lat.get('batch_16', float('nan')):.2f} |")
    if "speedup_batch_1" in r["latency"]:
        lines.append(f"\nint8 vs fp32: {r['latency']['speedup_batch_1']:.2f}x faster at batch 1, "
                     f"{r['latency']['speedup_batch_16']:.2f}x at batch 16; int8 file is "
                     f"{r['size_ratio'] * 100:.0f}% of fp32.")
    q = r.get("quantization")
    if q:
        lines += ["", "## Quantization settings", ""] + [f"- {k}: `{v}`" for k, v in q.items()]
    return "\n".join(lines) + "\n"


def calibration_section(c: dict, ev: dict) -> list[str]:
    """NLL and ECE before (T = 1) and after temperature scaling, on val and on the eval split, PyTorch and int8."""
    lines = ["", "## Calibration", "",
             f"Softmax temperature T = {c['temperature']:.4f}: {c['source']}. Expected calibration error over "
             f"{c['ece_bins']} equal-width confidence bins; the out-of-distribution score does not use T.", "",
             "| split | model | images | NLL before | NLL after | ECE before | ECE after |", "|---|---|---|---|---|---|---|"]
    rows = [("val", "PyTorch", c["val_images"], c["val"])]
    rows += [(f"`{ev['split']}`", {"pytorch": "PyTorch", "onnx_int8": "ONNX int8"}[k], ev["images"], v)
             for k, v in c.get("eval", {}).items()]
    for split, model, n, q in rows:
        lines.append(f"| {split} | {model} | {n} | {q['before']['nll']:.4f} | {q['after']['nll']:.4f} | "
                     f"{q['before']['ece']:.4f} | {q['after']['ece']:.4f} |")
    return lines


def cpu_classes_section(p: dict) -> list[str]:
    """Where the int8 model is right: covered by its weights, verified by running it (natively, under qemu)."""
    st = p["static"]
    lines = ["", "## int8 on other CPUs", "",
             f"- **covered** (right by construction): {', '.join(p['covered'])}.",
             f"- **verified** (run and compared with onnxruntime's unfused reference of the same graph): "
             f"{', '.join(p['verified']) or 'none'}.",
             f"- Weights: {st['u8s8_matrix_layers']} u8s8 matrix layers, largest |weight| "
             f"{st['u8s8_matrix_max_abs_weight']} (at most {st['pair_safe_max_abs_weight']} cannot saturate the "
             f"non-VNNI kernels of avx2 / avx512; {st['layers_over_pair_safe']} layers over it); "
             f"{st['depthwise_layers']} depthwise layers keep 8 bits (their kernels never saturate); "
             f"{st['layers_with_minus_128']} layers hold -128 (Arm's int16 pair sums).", "",
             "Kernel error ratio: mean |fused int8 - unfused reference| / mean |unfused reference - fp32| "
             "(logits and OOD score, the worse of the two); exact kernels stay well below 1. Under emulation, "
             "once this CPU's kernels are verified, the same measure against this CPU's fused outputs also counts "
             "(a few images make the first one noisy).", "",
             "| where | CPU class | images | classes = reference | OOD decisions = reference | kernel error ratio "
             "| vs this CPU | |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("this CPU", p["host"] or "unclassified", p["native"])]
    rows += [(e["qemu"], e["cpu_class_seen"], e) for e in p["emulated"].values() if e["run"]]
    for where, cls, a in rows:
        ood, vs_here = a.get("ood_decision_agreement"), a.get("ratio_to_this_cpu")
        lines.append(f"| {where} | {cls} | {a['images']} | {a['class_agreement'] * 100:.1f}% | "
                     f"{'–' if ood is None else f'{ood * 100:.1f}%'} | {a['kernel_error_ratio']:.2f} | "
                     f"{'–' if vs_here is None else f'{vs_here:.2f}'} | "
                     f"{'agrees' if a['agrees'] else '**differs**'} |")
    lines += [f"- {cls}: not run under emulation ({e['why']})." for cls, e in p["emulated"].items() if not e["run"]]
    lines += [f"- **{problem}**" for problem in p["problems"]]
    return lines


def trust_section(t: dict, ev: dict) -> list[str]:
    """The out-of-distribution guard and the heatmaps: what was chosen, how well it separates, int8 vs PyTorch."""
    g, b = t["guard"], t["backends"]
    lines = ["", "## Out-of-distribution guard and heatmaps", "",
             f"Score `{g['score']}` (chosen by {t['chosen_by']}), fitted on {g['fit_images']} training images; "
             f"threshold {g['threshold']:.4g} accepts {g['val_acceptance'] * 100:.1f}% of {g['val_images']} val images "
             f"(target {g['accept'] * 100:g}%); the int8 model's own threshold, from its own val scores: "
             f"{t['int8_guard']['threshold']:.4g} ({t['int8_guard']['val_acceptance'] * 100:.1f}%). "
             f"In-distribution acceptance on the {ev['images']} eval images: "
             + ", ".join(f"{k} {v['in_distribution_acceptance'] * 100:.1f}%" for k, v in b.items()) + ".", "",
             "| probe family | group | images | AUROC | FPR@95 | flagged PyTorch | flagged fp32 | flagged int8 |",
             "|---|---|---|---|---|---|---|---|"]
    for f, m in t["families"].items():
        lines.append(f"| {f} | {m['group']} | {m['images']} | {m['auroc']:.3f} | {m['fpr_at_95']:.3f} | "
                     f"{m['flagged_pytorch'] * 100:.0f}% | {m['flagged_onnx_fp32'] * 100:.0f}% | "
                     f"{m['flagged_onnx_int8'] * 100:.0f}% |")
    lines += ["", "Candidate scores (val split vs every probe family; mean over families):", "",
              "| score | mean AUROC | mean FPR@95 | worst family AUROC |", "|---|---|---|---|"]
    for name, m in t["methods"].items():
        worst = min(m["families"].items(), key=lambda kv: kv[1]["auroc"])
        lines.append(f"| {name}{' (shipped)' if name == g['score'] else ''} | {m['mean_auroc']:.3f} | "
                     f"{m['mean_fpr_at_95']:.3f} | {worst[1]['auroc']:.3f} ({worst[0]}) |")
    lines += ["", "| backend | OOD decisions = PyTorch | OOD score max rel. diff | mean rel. drift | "
                  "heatmap correlation mean / min (eval images) | heatmap max rel. diff |", "|---|---|---|---|---|---|"]
    for k, v in b.items():
        if k != "pytorch":
            lines.append(f"| {k} | {v['ood_decision_agreement'] * 100:.2f}% | {v['ood_score_max_rel_diff']:.2e} | "
                         f"{v['ood_score_mean_rel_drift']:.2e} | {v['cam_correlation_mean']:.4f} / "
                         f"{v['cam_correlation_min']:.4f} | {v['cam_max_rel_diff']:.2e} |")
    return lines


def write_report(out_dir: Path, report: dict) -> str:
    text = markdown(report)
    write_json_atomic(out_dir / "export_report.json", report)
    write_text_atomic(out_dir / "export_report.md", text)
    return text
