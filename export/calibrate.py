"""Calibrated by default: the softmax temperature baked into both ONNX graphs.

A checkpoint without a temperature gets one fitted on the val split, as `xray-eval --calibrate` fits it
(NLL, one scalar); a checkpoint calibrated by xray-eval keeps its own; `--no-calibrate` exports T = 1. The
out-of-distribution score uses the features and the un-tempered logits, so T never moves the guard.
"""
from __future__ import annotations

import numpy as np

from xray.common.metrics import ECE_BINS
from xray.train.calibration import before_after, fit_temperature

from .trust import torch_features
from .verify import file_batches


def choose_temperature(model, meta: dict, spec, val_samples, calibrate: bool) -> tuple[float | None, dict]:
    """(T for the graph, None for 1; what the report says: where T came from, NLL / ECE on val before and after)."""
    raw = torch_features(model, file_batches([p for p, _ in val_samples], spec))[1]
    labels = np.array([label for _, label in val_samples])
    if not calibrate:
        t, source = None, "not calibrated (--no-calibrate)"
    elif meta.get("temperature"):
        t, source = float(meta["temperature"]), "the checkpoint's (xray-eval --calibrate)"
    else:
        t, source = fit_temperature(raw, labels), "fitted by xray-export on the val split (minimum NLL)"
    return t, {"temperature": t or 1.0, "source": source, "ece_bins": ECE_BINS, "val_images": len(labels),
               "val": before_after(raw, labels, t or 1.0)}

