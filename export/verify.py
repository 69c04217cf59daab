"""The gate's numbers: PyTorch vs ONNX fp32 vs ONNX int8 on the same preprocessed images.

Every backend sees the identical float32 batches built by `common` preprocessing, so a difference
is the model's, not the input pipeline's.
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import torch

from xray.common.image_spec import ImageSpec
from xray.common.imageio import load_image
from xray.common.metrics import classification_metrics, softmax
from xray.common.preprocess import preprocess


def session(path, threads: int, fused: bool = True) -> ort.InferenceSession:
    """fused=False: onnxruntime's unfused reference of a QDQ graph (DequantizeLinear + float ops, no int8 kernel)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def file_batches(paths, spec: ImageSpec, size: int = 32):
    """float32 N x C x H x W batches of image files, in order."""
    for i in range(0, len(paths), size):
        yield np.stack([preprocess(load_image(p, draft_size=spec.resize_size), spec) for p in paths[i:i + size]])


def image_batches(images, spec: ImageSpec, size: int = 32):
    """float32 N x C x H x W batches of grayscale PIL images (the probe sets)."""
    for i in range(0, len(images), size):
        yield np.stack([preprocess(im, spec) for im in images[i:i + size]])


def batches(samples, spec: ImageSpec, size: int = 32):
    """(float32 N x C x H x W, labels) over (path, label) samples, in order."""
    for i, x in zip(range(0, len(samples), size), file_batches([p for p, _ in samples], spec, size)):
        yield x, np.array([label for _, label in samples[i:i + size]])


def stratified(samples, n: int, seed: int = 0):
    """Up to n samples, classes interleaved so every class is represented (seeded)."""
    rng = np.random.default_rng(seed)
    by_class = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    pools = [list(rng.permutation(len(v))) for v in by_class.values()]
    lists = list(by_class.values())
    out = []
    while len(out) < n and any(pools):
        for pool, items in zip(pools, lists):
            if pool and len(out) < n:
                out.append(items[pool.pop()])
    return out


def run_backends(xs, torch_model, sessions: dict) -> dict:
    """Every output of every backend ('pytorch' + each ONNX session) over the input batches:
    backend -> [output 0 (the logits), output 1, ...], each concatenated over the batches."""
    runs = {"pytorch": []} | {k: [] for k in sessions}
    torch_model.eval()
    for x in xs:
        with torch.no_grad():
            out = torch_model(torch.from_numpy(x))
        runs["pytorch"].append([t.numpy() for t in (out if isinstance(out, tuple) else (out,))])
        for name, sess in sessions.items():
            runs[name].append(sess.run(None, {sess.get_inputs()[0].name: x}))
    return {k: [np.concatenate(parts) for parts in zip(*v)] for k, v in runs.items()}


NEAR_TIE = 0.05  # PyTorch's top-2 probabilities closer than this: a flip there is a coin toss, not a lost finding


def top2_gap(logits: np.ndarray) -> np.ndarray:
    p = np.sort(softmax(logits), axis=1)
    return p[:, -1] - p[:, -2]


def compare(logits: dict, labels, classes) -> dict:
    """Per-backend metrics, max |logit difference| vs PyTorch, prediction agreement with PyTorch."""
    ref = logits["pytorch"]
    near_tie = top2_gap(ref) < NEAR_TIE if len(ref) else np.zeros(0, bool)
    out = {}
    for name, z in logits.items():
        m = classification_metrics(labels, z.argmax(1), classes)
        out[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                     "recall": {c: m["per_class"][c]["recall"] for c in classes},
                     "max_abs_logit_diff": float(np.abs(z - ref).max()) if len(z) else 0.0,
                     "max_abs_prob_diff": float(np.abs(softmax(z) - softmax(ref)).max()) if len(z) else 0.0,
                     "mean_abs_logit_diff": float(np.abs(z - ref).mean()) if len(z) else 0.0,
                     "agreement": float((z.argmax(1) == ref.argmax(1)).mean()) if len(z) else 1.0,
                     "flips": int((z.argmax(1) != ref.argmax(1)).sum()),
                     "flips_near_tie": int(((z.argmax(1) != ref.argmax(1)) & near_tie).sum()),
                     "confusion_matrix": m["confusion_matrix"]}
    return out


def flipped_images(samples, labels, ref: np.ndarray, z: np.ndarray, classes) -> list[dict]:
    """Every image whose class differs between PyTorch (ref) and a backend (z), widest PyTorch margin first."""
    pr, pz = softmax(ref), softmax(z)
    gap = top2_gap(ref)
    rows = [{"path": str(samples[i][0]), "label": classes[labels[i]],
             "pytorch": classes[int(ref[i].argmax())], "pytorch_probability": float(pr[i].max()),
             "pytorch_top2_gap": float(gap[i]), "int8": classes[int(z[i].argmax())],
             "int8_probability": float(pz[i].max())}
            for i in np.flatnonzero(ref.argmax(1) != z.argmax(1))]
    return sorted(rows, key=lambda r: -r["pytorch_top2_gap"])


def latency_ms(sess: ort.InferenceSession, spec: ImageSpec, batch: int, runs: int = 30, warmup: int = 5) -> float:
    """Median wall time of one run on a random batch."""
    x = np.random.default_rng(0).standard_normal((batch, spec.channels, spec.input_size, spec.input_size),
                                                  dtype=np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)
