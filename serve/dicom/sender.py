"""Sends each result back as a DICOM Structured Report (C-STORE to --send-to), on its own thread: a slow or
absent PACS never blocks receiving. A failed send is retried with exponential back-off; the outcome of
every SR (sent, or failed after the last attempt) is a line in the results log."""
from __future__ import annotations

import logging
import queue
import threading

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

log = logging.getLogger("xray.serve.dicom")
QUEUE_LIMIT = 1000  # SRs waiting to be sent; beyond it a result is logged as not sent (memory stays bounded)
HEATMAP_MAX_SIDE = 1024  # the Secondary Capture is for a viewer's glance, not diagnosis: keep it small


class SrSender:
    def __init__(self, settings, results, service):
        self.settings, self.results = settings, results
        info = service.model.info
        self.spec = info.spec
        self.model = {"name": info.model_name, "precision": info.precision, "checkpoint_sha256": info.checkpoint_sha256,
                      "version": package_version(), "classes": list(info.classes), "manufacturer": "xray-edge"}
        self._queue: queue.Queue = queue.Queue(QUEUE_LIMIT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="xray-sr-sender", daemon=True)
        self.ae = AE(ae_title=settings.ae_title)
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 30):
        """Send what is queued (one attempt each once stopping), then end."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, source, record: dict, heatmap=None):
        """heatmap: (the instance's bytes, its class activation maps), to send an overlay SC with the SR."""
        try:
            self._queue.put_nowait((source, record, heatmap))
        except queue.Full:
            self.results.write("sr_not_sent", sop_instance_uid=str(source.get("SOPInstanceUID", "")),
                               reason=f"{QUEUE_LIMIT} reports already waiting for {self.settings.send_to.ae_title}")

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._send_with_retries(*item)
            except Exception as e:  # a network error must not end the thread: later reports still go out
                log.exception("sending the SR failed")
                self.results.write("sr_failed", sop_instance_uid=str(item[0].get("SOPInstanceUID", "")),
                                   reason=f"{type(e).__name__}: {e}")

    def _send_with_retries(self, source, record, heatmap):
        from .sr import build_sr

        src_uid = str(source.get("SOPInstanceUID", ""))
        try:
            objects = [build_sr(source, record, self.model)]
            if heatmap is not None:
                objects.append(self._heatmap_sc(source, record, *heatmap))
        except Exception as e:  # a dataset highdicom cannot reference: logged, never retried
            log.exception("building the SR failed")
            self.results.write("sr_failed", sop_instance_uid=src_uid, attempts=0, reason=f"cannot build the SR: {e}")
            return
        dest, attempts = self.settings.send_to, 1 if self._stop.is_set() else self.settings.send_retries
        for attempt in range(1, attempts + 1):
            status, reason = self._send(objects)
            if status == 0x0000:
                extra = {"heatmap_sop_instance_uid": str(objects[1].SOPInstanceUID)} if len(objects) > 1 else {}
                self.results.write("sr_sent", sop_instance_uid=src_uid, sr_sop_instance_uid=str(objects[0].SOPInstanceUID),
                                   **extra, destination=f"{dest.ae_title}@{dest.host}:{dest.port}", attempts=attempt)
                return
            if attempt == attempts or self._stop.wait(self.settings.retry_base_s * 2 ** (attempt - 1)):
                break  # the last attempt, or stopping: no more waiting
        self.results.write("sr_failed", sop_instance_uid=src_uid, attempts=attempt,
                           destination=f"{dest.ae_title}@{dest.host}:{dest.port}", reason=reason)

    def _heatmap_sc(self, source, record, data: bytes, cam):
        import numpy as np

        from xray.common.imageio import load_image
        from xray.infer.heatmap import overlay

        from .sr import build_heatmap_sc

        image = load_image(data, name="instance.dcm")
        image.thumbnail((HEATMAP_MAX_SIDE, HEATMAP_MAX_SIDE))
        best = int(np.argmax(list(record["probabilities"].values())))  # in the model's class order
        caption = f"{record['prediction']} {record['probability']:.2f} - xray-edge, research use only"
        return build_heatmap_sc(source, np.asarray(overlay(image, cam[best], self.spec, caption)))

    def _send(self, objects) -> tuple[int | None, str]:
        """All of one result's objects (the SR, the heatmap) over one association; 0 when every one was stored."""
        dest = self.settings.send_to
        assoc = self.ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            return None, f"no association with {dest.ae_title}@{dest.host}:{dest.port} (refused or unreachable)"
        try:
            for ds in objects:
                code = getattr(assoc.send_c_store(ds), "Status", None)
                if code != 0:
                    return code, f"C-STORE of {ds.SOPClassUID.name} status {code if code is None else hex(code)}"
            return 0, ""
        finally:
            if assoc.is_established:
                assoc.release()


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("xray-edge")
    except Exception:
        return "unknown"
