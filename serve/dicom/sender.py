"""Drains the outbox to --send-to, on its own thread: a slow or absent PACS never blocks receiving.

One loop whatever the wire: the transport (DIMSE C-STORE in dimse_client, DICOMweb STOW-RS in stow_client) says
what each try meant (transport.Outcome); this file owns the order, the back-off and the events. Results go
oldest first, in rounds (one association, for DIMSE). A failure that may pass (no connection, a timeout, out of
resources, HTTP 5xx / 429 / 401) ends the round and waits a back-off that doubles from 1 s up to
--send-backoff-max-s (longer if the archive said Retry-After, never past that maximum); the results stay in the
outbox, across restarts, until delivered or older than --send-max-age-h. Every result ends in exactly one terminal
line in results.jsonl:
- sr_sent: stored (DIMSE: 0x0000 or a warning 0xBxxx; DICOMweb: the SR stored, a `warning` naming what was not);
- sr_refused: the destination answered a permanent failure: kept in refused/ with the status;
- sr_expired: still undelivered after --send-max-age-h: kept in expired/.
and `send_waiting` says once per outage that reports wait, and why.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from .destination import DicomWebDestination
from .dimse_client import DimseTransport
from .outbox import Entry, Outbox
from .stow_client import StowTransport
from .transport import REFUSED, RETRY, Outcome

log = logging.getLogger("xray.serve.dicom")


def transport_for(destination, ae_title: str, credentials: Path | None = None, timeout_s: float = 30.0):
    """The transport --send-to names: STOW-RS for a DICOMweb URL, else C-STORE to AE@HOST:PORT."""
    if isinstance(destination, DicomWebDestination):
        return StowTransport(destination, credentials, timeout_s)
    return DimseTransport(destination, ae_title, timeout_s)


class Sender:
    def __init__(self, destination, outbox: Outbox, results, ae_title: str, backoff_max_s: float = 60.0,
                 max_age_s: float = 168 * 3600.0, backoff_base_s: float = 1.0, timeout_s: float = 30.0,
                 credentials: Path | None = None):
        self.transport = transport_for(destination, ae_title, credentials, timeout_s)
        self.outbox, self.results = outbox, results
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
                result = self.transport.send(entry)
                if result.kind == RETRY:
                    self._note_retry(result)
                    return False
                if result.kind == REFUSED:
                    self._refuse(entry, result)
                else:
                    self._delivered(entry, result)
            return True
        finally:
            self.transport.close()

    # ------------------------------------------------------------------ terminal events
    def _delivered(self, entry: Entry, result: Outcome):
        self.outbox.delivered(entry)
        if result.fields.get("warning"):
            log.warning("report for %s stored by %s with a remark: %s", entry.source_uid, self.where,
                        result.fields["warning"])
        self.results.write("sr_sent", sop_instance_uid=entry.source_uid, **entry.uids(), destination=self.where,
                           attempts=entry.attempts, **result.fields)

    def _refuse(self, entry: Entry, result: Outcome):
        kept = self.outbox.set_aside(entry, "refused", reason=result.reason, destination=self.where, **result.fields)
        log.error("report for %s refused by %s: %s (kept in %s)", entry.source_uid, self.where, result.reason, kept)
        self.results.write("sr_refused", sop_instance_uid=entry.source_uid, **entry.uids(), destination=self.where,
                           **result.fields, reason=result.reason, attempts=entry.attempts, kept=str(kept))

    def _expire(self, entry: Entry) -> bool:
        age = time.time() - entry.created
        if age <= self.max_age_s:
            return False
        kept = self.outbox.set_aside(entry, "expired", reason=f"not delivered to {self.where} in {age / 3600:.1f} h")
        log.error("report for %s expired undelivered after %.1f h (kept in %s)", entry.source_uid, age / 3600, kept)
        self.results.write("sr_expired", sop_instance_uid=entry.source_uid, **entry.uids(), destination=self.where,
                           attempts=entry.attempts, age_h=round(age / 3600, 3), kept=str(kept))
        return True

    def _note_retry(self, result: Outcome):
        self.retry_after_s = result.retry_after_s
        if self.failures == 0:  # one line per outage, not one per try
            log.warning("reports to %s wait (%d in the outbox): %s; retrying with back-off up to %g s", self.where,
                        self.outbox.backlog(), result.reason, self.backoff_max_s)
            self.results.write("send_waiting", destination=self.where, backlog=self.outbox.backlog(),
                               reason=result.reason)
        else:
            log.debug("reports to %s still wait: %s", self.where, result.reason)
