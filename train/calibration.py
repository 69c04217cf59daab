"""Temperature scaling (Guo et al. 2017): one scalar T fitted on the val split by minimising NLL.

It changes confidence, never the ranking, so accuracy and the confusion matrix are unchanged. Used by
xray-export (calibrated by default) and xray-eval --calibrate."""
from __future__ import annotations

import math

from xray.common.metrics import ECE_BINS, expected_calibration_error, log_loss, softmax


def fit_temperature(logits, labels, low: float = 0.05, high: float = 20.0) -> float:
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda log_t: log_loss(labels, softmax(logits, math.exp(log_t))),
                          bounds=(math.log(low), math.log(high)), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(res.x))


def calibration_quality(logits, labels, temperature: float) -> dict:
    """NLL and ECE (ECE_BINS equal-width bins) of softmax(logits / temperature)."""
    p = softmax(logits, temperature)
    return {"nll": log_loss(labels, p), "ece": expected_calibration_error(p, labels, ECE_BINS)[0]}


def before_after(raw_logits, labels, temperature: float) -> dict:
    """NLL and ECE of un-tempered logits, before (T = 1) and after temperature scaling."""
    return {"before": calibration_quality(raw_logits, labels, 1.0),
            "after": calibration_quality(raw_logits, labels, temperature)}
