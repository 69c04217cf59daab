"""The DICOM node: a Storage SCP (pynetdicom) that classifies what the X-ray unit or PACS pushes, through
the HTTP service's own model worker (the same decode pool and batcher), logs every result, and sends a
Structured Report back.

Accepted: C-ECHO, and C-STORE of the storage classes chest films come in (CR, DX for presentation and
for processing, Secondary Capture) in the transfer syntaxes this pydicom can decode; anything else is
refused in the association negotiation. The Deflated transfer syntax is refused there too: pydicom inflates
it in full before anything can be checked (a 0.3 MB instance can inflate to gigabytes). Every instance
received gets a line in `results.jsonl`, with a prediction or a reason (not a chest film, lateral view,
undecodable pixels); none crashes the node.

C-STORE answers: 0x0000 once the instance is logged and its report is on disk in the outbox (or it gets
none: not a chest film, undecodable pixels, logged with the image error's `kind`; or its report already waits
there: `duplicate_of`); 0xA700 "out of resources" when the node cannot take it now (loading, shutting down,
--max-queue reached, out of memory, the same instance arriving on another association, an internal failure) so
that the modality sends it again; 0xC000 only for a dataset that cannot be parsed.

Nothing about an association outlives it (the byte count of its current instance goes with its connection):
the node's memory does not grow with the associations it has served (scripts/bench_node_memory.py).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.sop_class import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                                  DigitalXRayImageStorageForProcessing, MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
                                  MultiFrameGrayscaleWordSecondaryCaptureImageStorage, SecondaryCaptureImageStorage,
                                  Verification)

from xray.common.errors import one_line
from xray.serve.audit import AuditLog
from xray.serve.settings import is_loopback
from xray.serve.tls import ServerTls, common_name, subject

from . import pdu_limit
from . import tls_server
from .destination import Destination, DicomWebDestination
from .dimse_client import SendTls
from .outbox import Outbox
from .reports import build_reports, model_identity
from .results_log import PatientIdPolicy, ResultsLog, lines_since
from .sender import Sender
from .sr import HEATMAP_DESCRIPTION

log = logging.getLogger("xray.serve.dicom")

CHEST_STORAGE = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                 DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage,
                 MultiFrameGrayscaleByteSecondaryCaptureImageStorage, MultiFrameGrayscaleWordSecondaryCaptureImageStorage)
CHEST_BODY_PARTS = ("", "CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LLD", "RLD")
STATUS_OK, STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES = 0x0000, 0xC000, 0xA700


def decodable_transfer_syntaxes() -> list[UID]:
    """The transfer syntaxes whose pixel data this pydicom (and its installed plugins) can decode, but Deflated."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    out = []
    for ts in uid.AllTransferSyntaxes:
        if ts == uid.DeflatedExplicitVRLittleEndian:  # inflated in full by dcmread: a memory bomb
            continue
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            pass
    return out


@dataclass(frozen=True)
class NodeSettings:
    port: int | None = 11112  # None: no DIMSE listener (STOW-RS only)
    dicomweb: bool = False  # POST /dicomweb/studies (serve.dicom.stow_routes)
    host: str = "127.0.0.1"
    ae_title: str = "XRAY_EDGE"
    allow_ae: tuple[str, ...] = field(default_factory=tuple)  # calling AE titles accepted (empty: any)
    accept_any_called_ae: bool = False  # else the called AE title must be ae_title
    results_dir: Path = Path("xray-dicom-results")
    send_to: Destination | DicomWebDestination | None = None
    send_credentials: Path | None = None  # a DICOMweb destination's Authorization, read before every request
    max_pdu: int = 65536  # bytes per PDU this node receives
    max_instance_mb: float = 64.0  # an association sending more for one instance is aborted (radiographs: 5-40 MB)
    max_associations: int = 8
    send_heatmap: bool = False  # also send the heatmap overlay as a Secondary Capture with each SR
    send_backoff_max_s: float = 60.0  # the sender's back-off doubles from 1 s up to this
    send_max_age_h: float = 168.0  # undelivered after this long: sr_expired, kept aside
    log_patient_id: str = "keep"  # keep | hash | omit, in results.jsonl
    patient_id_key: Path | None = None  # the HMAC key file for log_patient_id="hash"
    drain_s: float = 10.0  # on shutdown, associations in progress get this long to finish
    tls: ServerTls | None = None  # --dicom-tls-cert/-key/-ca: the DICOM port speaks TLS only
    handshake_timeout_s: float = 30.0  # a TLS handshake that stalls is dropped after this (--read-timeout-s)
    ae_certificates: tuple[tuple[str, str], ...] = ()  # --allow-ae AE=CN: that AE title needs a certificate of CN
    send_tls: SendTls | None = None  # --send-tls-ca/-cert/-key: reports go over TLS (DIMSE) or verified so (STOW-RS)


