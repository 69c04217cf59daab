"""Sends each result back as a DICOM Structured Report (C-STORE to --send-to), on its own thread: a slow or
absent PACS never blocks receiving. A failed send is retried with exponential back-off; the outcome of
every SR (sent, or failed after the last attempt) is a line in the results log."""
from __future__ import annotations

import logging
import queue
import threading
import time

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage

log = logging.getLogger("xray.serve.dicom")
QUEUE_LIMIT = 1000  # SRs waiting to be sent; beyond it a result is logged as not sent (memory stays bounded)


class SrSender:
    def __init__(self, settings, results, service):
        self.settings, self.results = settings, results
        info = service.model.info
        self.model = {"name": info.model_name, "precision": info.precision, "checkpoint_sha256": info.checkpoint_sha256,
                      "version": package_version(), "classes": list(info.classes), "manufacturer": "xray-edge"}
        self._queue: queue.Queue = queue.Queue(QUEUE_LIMIT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="xray-sr-sender", daemon=True)
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.add_requested_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 30):
        """Send what is queued (one attempt each once stopping), then end."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, source, record: dict):
        try:
            self._queue.put_nowait((source, record))
        except queue.Full:
            self.results.write("sr_not_sent", sop_instance_uid=str(source.get("SOPInstanceUID", "")),
                               reason=f"{QUEUE_LIMIT} reports already waiting for {self.settings.send_to.ae_title}")

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._send_with_retries(*item)

    def _send_with_retries(self, source, record):
        from .dicom_sr import build_sr

        src_uid = str(source.get("SOPInstanceUID", ""))
        try:
            sr = build_sr(source, record, self.model)
        except Exception as e:  # a dataset highdicom cannot reference: logged, never retried
            log.exception("building the SR failed")
            self.results.write("sr_failed", sop_instance_uid=src_uid, attempts=0, reason=f"cannot build the SR: {e}")
            return
        dest, reason = self.settings.send_to, ""
        attempts = 1 if self._stop.is_set() else max(1, self.settings.send_retries)
        for attempt in range(1, attempts + 1):
            status, reason = self._send(sr)
            if status == 0x0000:
                self.results.write("sr_sent", sop_instance_uid=src_uid, sr_sop_instance_uid=str(sr.SOPInstanceUID),
                                   destination=f"{dest.ae_title}@{dest.host}:{dest.port}", attempts=attempt)
                return
            if attempt < attempts and self._stop.wait(self.settings.retry_base_s * 2 ** (attempt - 1)):
                attempts = attempt + 1  # stopping: one last try, no more waiting
        self.results.write("sr_failed", sop_instance_uid=src_uid, attempts=attempts,
                           destination=f"{dest.ae_title}@{dest.host}:{dest.port}", reason=reason)

    def _send(self, sr) -> tuple[int | None, str]:
        dest = self.settings.send_to
        assoc = self.ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            return None, f"no association with {dest.ae_title}@{dest.host}:{dest.port} (refused or unreachable)"
        try:
            status = assoc.send_c_store(sr)
            code = getattr(status, "Status", None)
            return code, "" if code == 0 else f"C-STORE status {code if code is None else hex(code)}"
        finally:
            assoc.release()


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("xray-edge")
    except Exception:
        return "unknown"
