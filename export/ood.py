"""Out-of-distribution scores: fitted on training-split features, compared on probe sets, one shipped.

Three candidates, each a higher-is-stranger score over the pooled penultimate features (or logits):
  mahalanobis  class-agnostic Mahalanobis distance (Lee et al. 2018) of the L2-normalised features, with a
               Ledoit-Wolf shrunk covariance (D = 1280 features vs a few hundred images: the sample
               covariance is singular), its top 256 directions kept and the rest given their mean variance;
               squared distance per dimension, ~1 in distribution
  energy       -logsumexp(logits) (Liu et al. 2020), on the un-tempered logits
  knn          1 - cosine similarity to the k-th nearest training feature (Sun et al. 2022)
Each has a numpy reference (`score`, float64) and a torch module (`module`) that xray-export puts
into the ONNX graph; a test holds them equal.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from xray.common.metrics import ood_separation

METHODS = ("mahalanobis", "energy", "knn")
KNN_K = 5
# Mahalanobis keeps the covariance's top directions exactly and one shared variance for the rest: exact for
# up to 257 training images (the shrunk covariance is then low-rank + identity), and a D x 256 matrix in the
# graph instead of D x D (1280 x 1280 floats are 6.5 MB, read for every image: +7 % latency at batch 1)
MAHALANOBIS_RANK = 256


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class OodScorer:
    method: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def fit(cls, method: str, features: np.ndarray) -> "OodScorer":
        """features: N x D pooled training-split features."""
        if method == "energy":
            return cls(method)
        z = l2_normalise(features)
        if method == "knn":
            return cls(method, {"bank": z})
        if method != "mahalanobis":
            raise ValueError(f"unknown OOD score {method!r}; choose from {', '.join(METHODS)}")
        from sklearn.covariance import LedoitWolf

        mean = z.mean(axis=0)
        cov = LedoitWolf(assume_centered=True).fit(z - mean).covariance_
        eigval, eigvec = np.linalg.eigh(cov)  # ascending
        k = min(MAHALANOBIS_RANK, len(eigval) - 1)
        top, rest = eigval[-k:], eigval[:-k]
        floor = float(rest.mean())  # one variance for every other direction (probabilistic PCA)
        # score * D = |v|^2 / floor - sum_i (1/floor - 1/top_i) (u_i . v)^2, with v the centred unit feature
        basis = eigvec[:, -k:] * np.sqrt(np.maximum(1.0 / floor - 1.0 / top, 0.0))
        return cls(method, {"mean": mean, "basis": basis, "inv_floor": np.array([1.0 / floor]),
                            "dims": np.array([float(z.shape[1])])})

    def score(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The float64 reference: N scores, higher = less like the training data."""
        if self.method == "energy":
            z = np.asarray(logits, np.float64)
            top = z.max(axis=1)
            return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))
        z = l2_normalise(features)
        if self.method == "knn":
            sim = z @ self.arrays["bank"].T
            return 1.0 - np.sort(sim, axis=1)[:, -min(KNN_K, sim.shape[1])]
        a = self.arrays
        v = z - a["mean"]
        return ((v * v).sum(axis=1) * a["inv_floor"][0] - ((v @ a["basis"]) ** 2).sum(axis=1)) / a["dims"][0]

    def module(self) -> nn.Module:
        return _MODULES[self.method]({k: torch.from_numpy(v.astype(np.float32)) for k, v in self.arrays.items()})

    def sha256(self) -> str:
        h = hashlib.sha256(self.method.encode())
        for k in sorted(self.arrays):
            h.update(k.encode() + np.ascontiguousarray(self.arrays[k], np.float32).tobytes())
        return h.hexdigest()


def _unit(features):
    """L2-normalised rows in three ONNX nodes (F.normalize exports five, with a Shape and an Expand)."""
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


class _Mahalanobis(nn.Module):
    def __init__(self, a):
        super().__init__()
        for name in ("mean", "basis", "inv_floor", "dims"):
            self.register_buffer(name, a[name])

    def forward(self, features, logits):
        v = _unit(features) - self.mean
        d = v @ self.basis
        return ((v * v).sum(dim=1) * self.inv_floor - (d * d).sum(dim=1)) / self.dims


class _Energy(nn.Module):
    def __init__(self, a):
        super().__init__()

    def forward(self, features, logits):
        return -torch.logsumexp(logits, dim=1)


class _Knn(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.register_buffer("bank", a["bank"])
        self.k = min(KNN_K, len(a["bank"]))

    def forward(self, features, logits):
        sim = _unit(features) @ self.bank.T
        return 1.0 - sim.topk(self.k, dim=1).values[:, -1]


_MODULES = {"mahalanobis": _Mahalanobis, "energy": _Energy, "knn": _Knn}


def fit_threshold(val_scores: np.ndarray, accept: float) -> float:
    """A score at which at least `accept` of the in-distribution (val) images are accepted (score <= threshold):
    halfway between the val score at that rank and the next, so float rounding between PyTorch and ONNX
    cannot move an image across it."""
    s = np.sort(np.asarray(val_scores, np.float64))
    k = min(int(np.ceil(accept * len(s))) - 1, len(s) - 1)
    return float(s[k] if k + 1 >= len(s) else (s[k] + s[k + 1]) / 2)


def compare_methods(train, val, probes: dict) -> dict:
    """Fit every method on train, measure val vs each probe family. train/val: (features, logits);
    probes: family -> (features, logits). Returns method -> {scorer, mean_auroc, mean_fpr_at_95, families}."""
    out = {}
    for method in METHODS:
        scorer = OodScorer.fit(method, train[0])
        s_val = scorer.score(*val)
        fam = {f: ood_separation(s_val, scorer.score(*p)) for f, p in probes.items()}
        out[method] = {"scorer": scorer, "families": fam,
                       "mean_auroc": float(np.mean([m["auroc"] for m in fam.values()])),
                       "mean_fpr_at_95": float(np.mean([m["fpr_at_95"] for m in fam.values()]))}
    return out


def best_method(comparison: dict) -> str:
    """Highest mean AUROC over probe families; ties broken by the lower mean FPR@95, then by METHODS order
    (Mahalanobis first: its size does not grow with the training set, kNN's does)."""
    return max(comparison, key=lambda m: (round(comparison[m]["mean_auroc"], 4), -comparison[m]["mean_fpr_at_95"]))
