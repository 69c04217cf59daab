"""Drains the outbox to --send-to, on its own thread: a slow or absent PACS never blocks receiving.

Results go oldest first, over one association per round. A failure that may pass (no association, a timeout,
an abort, 0xA7xx out of resources) ends the round and waits a back-off that doubles from 1 s up to
--send-backoff-max-s; the results stay in the outbox, across restarts, until delivered or older than
--send-max-age-h. Every result ends in exactly one terminal line in results.jsonl:
- sr_sent: stored (0x0000, or a warning 0xB000 / 0xB006 / 0xB007: stored with a remark);
- sr_refused: the PACS answered a permanent failure (0xA9xx, 0xCxxx, ...): kept in refused/ with the status;
- sr_expired: still undelivered after --send-max-age-h: kept in expired/.
"""
from __future__ import annotations

import logging
import threading
import time

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from .outbox import Entry, Outbox

log = logging.getLogger("xray.serve.dicom")
SENT, RETRY, REFUSED = "sent", "retry", "refused"


def outcome(status: int | None) -> str:
    """What a C-STORE status means for the result (PS3.4 Annex B, PS3.7 C)."""
    if status is None:
        return RETRY  # no answer: timeout, abort, connection lost
    if status == 0x0000 or (status >> 12) == 0xB:
        return SENT  # success, or stored with a warning
    if (status >> 8) == 0xA7:
        return RETRY  # out of resources: try again later
    return REFUSED  # 0xA9xx data set does not match the SOP class, 0xCxxx cannot understand, 0x0122, ...


class Sender:
    def __init__(self, destination, outbox: Outbox, results, ae_title: str, backoff_max_s: float = 60.0,
                 max_age_s: float = 168 * 3600.0, backoff_base_s: float = 1.0, timeout_s: float = 30.0):
        self.destination, self.outbox, self.results = destination, outbox, results
        self.backoff_max_s, self.max_age_s, self.backoff_base_s = backoff_max_s, max_age_s, backoff_base_s
        self.failures = 0  # consecutive failed rounds: the back-off's exponent
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="xray-sr-sender", daemon=True)
        self.ae = AE(ae_title=ae_title)
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # bounded waits: an unreachable host must not hold the sender for the OS connect timeout (minutes)
        self.ae.connection_timeout = min(timeout_s, 10.0)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout_s

    @property
    def where(self) -> str:
        d = self.destination
        return f"{d.ae_title}@{d.host}:{d.port}"

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
        return min(self.backoff_base_s * 2 ** max(self.failures - 1, 0), self.backoff_max_s)

    # ------------------------------------------------------------------ the loop
    def _loop(self):
        while not self._stop.is_set():
            self._wake.clear()
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
        assoc = self.ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        if not assoc.is_established:
            entries[0].attempts += 1
            self._note_retry(f"no association with {self.where} (refused, unreachable or timed out)")
            return False
        try:
            for entry in entries:
                if self._stop.is_set():
                    return True
                if not self._send(assoc, entry):
                    return False
            return True
        finally:
            if assoc.is_established:
                assoc.release()

    def _send(self, assoc, entry: Entry) -> bool:
        entry.attempts += 1
        statuses = []
        for ds in entry.datasets():
            try:
                status = getattr(assoc.send_c_store(ds), "Status", None)
            except ValueError as e:  # the PACS accepted no presentation context for this SOP class
                return self._refuse(entry, None, f"{self.where} does not accept {ds.SOPClassUID.name}: {e}")
            kind = outcome(status)
            if kind == RETRY:
                self._note_retry(f"C-STORE of {ds.SOPClassUID.name}: "
                                        f"{'no answer' if status is None else f'status 0x{status:04X}'}")
                return False
            if kind == REFUSED:
                return self._refuse(entry, status, f"C-STORE of {ds.SOPClassUID.name} refused with status "
                                                   f"0x{status:04X}")
            statuses.append(f"0x{status:04X}")
        self.outbox.delivered(entry)
        self.results.write("sr_sent", sop_instance_uid=entry.source_uid, **entry.uids(), destination=self.where,
                           attempts=entry.attempts, statuses=statuses)
        return True

    def _refuse(self, entry: Entry, status, reason: str) -> bool:
        kept = self.outbox.set_aside(entry, "refused", status=status, reason=reason, destination=self.where)
        log.error("report for %s refused by %s: %s (kept in %s)", entry.source_uid, self.where, reason, kept)
        self.results.write("sr_refused", sop_instance_uid=entry.source_uid, **entry.uids(), destination=self.where,
                           status=None if status is None else f"0x{status:04X}", reason=reason,
                           attempts=entry.attempts, kept=str(kept))
        return True  # the next result may be fine

    def _expire(self, entry: Entry) -> bool:
        age = time.time() - entry.created
        if age <= self.max_age_s:
            return False
        kept = self.outbox.set_aside(entry, "expired", reason=f"not delivered to {self.where} in {age / 3600:.1f} h")
        log.error("report for %s expired undelivered after %.1f h (kept in %s)", entry.source_uid, age / 3600, kept)
        self.results.write("sr_expired", sop_instance_uid=entry.source_uid, **entry.uids(), destination=self.where,
                           attempts=entry.attempts, age_h=round(age / 3600, 3), kept=str(kept))
        return True

    def _note_retry(self, reason: str):
        if self.failures == 0:  # one line per outage, not one per try
            log.warning("reports to %s wait (%d in the outbox): %s; retrying with back-off up to %g s", self.where,
                        self.outbox.backlog(), reason, self.backoff_max_s)
            self.results.write("send_waiting", destination=self.where, backlog=self.outbox.backlog(), reason=reason)
