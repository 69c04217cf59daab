"""The edge's trust outputs at export: fit the out-of-distribution guard, then check what ONNX makes of it.

Fit: pooled features of the training split (PyTorch) -> every candidate score (export/ood.py) -> the one
that best separates the val split from the probe sets -> its threshold from the val split, so that
`accept` (default 95 %) of in-distribution images pass. Temperature scaling does not touch it: the scores
use the features or the un-tempered logits.

Check: ood_score and cam of fp32 ONNX against PyTorch (numbers), of int8 against PyTorch (decisions,
score drift, heatmap correlation), and each probe family's flagged share.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from xray.common.image_spec import ImageSpec
from xray.common.metrics import ood_separation
from xray.common.probes import GROUP

from .edge_graph import pooled_and_logits
from .verify import file_batches, image_batches, run_backends
from .ood import OodScorer, best_method, compare_methods, fit_threshold


def torch_features(model, batches) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, un-tempered logits) over batches, from the PyTorch model."""
    feats, logits = [], []
    model.eval()
    with torch.no_grad():
        for x in batches:
            f, z = pooled_and_logits(model, torch.from_numpy(x))
            feats.append(f.numpy())
            logits.append(z.numpy())
    return np.concatenate(feats).astype(np.float64), np.concatenate(logits).astype(np.float64)


@dataclass
class Guard:
    scorer: OodScorer
    threshold: float
    accept: float
    val_acceptance: float
    fit_images: int
    val_images: int
    comparison: dict  # method -> {mean_auroc, mean_fpr_at_95, families: {family: {auroc, fpr_at_95}}}
    chosen_by: str

    def metadata(self, own_val_scores: np.ndarray | None = None) -> dict:
        """What goes into the model's metadata (xray.ood). own_val_scores: a model's own scores of the val split
        (the int8 model's drift by a few per cent), from which its own threshold is fitted."""
        threshold, acceptance = self.threshold, self.val_acceptance
        if own_val_scores is not None:
            threshold = fit_threshold(own_val_scores, self.accept)
            acceptance = float((own_val_scores <= threshold).mean())
        return {"score": self.scorer.method, "output": "ood_score", "higher_is_ood": True, "threshold": threshold,
                "accept": self.accept, "val_acceptance": acceptance, "val_images": self.val_images,
                "fit_images": self.fit_images, "fit_split": "train", "threshold_split": "val",
                "statistics_sha256": self.scorer.sha256()}


def fit_guard(model, spec: ImageSpec, train_paths, val_paths, probes: dict, method: str, accept: float) -> Guard:
    """probes: family -> PIL images. method: one of METHODS, or "auto" (best mean AUROC over families)."""
    train = torch_features(model, file_batches(train_paths, spec))
    val = torch_features(model, file_batches(val_paths, spec))
    probe_feats = {f: torch_features(model, image_batches(ims, spec)) for f, ims in probes.items()}
    comparison = compare_methods(train, val, probe_feats)
    chosen = best_method(comparison) if method == "auto" else method
    scorer = comparison[chosen]["scorer"]
    val_scores = scorer.score(*val)
    threshold = fit_threshold(val_scores, accept)
    table = {m: {k: v for k, v in r.items() if k != "scorer"} for m, r in comparison.items()}
    return Guard(scorer, threshold, accept, float((val_scores <= threshold).mean()), len(train_paths),
                 len(val_paths), table, "the best mean AUROC over probe families, val split vs probes" if method == "auto"
                 else "--ood-score")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float(np.allclose(a, b))


def cam_correlations(ref_cam: np.ndarray, cam: np.ndarray, classes_idx: np.ndarray) -> np.ndarray:
    """Pearson correlation, per image, of the two backends' maps of the reference's predicted class."""
    rows = np.arange(len(classes_idx))
    return np.array([correlation(ref_cam[i, c], cam[i, c]) for i, c in zip(rows, classes_idx)])


def relative_error(ref: np.ndarray, x: np.ndarray) -> float:
    """max |x - ref| relative to the reference's own scale (at least 1)."""
    return float(np.abs(x - ref).max() / max(1.0, float(np.abs(ref).max()))) if ref.size else 0.0


def verify_trust(guard: Guard, outputs: dict, in_dist: slice, families: dict[str, slice],
                 int8_threshold: float) -> dict:
    """outputs: backend -> (logits, ood_score, cam) over the eval images followed by every probe family;
    in_dist / families: their rows. Decisions use each model's own threshold (PyTorch and fp32: the
    guard's; the int8 model and its unfused reference: `int8_threshold`)."""
    ref_logits, ref_ood, ref_cam = outputs["pytorch"]
    flagged = {k: v[1] > (int8_threshold if k.startswith("onnx_int8") else guard.threshold) for k, v in outputs.items()}
    result = {"backends": {}, "families": {}}
    for name, (logits, ood, cam) in outputs.items():
        corr = cam_correlations(ref_cam[in_dist], cam[in_dist], ref_logits[in_dist].argmax(1))  # chest images
        result["backends"][name] = {
            "ood_score_max_rel_diff": relative_error(ref_ood, ood),
            "cam_max_rel_diff": relative_error(ref_cam, cam),
            "ood_score_mean_rel_drift": float(np.mean(np.abs(ood - ref_ood) / np.maximum(1.0, np.abs(ref_ood)))),
            "ood_decision_agreement": float((flagged[name] == flagged["pytorch"]).mean()),
            "cam_correlation_mean": float(corr.mean()), "cam_correlation_min": float(corr.min()),
            "in_distribution_acceptance": float(1 - flagged[name][in_dist].mean()),
        }
    for family, rows in families.items():
        result["families"][family] = {
            "group": GROUP.get(family, "probe"), "images": rows.stop - rows.start,
            **ood_separation(ref_ood[in_dist], ref_ood[rows]),
            **{f"flagged_{k}": float(v[rows].mean()) for k, v in flagged.items()}}
    return result


def check_backends(guard: Guard, graph, sessions: dict, spec: ImageSpec, eval_paths, val_paths, probes: dict):
    """PyTorch (the EdgeGraph) and every ONNX session over the eval images, then every probe family.
    Returns (each backend's logits of the eval images, the trust verification, the int8 model's own guard
    metadata: its threshold fitted on its own val scores, as int8 features drift by a few per cent, and
    every backend's outputs over the eval images followed by the probes)."""
    batches = chain(file_batches(eval_paths, spec), *(image_batches(v, spec) for v in probes.values()))
    outputs = run_backends(batches, graph, sessions)
    n = len(eval_paths)
    rows, start = {}, n
    for family, images in probes.items():
        rows[family], start = slice(start, start + len(images)), start + len(images)
    int8 = sessions["onnx_int8"]
    int8_val = np.concatenate([int8.run(["ood_score"], {int8.get_inputs()[0].name: x})[0]
                               for x in file_batches(val_paths, spec)])
    int8_guard = guard.metadata(own_val_scores=int8_val)
    trust = verify_trust(guard, outputs, slice(0, n), rows, int8_guard["threshold"])
    return {k: v[0][:n] for k, v in outputs.items()}, trust, int8_guard, outputs