class DicomNode:
    def __init__(self, service, settings: NodeSettings, audit: AuditLog | None = None):
        self.service, self.settings = service, settings
        self.audit = audit or AuditLog(None)
        self.results = ResultsLog(settings.results_dir, PatientIdPolicy(settings.log_patient_id, settings.patient_id_key))
        info = service.model.info
        self.model_fields = {"name": info.model_name, "precision": info.precision, "file": service.model.path.name,
                             "checkpoint_sha256": info.checkpoint_sha256}
        self.identity = model_identity(service)
        self.outbox = Outbox(settings.results_dir) if settings.send_to else None
        self.sender = Sender(settings.send_to, self.outbox, self.results, settings.ae_title,
                             settings.send_backoff_max_s, settings.send_max_age_h * 3600,
                             credentials=settings.send_credentials, tls=settings.send_tls,
                             audit=self.audit) if settings.send_to else None
        if self.outbox is not None:
            service.metrics.outbox_backlog.set_function(self.outbox.backlog)
            service.metrics.outbox_oldest.set_function(self.outbox.oldest_age_s)
        self._received: dict[int, int] = {}  # open association id -> bytes received since its last C-STORE
        self._receiving: set[str] = set()  # SOP Instance UIDs being classified now (one association each)
        self._in_flight, self._lock = 0, threading.Lock()
        self._server, self._listening = None, False
        self.stow_bodies = 0  # STOW-RS requests being received (serve.dicom.stow_routes; the event loop's thread)
        self.storage_classes = {str(c) for c in CHEST_STORAGE}  # what C-STORE negotiates and STOW-RS checks
        self.transfer_syntaxes = decodable_transfer_syntaxes()

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        """Listen for DIMSE (with a port), start the sender, log what the node takes and where reports go."""
        s = self.settings
        self.port = self._listen() if s.port is not None else None
        d = s.send_to
        if isinstance(d, DicomWebDestination) and d.scheme == "http" and not d.on_loopback:
            log.warning("reports go to %s over plain HTTP: patient data%s cross the network unencrypted "
                        "(use dicomweb+https://)", d.where, " and the credentials" if s.send_credentials else "")
        for folder in self.outbox.unreadable if self.outbox else []:
            log.warning("outbox: %s has no readable result.json: left in place, not sent", folder)
            self.results.write("outbox_unreadable", folder=str(folder))
        if self.outbox is not None:
            reconcile(self.outbox, self.results)
        if self.sender:
            self.sender.start()
        takes = [f"listening on {s.host}:{self.port} (storage: CR, DX, SC; {len(self.transfer_syntaxes)} "
                 "transfer syntaxes)"] if self.port is not None else []
        takes += ["taking STOW-RS at POST /dicomweb/studies"] if s.dicomweb else []
        log.info("DICOM node %s %s%s", s.ae_title, ", ".join(takes), f"; SRs to {self.sender.where}, "
                 f"{self.outbox.backlog()} waiting in the outbox" if self.sender else "")
        self.results.write("node_started", ae_title=s.ae_title, port=self.port, dicomweb=s.dicomweb,
                           model=self.model_fields, outbox_backlog=self.outbox.backlog() if self.outbox else None)

    def _listen(self) -> int:
        s = self.settings
        pdu_limit.install()
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.handshake_timeout_s  # a connection that never asks for an association goes after this
        ae.require_calling_aet = list(s.allow_ae)
        ae.require_called_aet = not s.accept_any_called_ae
        for sop_class in CHEST_STORAGE:
            ae.add_supported_context(sop_class, self.transfer_syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_DATA_RECV, self._on_data),
                    (evt.EVT_CONN_CLOSE, self._on_closed), (evt.EVT_REQUESTED, self._on_requested)]
        self._server = tls_server.serve(ae, (s.host, s.port), s.tls, s.handshake_timeout_s, self._on_handshake_failed,
                                        handlers)
        self._listening = True
        if not is_loopback(s.host) and not s.allow_ae:
            log.warning("DICOM node on %s accepts any calling AE title: name the modalities and PACS with "
                        "--allow-ae AE (repeatable)", s.host)
        if not is_loopback(s.host) and s.tls is None:
            log.warning("DICOM node on %s without TLS: images, patient names and reports cross the network in clear "
                        "(--dicom-tls-cert/--dicom-tls-key)", s.host)
        return self._server.server_address[1]

    def stop_listening(self):
        """No new associations (SIGTERM); those in progress go on until stop(). Called from the signal's thread
        and from stop(): only the first call shuts the server down."""
        with self._lock:
            listening, self._listening = self._listening, False
        if listening:
            self._server.shutdown()

    def stop(self):
        """Stop listening, let the associations in progress finish (up to drain_s, then abort them, logged),
        stop the sender (what is unsent stays in the outbox), close the log."""
        self.stop_listening()
        deadline = time.monotonic() + self.settings.drain_s
        while self._server is not None and self._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._server.active_associations if self._server is not None else []:
            self.results.write("association_aborted", calling_ae=_calling_assoc(assoc),
                               reason=f"shutting down: still open after {self.settings.drain_s:g} s")
            assoc.abort()
        if self.sender:
            self.sender.stop()
        self.results.write("node_stopped", outbox_backlog=self.outbox.backlog() if self.outbox else None)
        self.results.close()

    def outbox_status(self) -> dict | None:
        """For /health/ready and /metrics: results waiting for the PACS."""
        if self.outbox is None:
            return None
        return {"backlog": self.outbox.backlog(), "oldest_age_s": self.outbox.oldest_age_s(),
                "destination": self.sender.where}

    # ------------------------------------------------------------------ association events
    def _on_handshake_failed(self, address, reason: str):
        """A TLS handshake on the DICOM port failed (the connection's thread; the node goes on serving)."""
        peer = address[0] if address else ""
        log.warning("DICOM TLS: connection from %s refused: %s", peer, reason)
        self.results.write("tls_refused", peer=peer, reason=reason)
        self.audit.tls_failed(peer=peer, port_kind="dicom", reason=reason)

    def _tls_identity(self, assoc) -> str | None:
        """The verified client certificate's subject; None on a plain port."""
        if self.settings.tls is None:
            return None
        return subject(_peercert(assoc)) or "TLS, no client certificate asked for"

    def _on_requested(self, event):
        """--allow-ae AE=CN: the certificate vouches for the AE title it calls with (A-ASSOCIATE-RJ otherwise)."""
        pairs = dict(self.settings.ae_certificates)
        calling = _calling_requested(event)
        if calling not in pairs:
            return
        cert = _peercert(event.assoc)
        name = common_name(cert)
        if name == pairs[calling]:
            return
        reason = (f"calling AE title {calling!r} needs a client certificate with CN={pairs[calling]} (--allow-ae); "
                  f"{'its CN is ' + repr(name) if name else 'none was presented'}")
        self._refuse_association(event, reason)
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, service user: calling AE not recognised
        event.assoc.kill()

    def _on_accepted(self, event):
        assoc = event.assoc
        calling, called = _calling(event), str(getattr(assoc.acceptor, "ae_title", "") or "").strip()
        self.audit.association(peer=_peer(assoc), calling_ae=calling, called_ae=called,
                               tls_subject=self._tls_identity(assoc), accepted=True)
        refused = [str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts]
        if refused:
            names = sorted({UID(u).name for u in refused})
            self.results.write("contexts_refused", calling_ae=_calling(event), sop_classes=names,
                               reason="not a chest radiograph storage class (CR, DX, Secondary Capture) in a "
                                      "transfer syntax this node can decode: refused in negotiation")

    def _on_rejected(self, event):
        s, request = self.settings, getattr(event.assoc.requestor, "primitive", None)
        calling = str(getattr(request, "calling_ae_title", "") or "").strip()
        called = str(getattr(request, "called_ae_title", "") or "").strip()
        if s.allow_ae and calling not in s.allow_ae:
            reason = f"calling AE title {calling!r} not in --allow-ae"
        elif not s.accept_any_called_ae and called != s.ae_title:
            reason = f"called AE title {called!r} is not this node's ({s.ae_title!r}, --ae-title)"
        else:
            reason = f"{s.max_associations} associations already open (--max-associations)"
        self._refuse_association(event, reason)

    def _refuse_association(self, event, reason: str):
        request = getattr(event.assoc.requestor, "primitive", None)
        calling = str(getattr(request, "calling_ae_title", "") or "").strip()
        called = str(getattr(request, "called_ae_title", "") or "").strip()
        tls = self._tls_identity(event.assoc)
        self.results.write("association_rejected", calling_ae=calling, called_ae=called, peer=_peer(event.assoc),
                           **({"tls_subject": tls} if tls else {}), reason=reason)
        self.audit.association(peer=_peer(event.assoc), calling_ae=calling, called_ae=called, tls_subject=tls,
                               accepted=False, reason=reason)

    def _on_closed(self, event):
        """Released, aborted or dropped: whatever ended the association, its count goes with it. A connection
        closed before its A-ASSOCIATE-RQ (a port scan, a certificate check) would leave pynetdicom 3.0 waiting
        for the request until the ACSE timeout, holding one of --max-associations: wake that wait now (None is
        what a timeout gives it, and it ends the association)."""
        with self._lock:
            self._received.pop(id(event.assoc), None)
        assoc = event.assoc
        if assoc.is_acceptor and getattr(assoc.requestor, "primitive", None) is None:
            assoc.dul.to_user_queue.put(None)

    def bookkeeping(self) -> dict:
        """The sizes of everything the node keeps in memory between instances (tests compare it after 10 and
        after 1,000 associations: nothing may grow with the number served)."""
        with self._lock:
            sizes = {"associations": len(self._received), "receiving": len(self._receiving),
                     "in_flight": self._in_flight}
        return {**sizes, **(self.outbox.bookkeeping() if self.outbox else {})}

    def _on_data(self, event):
        key = id(event.assoc)
        with self._lock:
            received = self._received[key] = self._received.get(key, 0) + len(event.data)
        if received > self.settings.max_instance_mb * 1024 * 1024:
            with self._lock:
                self._received[key] = 0
            self.results.write("association_aborted", calling_ae=_calling(event),
                               reason=f"instance larger than the {self.settings.max_instance_mb:g} MB limit "
                                      "(--max-instance-mb)")
            event.assoc.abort()

    # ------------------------------------------------------------------ C-STORE
    def busy(self) -> str | None:
        """Why the node cannot take an instance now (answered 0xA700: the sender retries later), or None."""
        service = self.service
        if service.draining:
            return "the server is shutting down"
        if not service.ready:
            return "the model is still loading"
        if service.in_flight + self._in_flight >= service.settings.max_queue:
            return f"busy: {service.in_flight + self._in_flight} requests in flight (--max-queue " \
                   f"{service.settings.max_queue})"
        return None

    def _on_store(self, event) -> int:
        start = time.perf_counter()
        with self._lock:
            self._received[id(event.assoc)] = 0
        ids = {"calling_ae": _calling(event), "peer": _peer(event.assoc)}
        if self.settings.tls:
            ids["tls_subject"] = self._tls_identity(event.assoc)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as e:  # the only case for "cannot understand": the dataset does not parse
            self.results.write("instance", status="error", kind="bad_dicom",
                               reason=f"cannot read the dataset ({one_line(e)})", **ids)
            return self._audited(ids, STATUS_CANNOT_UNDERSTAND)
        return self.receive(ds, event.encoded_dataset, ids, start)

    def receive(self, ds, encoded, ids: dict, start: float | None = None) -> int:
        """One instance, from a C-STORE or a STOW-RS part (serve.dicom.stow): checked, classified, logged and its
        report kept in the outbox; audited (--audit) before the answer. encoded() gives the instance's bytes
        (asked only when it is classified). Returns the DIMSE status: 0x0000 received (classified or not), 0xA700
        not now, 0xC000 unreadable."""
        return self._audited(ids, self._receive(ds, encoded, ids, start))

    def _audited(self, ids: dict, status: int) -> int:
        """The instance's audit event, written before the answer; an audit that cannot be written (a full disk)
        turns the answer into 0xA700: the sender tries again, and its report is not queued twice."""
        patient = self.results.patient_ids.apply({"patient_id": ids.get("patient_id", "")})
        try:
            self.audit.instance_received(
                peer=ids.get("peer") or ids.get("client", ""), calling_ae=ids.get("calling_ae", ids.get("received_by", "")),
                sop_instance_uid=ids.get("sop_instance_uid", ""), sop_class=ids.get("sop_class"),
                study_instance_uid=ids.get("study_instance_uid", ""),
                patient_id=patient.get("patient_id") or patient.get("patient_id_hmac"),
                outcome={STATUS_OK: 0, STATUS_OUT_OF_RESOURCES: 4}.get(status, 8), reason=f"status 0x{status:04X}")
        except OSError as e:
            log.error("audit: cannot write (%s): instance %s answered 0xA700", one_line(e), ids.get("sop_instance_uid"))
            return STATUS_OUT_OF_RESOURCES
        return status

    def _receive(self, ds, encoded, ids: dict, start: float | None = None) -> int:
        start = time.perf_counter() if start is None else start
        try:
            ids.update(identifiers(ds))
        except Exception as e:
            self.results.write("instance", status="error", kind="bad_dicom",
                               reason=f"cannot read the dataset ({one_line(e)})", **ids)
            return STATUS_CANNOT_UNDERSTAND
        reason = not_for_the_model(ds)
        if reason:
            self.results.write("instance", status="not_classified", reason=reason, **ids, model=self.model_fields)
            return STATUS_OK
        uid = ids["sop_instance_uid"]
        waiting = self._waiting_report(uid)
        if waiting is not None:  # a retry or a re-push while its report waits: nothing is queued twice
            self.results.write("instance", **{**waiting.record, **ids}, duplicate_of=waiting.name, **waiting.uids())
            return STATUS_OK
        with self._lock:
            busy = self.busy()
            if busy is None and uid and uid in self._receiving:
                busy = "the same instance is being received on another association"
            if busy is None:
                self._in_flight += 1
                self._receiving.add(uid)
        if busy:
            self.results.write("instance", status="deferred", reason=f"{busy}: answered 0xA700, to be resent", **ids)
            return STATUS_OUT_OF_RESOURCES
        try:
            return self._classify_and_keep(encoded, ds, ids, start)
        except MemoryError:  # resource exhaustion is never a verdict on the image: the modality tries again later
            log.error("instance %s: out of memory: answered 0xA700", uid)
            self.results.write("instance", status="deferred", reason="out of memory: answered 0xA700, to be resent",
                               **ids)
            return STATUS_OUT_OF_RESOURCES
        except Exception as e:  # onnxruntime, a full disk: transient for the sender, which resends on 0xA7xx
            log.exception("instance %s failed", uid)
            self.results.write("instance", status="deferred", reason=f"internal error ({one_line(e)}): answered "
                                                                     "0xA700, to be resent", **ids)
            return STATUS_OUT_OF_RESOURCES
        finally:
            with self._lock:
                self._in_flight -= 1
                self._receiving.discard(uid)

    def _waiting_report(self, uid: str):
        """The outbox entry of this instance by this model, still undelivered; None when there is none."""
        entry = self.outbox.pending_for(uid) if self.outbox is not None else None
        if entry is None or entry.record.get("model", {}).get("checkpoint_sha256") != self.model_fields["checkpoint_sha256"]:
            return None
        return entry

    def _classify_and_keep(self, encoded, ds, ids, start) -> int:
        data = encoded()
        want_cam = bool(self.sender and self.settings.send_heatmap and self.service.model.has_cam)
        record, timing, drawn = self.service.classify_blocking(data, f"{ids['sop_instance_uid']}.dcm", cam=want_cam)
        timing["total_ms"] = round((time.perf_counter() - start) * 1e3, 2)
        if "error" in record:
            self.results.write("instance", status="error", kind=record["error"]["kind"],
                               reason=record["error"]["message"], **ids, model=self.model_fields, timing=timing)
            return STATUS_OK  # received and logged; the PACS has nothing to resend
        fields = {k: record[k] for k in ("prediction", "probability", "probabilities", "ood", "ood_score", "reason")
                  if k in record}
        status = "out_of_distribution" if record.get("ood") else "classified"
        if self.outbox is None:
            self.results.write("instance", status=status, **ids, **fields, model=self.model_fields, timing=timing)
            return STATUS_OK
        # a heatmap only for a diagnosis: none for an image the guard flagged
        heatmap = drawn if drawn is not None and not record.get("ood") else None
        try:
            objects = build_reports(ds, record, self.identity, self.service.model.info.spec, heatmap)
        except Exception as e:  # a bug: logged loudly, the instance is not lost from the log
            log.exception("building the report of %s failed", ids["sop_instance_uid"])
            self.results.write("instance", status=status, **ids, **fields, model=self.model_fields, timing=timing)
            self.results.write("sr_not_built", sop_instance_uid=ids["sop_instance_uid"], reason=one_line(e))
            return STATUS_OK
        line = {"status": status, **ids, **fields, "model": self.model_fields}
        # on disk before the acknowledgement; its record as results.jsonl has it (--log-patient-id applied)
        entry = self.outbox.put(ids["sop_instance_uid"], objects, self.results.patient_ids.apply(line))
        self.results.write("instance", **line, timing=timing, entry=entry.name, **entry.uids())
        self.sender.wake()
        return STATUS_OK


