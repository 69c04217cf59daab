"""Drains the outbox to --send-to, on its own thread: a slow or absent PACS never blocks receiving.

One loop whatever the wire: the transport (DIMSE C-STORE in dimse_client, DICOMweb STOW-RS in stow_client) says
what each try meant for each object (transport.Outcome); this file owns the order, the back-off and the events.
Results go oldest first, in rounds (one association, for DIMSE). A failure that may pass (no connection, a
timeout, out of resources, HTTP 5xx / 429 / 401) ends the round and waits a back-off that doubles from 1 s up to
--send-backoff-max-s (longer if the archive said Retry-After, never past that maximum); the results stay in the
outbox, across restarts, until delivered or older than --send-max-age-h.

The SR and the heatmap SC are delivered and logged apart: every object ends in exactly one terminal line in
results.jsonl, fsynced before the outbox forgets it (Outbox.mark), so a crash between the two is repaired from
the log on restart (node.reconcile) and never logs or sends twice:
- sr_sent / sc_sent: stored (DIMSE: 0x0000, a warning 0xBxxx or 0x0111 already stored; DICOMweb: in the answer's
  ReferencedSOPSequence, or "already stored"); `already_stored: true` when the archive had it;
- sr_refused / sc_refused: the destination answered a permanent failure: kept in refused/ with the status;
- sr_expired / sc_expired: still undelivered after --send-max-age-h: kept in expired/.
and `send_waiting` says once per outage that reports wait, and why.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from xray.serve.audit import AuditLog

from .destination import DicomWebDestination
from .dimse_client import DimseTransport, SendTls
from .outbox import EXPIRED, Entry, Outbox, object_fields
from .stow_client import StowTransport
from .transport import REFUSED, RETRY, Outcome

log = logging.getLogger("xray.serve.dicom")
PAUSE_ENV = "XRAY_TEST_PAUSE_AFTER_SEND_S"  # tests only: hold the sender between a delivery and its line


def transport_for(destination, ae_title: str, credentials: Path | None = None, timeout_s: float = 30.0,
                  tls: SendTls | None = None):
    """The transport --send-to names: STOW-RS for a DICOMweb URL, else C-STORE to AE@HOST:PORT (over TLS with tls)."""
    if isinstance(destination, DicomWebDestination):
        return StowTransport(destination, credentials, timeout_s, tls)
    return DimseTransport(destination, ae_title, timeout_s, tls)


class Sender:
    def __init__(self, destination, outbox: Outbox, results, ae_title: str, backoff_max_s: float = 60.0,
                 max_age_s: float = 168 * 3600.0, backoff_base_s: float = 1.0, timeout_s: float = 30.0,
                 credentials: Path | None = None, tls: SendTls | None = None, audit=None):
        self.transport = transport_for(destination, ae_title, credentials, timeout_s, tls)
        self.outbox, self.results = outbox, results
        self.audit = audit or AuditLog(None)
        self.backoff_max_s, self.max_age_s, self.backoff_base_s = backoff_max_s, max_age_s, backoff_base_s
        self.failures = 0  # consecutive failed rounds: the back-off's exponent
        self.retry_after_s: float | None = None  # what the destination asked for after the last failed round
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="xray-sr-sender", daemon=True)

    @property
    def where(self) -> str:
        """The destination as logs and /health/ready show it (never a credential)."""
        return self.transport.where

    def start(self):
        self._thread.start()

    def wake(self):
        """A new result is in the outbox."""
        self._wake.set()

    def stop(self, timeout: float = 30):
        """End after the object being sent; what is not delivered stays in the outbox for the next start."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def backoff_s(self) -> float:
        wait = min(self.backoff_base_s * 2 ** max(self.failures - 1, 0), self.backoff_max_s)
        return min(max(wait, self.retry_after_s or 0.0), self.backoff_max_s)

    # ------------------------------------------------------------------ the loop
    def _loop(self):
        while not self._stop.is_set():
            self._wake.clear()
            self.retry_after_s = None
            try:
                ok = self.send_round()
            except Exception:  # a bug must not end the thread: the results wait on disk for the next round
                log.exception("sending reports failed")
                ok = False
            self.failures = 0 if ok else self.failures + 1
            if ok and self.outbox.backlog() == 0:
                self._wake.wait()  # idle until a new result (or stop)
            elif not ok:
                self._stop.wait(self.backoff_s())

    def send_round(self) -> bool:
        """Send what is pending; False when a failure that may pass stopped the round."""
        entries = [e for e in self.outbox.entries() if not self._expire(e)]
        if not entries:
            return True
        try:
            trouble = self.transport.open_round()
            if trouble is not None:
                entries[0].attempts += 1
                self._note_retry(trouble)
                return False
            for entry in entries:
                if self._stop.is_set():
                    return True
                entry.attempts += 1
                retry = None
                for obj, result in self.transport.send(entry, entry.pending()):
                    if result.kind == RETRY:
                        retry = retry or result
                    else:
                        self._terminal(entry, obj, result)
                if retry is not None:
                    self._note_retry(retry)
                    return False
            return True
        finally:
            self.transport.close()

    # ------------------------------------------------------------------ terminal events
    def _terminal(self, entry: Entry, obj: dict, result: Outcome):
        """An object is delivered or refused: its line first (fsynced), then the outbox forgets it."""
        state = result.kind  # SENT or REFUSED: the object's terminal state in the outbox too
        _pause_for_tests(entry, obj)
        fields = {"entry": entry.name, "sop_instance_uid": entry.source_uid, **object_fields(obj),
                  "destination": self.where, "attempts": entry.attempts, **result.fields}
        if state == REFUSED:
            kept = self.outbox.kept_path(entry, REFUSED)
            log.error("%s for %s refused by %s: %s (kept in %s)", _what(obj), entry.source_uid, self.where,
                      result.reason, kept)
            self.results.write(f"{obj['kind']}_refused", **fields, reason=result.reason, kept=str(kept))
            self._audit(entry, obj, "refused", result.reason)
        else:
            if result.fields.get("warning"):
                log.warning("%s for %s stored by %s with a remark: %s", _what(obj), entry.source_uid, self.where,
                            result.fields["warning"])
            self.results.write(f"{obj['kind']}_sent", **fields)
            self._audit(entry, obj, "sent")
        self.outbox.mark(entry, obj, state, reason=result.reason, destination=self.where, **result.fields)

    def _expire(self, entry: Entry) -> bool:
        age = time.time() - entry.created
        if age <= self.max_age_s:
            return False
        kept = self.outbox.kept_path(entry, REFUSED if REFUSED in entry.done.values() else EXPIRED)
        reason = f"not delivered to {self.where} in {age / 3600:.1f} h"
        log.error("report for %s expired undelivered after %.1f h (kept in %s)", entry.source_uid, age / 3600, kept)
        for obj in entry.pending():
            self.results.write(f"{obj['kind']}_expired", entry=entry.name, sop_instance_uid=entry.source_uid,
                               **object_fields(obj), destination=self.where, attempts=entry.attempts,
                               age_h=round(age / 3600, 3), kept=str(kept))
            self._audit(entry, obj, "expired", reason)
            self.outbox.mark(entry, obj, EXPIRED, reason=reason)
        return True

    def _audit(self, entry: Entry, obj: dict, state: str, reason: str = ""):
        self.audit.report(destination=self.where, kind=obj["kind"], sop_instance_uid=obj["sop_instance_uid"],
                          study_instance_uid=entry.record.get("study_instance_uid", ""), state=state, reason=reason)

    def _note_retry(self, result: Outcome):
        self.retry_after_s = result.retry_after_s
        if self.failures == 0:  # one line per outage, not one per try
            log.warning("reports to %s wait (%d in the outbox): %s; retrying with back-off up to %g s", self.where,
                        self.outbox.backlog(), result.reason, self.backoff_max_s)
            self.results.write("send_waiting", destination=self.where, backlog=self.outbox.backlog(),
                               reason=result.reason)
        else:
            log.debug("reports to %s still wait: %s", self.where, result.reason)


def _what(obj: dict) -> str:
    return "report" if obj["kind"] == "sr" else "heatmap"


def _pause_for_tests(entry: Entry, obj: dict):
    """With XRAY_TEST_PAUSE_AFTER_SEND_S set (the fault-injection run, scripts/chaos_node.py), wait there: the
    object is in the archive and its line not yet written, the one moment a random SIGKILL cannot hit."""
    seconds = float(os.environ.get(PAUSE_ENV) or 0)
    if seconds > 0:
        log.warning("test pause after send: %s %s of %s answered, its line not yet written (%s)", entry.name,
                    obj["kind"], entry.source_uid, PAUSE_ENV)
        time.sleep(seconds)
