"""xray-eval's view of the out-of-distribution guard: how the evaluated split and each probe family
score against the model's own threshold.

The guard lives in the exported ONNX model (its statistics and threshold are fitted by xray-export),
so an ONNX model is measured directly and a checkpoint through its run's export/model.onnx, if any.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xray.common.imageio import load_image
from xray.common.metrics import ood_separation
from xray.common.preprocess import preprocess
from xray.common.probes import GROUP, probe_sets
from xray.infer.predict import prepare


def guard_model(loaded) -> Path | None:
    path = loaded.path if loaded.kind == "onnx" else loaded.path.parent / "export" / "model.onnx"
    return path if path.is_file() else None


def _scores(edge, arrays, batch_size: int) -> np.ndarray:
    return np.concatenate([edge.predict(np.stack(arrays[i:i + batch_size])).ood_score
                           for i in range(0, len(arrays), batch_size)]) if arrays else np.zeros(0)


def evaluate_guard(loaded, files: list[str], batch_size: int = 32, per_family: int = 12) -> dict | None:
    """None when there is no guard to measure; else its threshold, the split's acceptance, per probe family
    AUROC / FPR@95 / flagged share, and the raw scores (for the histograms)."""
    from xray.infer.model import EdgeModel

    path = guard_model(loaded)
    if path is None:
        return None
    edge = EdgeModel(path)
    if not edge.has_guard:
        return None
    spec, threshold = edge.info.spec, float(edge.info.ood["threshold"])
    s_in = _scores(edge, [prepare(f, spec) for f in files], batch_size)
    chest = [load_image(f, draft_size=spec.resize_size) for f in files[::max(1, len(files) // per_family)][:per_family]]
    scores = {"eval": s_in}
    families = {}
    for family, images in probe_sets(chest, per_family).items():
        s = scores[family] = _scores(edge, [preprocess(im, spec) for im in images], batch_size)
        families[family] = {"group": GROUP[family], "images": len(s), **ood_separation(s_in, s),
                            "flagged": float((s > threshold).mean())}
    return {"model": str(path), "score": edge.info.ood["score"], "threshold": threshold,
            "accept": edge.info.ood.get("accept"), "images": len(s_in),
            "in_distribution_acceptance": float((s_in <= threshold).mean()), "families": families, "scores": scores}