def reconcile(outbox: Outbox, results: ResultsLog):
    """After a crash: the lines written for the results still in the outbox decide what is left to do. An object
    whose terminal line is in results.jsonl is done (neither sent nor logged again); a result whose `instance`
    line never made it (a kill between the outbox's rename and the line) gets it now, marked recovered."""
    pending = {e.name: e for e in outbox.entries()}
    if not pending:
        return
    logged = set()
    since = min(e.created for e in pending.values()) - 300  # the lines come after their folder; minus clock slew
    for event in lines_since(results.path, since):
        entry = pending.get(event.get("entry"))
        if entry is None:
            continue
        kind, _, state = str(event.get("event")).partition("_")
        if event["event"] == "instance":
            logged.add(entry.name)
        elif kind in ("sr", "sc") and state in ("sent", "refused", "expired"):
            obj = next((o for o in entry.objects if o["kind"] == kind), None)
            if obj is not None and obj["file"] not in entry.done:
                log.info("outbox: %s %s was logged %s before the restart: not sent again", entry.name, kind, state)
                outbox.mark(entry, obj, state, reason="recovered from results.jsonl")
    for name, entry in pending.items():
        if name not in logged and entry.record:  # no record: written by a version whose lines named no entry
            results.write("instance", **entry.record, entry=name, **entry.uids(), recovered=True)


