"""The DIMSE transport of the Sender: one association per round, a C-STORE per object (the SR, then its heatmap SC).

C-STORE statuses (PS3.4 Annex B, PS3.7 C): 0x0000 or a warning 0xBxxx (stored with a remark) is sent, and so is
0x0111 "duplicate SOP instance" (the archive has this very object: a resend after a crash, a re-pushed study);
0xA7xx out of resources, no answer, an abort or a timeout may pass (retry); anything else (0xA9xx data set does
not match the SOP class, 0xCxxx cannot understand, 0x0122 SOP class not supported, ...) is refused.
"""
from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from .destination import Destination
from .outbox import Entry
from .transport import REFUSED, RETRY, SENT, Outcome

DUPLICATE = 0x0111


def outcome(status: int | None) -> str:
    """What a C-STORE status means for the object."""
    if status is None:
        return RETRY  # no answer: timeout, abort, connection lost
    if status in (0x0000, DUPLICATE) or (status >> 12) == 0xB:
        return SENT  # success, stored with a warning, or already there
    if (status >> 8) == 0xA7:
        return RETRY  # out of resources: try again later
    return REFUSED


class DimseTransport:
    def __init__(self, destination: Destination, ae_title: str, timeout_s: float = 30.0):
        self.destination, self.where = destination, destination.where
        self.ae = AE(ae_title=ae_title)
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # bounded waits: an unreachable host must not hold the sender for the OS connect timeout (minutes)
        self.ae.connection_timeout = min(timeout_s, 10.0)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout_s
        self.assoc = None

    def open_round(self) -> Outcome | None:
        d = self.destination
        self.assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not self.assoc.is_established:
            return Outcome.retry(f"no association with {self.where} (refused, unreachable or timed out)")
        return None

    def send(self, entry: Entry, objects: list[dict]) -> list[tuple[dict, Outcome]]:
        """A C-STORE per object, in order; stops after one that must be retried (the association may be gone)."""
        done = []
        for obj, ds in zip(objects, entry.datasets(objects)):
            result = self._store(ds)
            done.append((obj, result))
            if result.kind == RETRY:
                break
        return done

    def _store(self, ds) -> Outcome:
        name = ds.SOPClassUID.name
        try:
            status = getattr(self.assoc.send_c_store(ds), "Status", None)
        except ValueError as e:  # the PACS accepted no presentation context for this SOP class
            return Outcome.refused(f"{self.where} does not accept {name}: {e}", status=None)
        kind = outcome(status)
        if status is None and self.assoc.is_established:
            self.assoc.abort()  # the peer is gone or silent: a release would wait the ACSE timeout for nothing
        if kind == RETRY:
            return Outcome.retry(f"C-STORE of {name}: {'no answer' if status is None else f'status 0x{status:04X}'}")
        if kind == REFUSED:
            return Outcome.refused(f"C-STORE of {name} refused with status 0x{status:04X}", status=f"0x{status:04X}")
        return Outcome.sent(status=f"0x{status:04X}", **({"already_stored": True} if status == DUPLICATE else {}))

    def close(self):
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None
