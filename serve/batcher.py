"""Dynamic micro-batching: requests put decoded images on a queue; one thread owns the onnxruntime
session and runs whatever is waiting together (up to max_batch, waiting at most max_delay for more).

With max_delay 0 (the default, as Triton's) the model never waits: it batches only the images that
queued while it was busy, so a lone request runs at batch 1 with no added latency. The queue itself is
bounded by the service's admission limit (requests in flight), not here.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np

from xray.infer.model import EdgeModel

_STOP = object()


@dataclass
class Row:
    """One image's outputs (a row of infer.model.Outputs)."""

    probs: np.ndarray
    ood_score: float | None
    ood: bool | None
    cam: np.ndarray | None = None  # classes x h x w, only when the caller asked for it


class Batcher:
    def __init__(self, model: EdgeModel, max_batch: int = 16, max_delay_ms: float = 0.0, on_batch=None):
        self.model, self.max_batch, self.max_delay = model, max_batch, max_delay_ms / 1000
        self.on_batch = on_batch or (lambda size, seconds: None)  # metrics hook
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="xray-model", daemon=True)

    @property
    def waiting(self) -> int:
        """Images queued, not yet running (the /metrics queue depth)."""
        return self._queue.qsize()

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 30.0):
        """Run everything already queued, then end the model thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def submit(self, image: np.ndarray, cam: bool = False) -> Future:
        """Queue one image; the Future gets its Row (callers on any thread: HTTP handlers, DICOM associations).
        cam=True: the Row carries the class activation maps (the batch then computes them for all)."""
        future: Future = Future()
        self._queue.put((image, future, cam))
        return future

    async def predict(self, images: list[np.ndarray], cam: bool = False) -> list[Row]:
        return list(await asyncio.gather(*(asyncio.wrap_future(self.submit(image, cam)) for image in images)))

    def run_now(self, images: list[np.ndarray]) -> list[Row]:
        """Synchronous batch on the caller's thread (the warm-up, before the model thread starts)."""
        return self._rows(self.model.predict(np.stack(images)))

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch, stop = self._collect(item)
            self._run(batch)
            if stop:
                return

    def _collect(self, first):
        batch, deadline = [first], time.monotonic() + self.max_delay
        while len(batch) < self.max_batch:
            try:
                left = deadline - time.monotonic()
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self, batch):
        start = time.perf_counter()
        try:
            cam = any(want for _, _, want in batch)
            rows = self._rows(self.model.predict(np.stack([image for image, _, _ in batch]), cam=cam))
        except Exception as e:  # an onnxruntime failure fails this batch's requests, not the thread
            for _, future, _ in batch:
                _set(future, None, e)
            return
        self.on_batch(len(batch), time.perf_counter() - start)
        for (_, future, want), row in zip(batch, rows):
            _set(future, row if want or row.cam is None else Row(row.probs, row.ood_score, row.ood), None)

    @staticmethod
    def _rows(out) -> list[Row]:
        return [Row(out.probs[k], None if out.ood_score is None else float(out.ood_score[k]),
                    None if out.ood is None else bool(out.ood[k]), None if out.cam is None else out.cam[k])
                for k in range(len(out.probs))]


def _set(future: Future, row, error):
    try:
        future.set_exception(error) if error is not None else future.set_result(row)
    except InvalidStateError:  # cancelled: the request is gone
        pass
