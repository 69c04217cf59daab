"""The DICOM node: a Storage SCP (pynetdicom) that classifies what the X-ray unit or PACS pushes, through
the HTTP service's own model worker (the same decode pool and batcher), logs every result, and sends a
Structured Report back.

Accepted: C-ECHO, and C-STORE of the storage classes chest films come in (CR, DX for presentation and
for processing, Secondary Capture) in the transfer syntaxes this pydicom can decode; anything else is
refused in the association negotiation. Every instance received gets a line in `results.jsonl`, with a
prediction or a reason (not a chest film, lateral view, undecodable pixels); none crashes the node.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.sop_class import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                                  DigitalXRayImageStorageForProcessing, MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
                                  MultiFrameGrayscaleWordSecondaryCaptureImageStorage, SecondaryCaptureImageStorage,
                                  Verification)

from .sender import SrSender

log = logging.getLogger("xray.serve.dicom")

CHEST_STORAGE = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                 DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage,
                 MultiFrameGrayscaleByteSecondaryCaptureImageStorage, MultiFrameGrayscaleWordSecondaryCaptureImageStorage)
CHEST_BODY_PARTS = ("", "CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LLD", "RLD")
STATUS_OK, STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES = 0x0000, 0xC000, 0xA700


def decodable_transfer_syntaxes() -> list[UID]:
    """The transfer syntaxes whose pixel data this pydicom (and its installed plugins) can decode."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    out = []
    for ts in uid.AllTransferSyntaxes:
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            pass
    return out


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """AE@HOST:PORT"""
        ae, at, rest = text.partition("@")
        host, colon, port = rest.rpartition(":")
        if not (at and colon and ae and host and port.isdigit() and 0 < int(port) < 65536 and len(ae) <= 16):
            raise ValueError(f"{text!r}: expected AE_TITLE@HOST:PORT (AE title of at most 16 characters)")
        return cls(ae, host, int(port))


@dataclass(frozen=True)
class NodeSettings:
    port: int = 11112
    host: str = "127.0.0.1"
    ae_title: str = "XRAY_EDGE"
    allow_ae: tuple[str, ...] = field(default_factory=tuple)  # calling AE titles accepted (empty: any)
    results_dir: Path = Path("xray-dicom-results")
    send_to: Destination | None = None
    max_pdu: int = 65536  # bytes per PDU this node receives
    max_instance_mb: float = 256.0  # an association sending more for one instance is aborted
    max_associations: int = 8
    send_heatmap: bool = False  # also send the heatmap overlay as a Secondary Capture with each SR
    send_retries: int = 5  # attempts per SR before it is logged as failed
    retry_base_s: float = 1.0  # back-off: 1, 2, 4, ... seconds