def identifiers(ds) -> dict:
    return {"sop_class": UID(ds.get("SOPClassUID", "")).name if ds.get("SOPClassUID") else None,
            "sop_instance_uid": str(ds.get("SOPInstanceUID", "")), "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", "")), "patient_id": str(ds.get("PatientID", "")),
            "modality": str(ds.get("Modality", ""))}


def not_for_the_model(ds) -> str | None:
    """Why this instance gets no diagnosis from a frontal chest model, from its header; None: classify it."""
    if "PixelData" not in ds:
        return "no pixel data"
    if str(ds.get("SeriesDescription", "")) == HEATMAP_DESCRIPTION and str(ds.get("Manufacturer", "")) == "xray-edge":
        return "this node's own heatmap (an archive routed it back)"  # classifying it would loop
    body = str(ds.get("BodyPartExamined", "") or "").upper()
    if body not in CHEST_BODY_PARTS:
        return f"not a chest image (BodyPartExamined {body})"
    view = str(ds.get("ViewPosition", "") or "").upper()
    if view in LATERAL_VIEWS:
        return f"lateral view (ViewPosition {view}): the model reads frontal (PA/AP) films"
    return None


def _calling(event) -> str:
    return _calling_assoc(event.assoc)


def _calling_requested(event) -> str:
    request = getattr(event.assoc.requestor, "primitive", None)
    return str(getattr(request, "calling_ae_title", "") or "").strip()


def _peer(assoc) -> str:
    try:
        return str(assoc.requestor.address)
    except AttributeError:
        return ""


def _peercert(assoc) -> dict | None:
    """The verified client certificate of a TLS association (None: plain, or no certificate asked for)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    try:
        return sock.getpeercert() if hasattr(sock, "getpeercert") else None
    except (OSError, ValueError):
        return None


def _calling_assoc(assoc) -> str:
    try:
        return str(assoc.requestor.ae_title).strip()
    except AttributeError:
        return ""

