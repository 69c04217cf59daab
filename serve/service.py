"""The work behind the routes: admission, decoding in a thread pool, the batcher, and the per-image
records (built by xray.infer's own `record`, so the service and the CLI answer with the same fields)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import onnxruntime as ort

from xray.common.cpu import detect_cpu
from xray.common.preprocess import preprocess
from xray.infer.formats import record
from xray.infer.model import EdgeModel
from xray.infer.predict import ImageFailure, Result, decode_or_error

from .batcher import Batcher
from .metrics import Metrics
from .settings import Settings
from .views import Views, render, shrink

log = logging.getLogger("xray.serve")
NOTICE = "Research use only. Not a medical device: not for diagnosis or treatment decisions."


class Unavailable(Exception):
    """503: loading, draining, or the admission limit is reached."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Service:
    def __init__(self, model: EdgeModel, settings: Settings, metrics: Metrics):
        self.model, self.settings, self.metrics = model, settings, metrics
        self.batcher = Batcher(model, settings.max_batch, settings.max_delay_ms, metrics.observe_batch)
        self.pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="xray-decode")
        self.guard = model.info.ood if model.has_guard else None
        self.ready = self.draining = False
        self.in_flight = 0
        info = model.info
        metrics.model.info({"name": info.model_name, "file": model.path.name, "precision": info.precision,
                            "classes": ",".join(info.classes), "checkpoint_sha256": info.checkpoint_sha256,
                            "ood_guard": str(model.has_guard).lower()})
        metrics.queue_depth.set_function(lambda: self.batcher.waiting)
        metrics.in_flight.set_function(lambda: self.in_flight)

    # ------------------------------------------------------------------ lifecycle
    def warm_up(self):
        """Inference at batch 1 and at --max-batch before the service says it is ready: first runs pick
        kernels, and onnxruntime's memory arena grows to the largest batch now, not under load later."""
        spec = self.model.info.spec
        start = time.perf_counter()
        image = np.zeros((spec.channels, spec.input_size, spec.input_size), np.float32)
        for n in sorted({1, self.settings.max_batch}):
            self.batcher.run_now([image] * n)
        self.batcher.start()
        self.ready = True
        log.info("model %s warmed up in %.0f ms: ready", self.model.path.name, (time.perf_counter() - start) * 1e3)

    def close(self):
        self.ready, self.draining = False, True
        self.batcher.stop()
        self.pool.shutdown(wait=True)

    # ------------------------------------------------------------------ admission
    @contextmanager
    def admit(self):
        if self.draining:
            raise Unavailable("the server is shutting down")
        if not self.ready:
            raise Unavailable("the model is still loading")
        if self.in_flight >= self.settings.max_queue:
            self.metrics.errors.labels("queue_full").inc()
            raise Unavailable(f"server busy: {self.in_flight} requests in flight (--max-queue "
                              f"{self.settings.max_queue}); retry shortly")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    # ------------------------------------------------------------------ work
    def _prepare(self, data: bytes, name: str, keep_image: bool = False):
        """(model input, None, the decoded image shrunk for a preview when keep_image) or (None, failure, None)."""
        start = time.perf_counter()
        try:
            spec = self.model.info.spec
            image, failure = decode_or_error(data, spec, self.settings.max_pixels, name)
            if image is None:
                return None, failure, None
            return preprocess(image, spec), None, shrink(image) if keep_image else None
        finally:
            self.metrics.decode.observe(time.perf_counter() - start)

    async def classify(self, files: list[tuple[str, bytes]], top_k: int | None, ood_action: str,
                       views: Views = Views()) -> list[dict]:
        """[(file name, bytes)] -> one record per file, in order; a file that fails gets an error object.
        views: also the preview and / or heatmap of each image (serve.views)."""
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(*(loop.run_in_executor(self.pool, self._prepare, data, name, views.wanted)
                                          for name, data in files))
        ok = [i for i, (array, _, _) in enumerate(prepared) if array is not None]
        rows = dict(zip(ok, await self.batcher.predict([prepared[i][0] for i in ok], cam=views.heatmap))) if ok else {}
        records = [self._record(name, rows.get(i), prepared[i][1], top_k, ood_action) for i, (name, _) in enumerate(files)]
        if views.wanted:
            classes, spec = list(self.model.info.classes), self.model.info.spec
            drawn = await asyncio.gather(*(loop.run_in_executor(self.pool, render, prepared[i][2], views, records[i],
                                                                rows[i].cam, classes, spec, self.model.info.cam_scale_value)
                                           for i in ok))
            for i, fields in zip(ok, drawn):
                records[i].update(fields)
        return records

    def classify_blocking(self, data: bytes, name: str, ood_action: str = "abstain",
                          cam: bool = False) -> tuple[dict, dict, tuple | None]:
        """One file from a non-async caller (the DICOM node's association threads): the same decode pool,
        batcher and record. Returns (record, timing in ms, and when cam is asked and present: (the decoded
        image shrunk to a preview's size, the class activation maps, the model's cam scale or None), so nothing
        is decoded twice)."""
        start = time.perf_counter()
        array, error, image = self.pool.submit(self._prepare, data, name, cam).result()
        decoded = time.perf_counter()
        row = self.batcher.submit(array, cam=cam).result() if array is not None else None
        timing = {"decode_ms": round((decoded - start) * 1e3, 2),
                  "model_ms": round((time.perf_counter() - decoded) * 1e3, 2)}
        drawn = (image, row.cam, self.model.info.cam_scale_value) if row is not None and row.cam is not None else None
        return self._record(name, row, error, None, ood_action), timing, drawn

    def _record(self, name: str, row, error: ImageFailure | None, top_k: int | None, ood_action: str) -> dict:
        if row is None:  # error.kind: ImageError's stable kind (common.errors), the label clients and metrics use
            self.metrics.images.labels("error").inc()
            self.metrics.errors.labels(error.kind).inc()
            return {"file": name, "error": {"kind": error.kind, "message": error.message}}
        self.metrics.images.labels("classified").inc()
        if row.ood:
            self.metrics.images.labels("ood").inc()
        return record(Result(name, row.probs, ood_score=row.ood_score, ood=row.ood), self.model.info.classes, top_k,
                      self.guard, ood_action)

    def metadata(self) -> dict:
        from .views import heatmap_legend  # heatmap: how the colours are scaled, and a legend for them

        m, i, s = self.model, self.model.info, self.settings
        return {"model_name": i.model_name, "file": m.path.name, "precision": i.precision, "classes": i.classes,
                "image_spec": json.loads(i.spec.to_json()), "checkpoint_sha256": i.checkpoint_sha256,
                "export_date": i.export_date, "verification": i.verification,
                "ood_guard": i.ood if m.has_guard else None, "heatmaps": m.has_cam, "heatmap": heatmap_legend(m),
                "chosen_because": s.model_reason, "onnxruntime": ort.__version__, "cpu_class": detect_cpu().cls,
                "int8_cpu_classes": i.int8_cpu_classes or None,
                "limits": {"max_upload_mb": s.max_upload_mb, "max_files": s.max_files, "max_pixels": s.max_pixels,
                           "max_batch": s.max_batch, "max_delay_ms": s.max_delay_ms, "max_queue": s.max_queue,
                           "read_timeout_s": s.read_timeout_s},
                "ood_action": s.ood_action, "notice": NOTICE}

