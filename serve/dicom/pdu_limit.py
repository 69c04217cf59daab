"""Refuse oversized PDUs from their 6-byte header, before their body is read.

pynetdicom reads a PDU's 32-bit length and then buffers the whole PDU before any event handler runs, so a peer
announcing a 4 GB P-DATA-TF (or A-ASSOCIATE-RQ) makes the node allocate it. The node advertises its maximum
PDU length; a P-DATA-TF longer than that, or an association request longer than a small cap, is a protocol
error: the association is aborted (A-ABORT, as for an unrecognised PDU) without reading the body.

This replaces one private method, `DULServiceProvider._read_pdu_data`: pyproject pins pynetdicom 3.x and
tests/test_dicom_limits.py checks the behaviour on the installed version.
"""
from __future__ import annotations

import logging
import struct

from pynetdicom.dul import DULServiceProvider

log = logging.getLogger("xray.serve.dicom")
ASSOCIATE_CAP = 64 * 1024  # A-ASSOCIATE-RQ/AC: a few contexts need a few kB; real ones stay well under this
PDATA_SLACK = 6  # a PDU's length counts the PDV items; the advertised maximum is the PDV payload
_original = DULServiceProvider._read_pdu_data
refused: list[str] = []  # reasons, newest last (read by the node's log and by tests); bounded below


def limit_for(dul, pdu_type: int) -> int | None:
    """The longest PDU of this type the local side accepts; None: no limit of ours."""
    if pdu_type in (0x01, 0x02):
        return ASSOCIATE_CAP
    if pdu_type == 0x04:
        assoc = dul.assoc
        local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
        maximum = local.maximum_length
        return maximum + PDATA_SLACK if maximum else None  # 0: unlimited, as the standard says
    return None


def _read_pdu_data_bounded(self) -> None:
    """As pynetdicom's, but the length is checked against limit_for() before the body is received."""
    sock = self.socket
    recv = sock.recv
    checked = {}

    def recv_checked(n: int):
        data = recv(n)
        if not checked and n == 6 and len(data) == 6:
            checked["head"] = True
            pdu_type, _, length = struct.unpack(">BBL", data)
            cap = limit_for(self, pdu_type)
            if cap is not None and length > cap:
                reason = (f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds this node's maximum of {cap}: "
                          "aborted without reading it")
                log.warning("%s (from %s)", reason, getattr(sock, "address", ""))
                refused.append(reason)
                del refused[:-100]
                return bytes([0xFF]) + data[1:]  # an unknown PDU type: pynetdicom aborts the association (Evt19)
        return data

    sock.recv = recv_checked
    try:
        _original(self)
    finally:
        del sock.recv  # back to the class's method


def install():
    """Idempotent: the node calls it before it starts listening."""
    DULServiceProvider._read_pdu_data = _read_pdu_data_bounded
