"""The DIMSE transport of the Sender: one association per round, a C-STORE per object (the SR, then its heatmap SC).

C-STORE statuses (PS3.4 Annex B, PS3.7 C): 0x0000 or a warning 0xBxxx (stored with a remark) is sent, and so is
0x0111 "duplicate SOP instance" (the archive has this very object: a resend after a crash, a re-pushed study);
0xA7xx out of resources, no answer, an abort or a timeout may pass (retry); anything else (0xA9xx data set does
not match the SOP class, 0xCxxx cannot understand, 0x0122 SOP class not supported, ...) is refused.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from .destination import Destination
from .outbox import Entry
from .transport import REFUSED, RETRY, SENT, Outcome

DUPLICATE = 0x0111


class SendTls(NamedTuple):
    """--send-tls-ca/-cert/-key: read again for every round (a renewed certificate needs no restart)."""

    ca: Path | None
    cert: Path | None
    key: Path | None


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
    def __init__(self, destination: Destination, ae_title: str, timeout_s: float = 30.0, tls: SendTls | None = None):
        self.destination, self.tls = destination, tls
        self.where = destination.where + (" (TLS)" if tls else "")
        self.ae = AE(ae_title=ae_title)
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # bounded waits: an unreachable host must not hold the sender for the OS connect timeout (minutes)
        self.ae.connection_timeout = min(timeout_s, 10.0)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout_s
        self.assoc = None

    def open_round(self) -> Outcome | None:
        d = self.destination
        tls_args = None
        if self.tls is not None:
            from xray.common.errors import XrayError
            from xray.serve.tls import client_context

            try:  # verified, with the host name or IP checked: never a fall back to plain
                tls_args = (client_context(*self.tls, option="--send-tls"), d.host)
            except XrayError as e:
                return Outcome.retry(f"TLS files: {e}")
        with connect_errors() as errors:
            self.assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title, tls_args=tls_args)
        if not self.assoc.is_established:
            why = f": {errors[-1]}" if errors else " (refused, unreachable or timed out)"
            return Outcome.retry(f"no association with {self.where}{why}")
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


class _ConnectErrors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("TCP Initialisation Error:"):
            self.errors.append(_tls_words(message.partition(":")[2].strip()))


@contextmanager
def connect_errors():
    """Why pynetdicom could not connect (a refused certificate, a reset): it only logs that, on its DUL thread.
    The sender is this process's only association requestor, so the lines logged while it associates are its own."""
    handler = _ConnectErrors()
    logger = logging.getLogger("pynetdicom.transport")
    logger.addHandler(handler)
    try:
        yield handler.errors
    finally:
        logger.removeHandler(handler)


def _tls_words(message: str) -> str:
    """'[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ... (_ssl.c:1000)' -> a line that says what."""
    if "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message:
        detail = message.split("certificate verify failed:", 1)[-1].split("(_ssl.c", 1)[0].strip(" :")
        return f"TLS: the destination's certificate was refused ({detail}): check --send-tls-ca and the host name"
    if message.startswith("[SSL") or "SSL" in message.split(" ", 1)[0]:
        return f"TLS: {message.split('(_ssl.c', 1)[0].strip()}"
    return message
