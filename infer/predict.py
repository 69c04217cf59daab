"""Files -> probabilities, in input order: a small thread pool decodes and preprocesses ahead while
onnxruntime runs the current batch (PIL and onnxruntime both release the GIL).

Decoding is `common`'s load_image + preprocess with the model's own image spec, JPEG draft included,
exactly as training's eval transform and xray-export's verification do it.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

import numpy as np
from PIL import Image

from xray.common.errors import ImageError
from xray.common.image_spec import ImageSpec
from xray.common.imageio import DEFAULT_MAX_PIXELS, load_image
from xray.common.preprocess import preprocess

from .model import EdgeModel


@dataclass
class Result:
    path: str
    probs: np.ndarray | None = None  # float64, sums to 1
    error: str | None = None
    error_kind: str | None = None  # ImageError.kind of the error (None for errors found before decoding)
    ood_score: float | None = None  # None: the model has no out-of-distribution guard
    ood: bool | None = None  # the score is above the model's threshold: not like the training data
    cam: np.ndarray | None = None  # classes x h x w, only when asked for (--heatmap)


def prepare(source: str | bytes, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
            name: str | None = None) -> np.ndarray:
    """One file (a path, or its bytes named `name`: xray-serve's uploads) -> the model's input array
    (C x H x W float32)."""
    return preprocess(load_image(source, draft_size=spec.resize_size, max_pixels=max_pixels, name=name), spec)


class ImageFailure(NamedTuple):
    """Why one image could not be used: ImageError's stable kind and its one-line message."""

    kind: str
    message: str


def decode_or_error(source, spec, max_pixels, name=None) -> tuple[Image.Image | None, ImageFailure | None]:
    """load_image() as prepare() calls it, with an unusable image as (None, ImageFailure) instead of an
    exception. The exception itself is not kept: its traceback would hold the decoder's buffers while the
    batch waits."""
    try:
        return load_image(source, draft_size=spec.resize_size, max_pixels=max_pixels, name=name), None
    except ImageError as e:
        return None, ImageFailure(e.kind, str(e))


def prepare_or_error(source, spec, max_pixels, name=None) -> tuple[np.ndarray | None, ImageFailure | None]:
    """prepare(), with an unusable image as (None, ImageFailure) instead of an exception."""
    image, failure = decode_or_error(source, spec, max_pixels, name)
    return (None, failure) if image is None else (preprocess(image, spec), None)


def predict_files(model: EdgeModel, paths: list[str], batch_size: int = 16, workers: int = 2,
                  max_pixels: int = DEFAULT_MAX_PIXELS, cam: bool = False):
    """Yield a Result per path, in order. A file that cannot be decoded yields its error; the rest go on.
    cam=True: each Result also carries its class activation maps."""
    spec = model.info.spec
    if workers <= 0 or len(paths) == 1:  # one image: a pool only adds start-up time
        for chunk in _chunks(paths, batch_size):
            yield from _run(model, [(p, *prepare_or_error(p, spec, max_pixels)) for p in chunk], cam)
        return
    lookahead = batch_size + 2 * workers  # bounded: a folder of 100k files never sits in memory at once
    with ThreadPoolExecutor(workers, thread_name_prefix="xray-decode") as pool:
        todo = iter(paths)
        pending = deque((p, pool.submit(prepare_or_error, p, spec, max_pixels)) for p in islice(todo, lookahead))
        batch = []
        while pending:
            path, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(prepare_or_error, nxt, spec, max_pixels)))
            batch.append((path, *future.result()))
            if len(batch) == batch_size:
                yield from _run(model, batch, cam)
                batch = []
        if batch:
            yield from _run(model, batch, cam)


def _chunks(paths, n):
    for i in range(0, len(paths), n):
        yield paths[i:i + n]


def _run(model: EdgeModel, batch, cam: bool = False):
    """batch: [(path, array | None, ImageFailure | None)] -> Results in the same order."""
    ok = [i for i, (_, arr, _) in enumerate(batch) if arr is not None]
    out = model.predict(np.stack([batch[i][1] for i in ok]), cam=cam) if ok else None
    row = {i: k for k, i in enumerate(ok)}
    for i, (path, _, error) in enumerate(batch):
        if i not in row:
            yield Result(path, error=error.message, error_kind=error.kind)
            continue
        k = row[i]
        yield Result(path, out.probs[k], ood_score=None if out.ood_score is None else float(out.ood_score[k]),
                     ood=None if out.ood is None else bool(out.ood[k]), cam=None if out.cam is None else out.cam[k])