class ResultsLog:
    """Append-only JSON lines, one complete line per write (a crash never leaves a half line mid-file)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "results.jsonl"
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, event: str, **fields):
        line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event,
                           **fields}, default=str)
        with self._lock:
            if self._file.closed:  # an association still finishing after stop(): say so rather than fail
                log.warning("results log closed, not written: %s", line)
                return
            self._file.write(line + "\n")
            self._file.flush()

    def close(self):
        with self._lock:
            self._file.close()


class DicomNode:
    def __init__(self, service, settings: NodeSettings):
        self.service, self.settings = service, settings
        self.results = ResultsLog(settings.results_dir)
        info = service.model.info
        self.model_fields = {"name": info.model_name, "precision": info.precision, "file": service.model.path.name,
                             "checkpoint_sha256": info.checkpoint_sha256}
        self.sender = SrSender(settings, self.results, service) if settings.send_to else None
        self._received: dict[int, int] = {}  # association id -> bytes received since its last C-STORE
        self._server = None

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.maximum_associations = s.max_associations
        ae.require_calling_aet = list(s.allow_ae)
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in CHEST_STORAGE:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_DATA_RECV, self._on_data),
                    (evt.EVT_ABORTED, self._on_aborted)]
        self._server = ae.start_server((s.host, s.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        if self.sender:
            self.sender.start()
        log.info("DICOM node %s listening on %s:%d (storage: CR, DX, SC; %d transfer syntaxes)%s", s.ae_title,
                 s.host, self.port, len(syntaxes), f"; SRs to {s.send_to.ae_title}@{s.send_to.host}:"
                 f"{s.send_to.port}" if s.send_to else "")
        self.results.write("node_started", ae_title=s.ae_title, port=self.port, model=self.model_fields)

    def stop(self):
        if self._server:
            self._server.shutdown()
        if self.sender:
            self.sender.stop()
        self.results.write("node_stopped")
        self.results.close()

    # ------------------------------------------------------------------ association events
    def _on_accepted(self, event):
        refused = [str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts]
        if refused:
            names = sorted({UID(u).name for u in refused})
            self.results.write("contexts_refused", calling_ae=_calling(event), sop_classes=names,
                               reason="not a chest radiograph storage class (CR, DX, Secondary Capture) in a "
                                      "transfer syntax this node can decode: refused in negotiation")

    def _on_rejected(self, event):
        self.results.write("association_rejected", calling_ae=_calling(event),
                           reason="calling AE title not in --allow-ae, or the association limit is reached")

    def _on_aborted(self, event):
        self._received.pop(id(event.assoc), None)

    def _on_data(self, event):
        key = id(event.assoc)
        self._received[key] = self._received.get(key, 0) + len(event.data)
        if self._received[key] > self.settings.max_instance_mb * 1024 * 1024:
            self._received.pop(key, None)
            self.results.write("association_aborted", calling_ae=_calling(event),
                               reason=f"instance larger than the {self.settings.max_instance_mb:g} MB limit "
                                      "(--max-instance-mb)")
            event.assoc.abort()

    # ------------------------------------------------------------------ C-STORE
    def _on_store(self, event) -> int:
        start = time.perf_counter()
        self._received[id(event.assoc)] = 0
        ids = {"calling_ae": _calling(event)}
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            ids.update(identifiers(ds))
            reason = not_for_the_model(ds)
            if reason:
                self.results.write("instance", status="not_classified", reason=reason, **ids, model=self.model_fields)
                return STATUS_OK
            data = event.encoded_dataset()
            want_cam = bool(self.sender and self.settings.send_heatmap and self.service.model.has_cam)
            record, timing, cam = self.service.classify_blocking(data, f"{ids['sop_instance_uid']}.dcm", cam=want_cam)
        except Exception as e:  # a malformed dataset must not take the node down
            log.exception("C-STORE failed")
            self.results.write("instance", status="error", reason=f"cannot read the dataset ({_one_line(e)})", **ids)
            return STATUS_CANNOT_UNDERSTAND
        timing["total_ms"] = round((time.perf_counter() - start) * 1e3, 2)
        if "error" in record:
            self.results.write("instance", status="error", reason=record["error"]["message"], **ids,
                               model=self.model_fields, timing=timing)
            return STATUS_OK  # received and logged; the PACS has nothing to resend
        fields = {k: record[k] for k in ("prediction", "probability", "probabilities", "ood", "ood_score", "reason")
                  if k in record}
        status = "out_of_distribution" if record.get("ood") else "classified"
        self.results.write("instance", status=status, **ids, **fields, model=self.model_fields, timing=timing)
        if self.sender:  # a heatmap only for a diagnosis: none for an image the guard flagged
            self.sender.submit(ds, record, (data, cam) if cam is not None and not record.get("ood") else None)
        return STATUS_OK


def identifiers(ds) -> dict:
    return {"sop_class": UID(ds.get("SOPClassUID", "")).name if ds.get("SOPClassUID") else None,
            "sop_instance_uid": str(ds.get("SOPInstanceUID", "")), "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", "")), "patient_id": str(ds.get("PatientID", "")),
            "modality": str(ds.get("Modality", ""))}


def not_for_the_model(ds) -> str | None:
    """Why this instance gets no diagnosis from a frontal chest model, from its header; None: classify it."""
    if "PixelData" not in ds:
        return "no pixel data"
    body = str(ds.get("BodyPartExamined", "") or "").upper()
    if body not in CHEST_BODY_PARTS:
        return f"not a chest image (BodyPartExamined {body})"
    view = str(ds.get("ViewPosition", "") or "").upper()
    if view in LATERAL_VIEWS:
        return f"lateral view (ViewPosition {view}): the model reads frontal (PA/AP) films"
    return None


def _calling(event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except AttributeError:
        return ""


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
