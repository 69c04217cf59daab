"""--audit FILE: who connected, who was refused, which instance came in and which report went out, one JSON
line per event, in the vocabulary of the DICOM audit message (PS3.15 A.5, RFC 3881; codes from PS3.16 CID
400-405) flattened to JSON, so a log shipper can forward it and a SIEM can map it without a custom parser.

Every line is on disk before the call returns (one os.write, then fsync): the caller writes it before the answer
it records, so no answer goes out unaudited. An OSError (a full disk, a closed log) reaches the caller, which
decides: a receipt that cannot be audited is answered "out of resources". The file is 0600 and only appended
to; a line cut by a kill is ended on the next open, so it never glues onto the next event.

Nothing here holds pixel data or a secret: the helpers take identifiers and our own words, never a header value
(`auth` is the word "key", "certificate" or "none", never the key). AuditLog(None) is the disabled log: every
call is accepted and nothing is written, so callers need no `if`.
"""
from __future__ import annotations

import errno
import getpass
import ipaddress
import json
import logging
import os
import re
import socket
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path

from xray.common.errors import XrayError

log = logging.getLogger("xray.serve.audit")


def _code(code: str, display: str, system: str = "DCM") -> dict:
    return {"code": code, "codeSystemName": system, "displayName": display}


# EventID (CID 400)
APPLICATION_ACTIVITY = _code("110100", "Application Activity")
INSTANCES_TRANSFERRED = _code("110104", "DICOM Instances Transferred")
QUERY = _code("110112", "Query")
SECURITY_ALERT = _code("110113", "Security Alert")
USER_AUTHENTICATION = _code("110114", "User Authentication")
# EventTypeCode (CID 401)
APPLICATION_START = _code("110120", "Application Start")
APPLICATION_STOP = _code("110121", "Application Stop")
LOGIN = _code("110122", "Login")
NODE_AUTHENTICATION = _code("110126", "Node Authentication")
# RoleIDCode (CID 402)
APPLICATION = _code("110150", "Application")
APPLICATION_LAUNCHER = _code("110151", "Application Launcher")
DESTINATION_ROLE = _code("110152", "Destination Role ID")
SOURCE_ROLE = _code("110153", "Source Role ID")
# ParticipantObjectIDTypeCode (CID 404, RFC 3881)
STUDY_INSTANCE_UID = _code("110180", "Study Instance UID")
NODE_ID = _code("110182", "Node ID")
PATIENT_NUMBER = _code("2", "Patient Number", "RFC-3881")
URI = _code("12", "URI", "RFC-3881")
# RFC 3881 ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole
PERSON, SYSTEM_OBJECT = 1, 2
ROLE_PATIENT, ROLE_REPORT, ROLE_QUERY = 1, 3, 24
# EventOutcomeIndicator: success; minor failure (refused, the caller may try again or fix it); serious failure
# (given up, or our own fault); major failure (the application unusable: not written by these helpers)
OUTCOMES = (0, 4, 8, 12)
AUTH_WORDS = ("key", "certificate", "none")
REPORT_STATES = {"sent": 0, "refused": 4, "expired": 8}
REPORT_SOP_CLASSES = {"sr": "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR (dimse_client.py)
                      "sc": "1.2.840.10008.5.1.4.1.1.7"}  # Secondary Capture
_SECRET_NAME = re.compile(r"key|password|passwd|token|secret|credential", re.I)
_PATH_NAME = re.compile(r"(file|path|dir|folder)$", re.I)
_UID = re.compile(r"[0-9]+(\.[0-9]+)+")


def _one_line(text: str, limit: int = 1000) -> str:
    return " ".join(str(text).split())[:limit]


def _public(settings: dict) -> dict:
    """A safety net only (the caller passes no secrets): a value whose name says secret and not file is dropped
    to "(set)", so a key passed by mistake never lands in the trail; a path to a key file is kept."""
    out = {}
    for name, value in settings.items():
        if _SECRET_NAME.search(str(name)) and not _PATH_NAME.search(str(name)) and value not in (None, "", False):
            value = "(set)"
        out[str(name)] = value
    return out


def _address_type(address: str) -> int:
    """NetworkAccessPointTypeCode: 2 an IP address, 1 a machine name."""
    try:
        ipaddress.ip_address(address)
        return 2
    except ValueError:
        return 1


def _participant(user_id: str, *, requestor: bool, role: dict | None = None, address: str | None = None,
                 alternative: str | None = None) -> dict:
    p = {"UserID": user_id, "UserIsRequestor": requestor}
    if alternative:
        p["AlternativeUserID"] = alternative
    if role:
        p["RoleIDCode"] = role
    if address:
        p["NetworkAccessPointTypeCode"], p["NetworkAccessPointID"] = _address_type(address), address
    return p


def _details(**pairs) -> list[dict]:
    """ParticipantObjectDetail: RFC 3881's type-value pairs (plain values here, not base64 as in the XML)."""
    return [{"type": k, "value": v} for k, v in pairs.items() if v is not None]


def _study(study_uid: str | None, sop_class: str | None, instance_uid: str | None) -> dict:
    sop = {"UID": sop_class} if sop_class and _UID.fullmatch(sop_class) else {"Name": sop_class} if sop_class else {}
    sop["NumberOfInstances"] = 1
    if instance_uid:
        sop["Instance"] = [{"UID": instance_uid}]
    return {"ParticipantObjectID": study_uid or "unknown", "ParticipantObjectTypeCode": SYSTEM_OBJECT,
            "ParticipantObjectTypeCodeRole": ROLE_REPORT, "ParticipantObjectIDTypeCode": STUDY_INSTANCE_UID,
            "ParticipantObjectDescription": {"SOPClass": [sop]}}


def _patient(patient_id: str) -> dict:
    return {"ParticipantObjectID": patient_id, "ParticipantObjectTypeCode": PERSON,
            "ParticipantObjectTypeCodeRole": ROLE_PATIENT, "ParticipantObjectIDTypeCode": PATIENT_NUMBER}


class AuditLog:
    """The audit trail at `path` (None: disabled). `source_id` is the AuditSourceID and the UserID of this
    server in the events (default: the host name; the node passes its --ae-title)."""

    def __init__(self, path: str | Path | None, source_id: str | None = None):
        self.path = Path(path) if path is not None else None
        self.host = socket.gethostname()
        self.source_id = source_id or self.host
        self._lock = threading.Lock()
        self._cut = False  # the last write was short: the next line starts with "\n"
        self._fd = self._open() if self.path is not None else None

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise XrayError(f"--audit {self.path}: not a regular file")
            if st.st_mode & 0o077:
                raise XrayError(f"--audit {self.path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read the "
                                f"audit trail; chmod 600 it, or name a new file")
            if st.st_size and not self._ends_with_newline(st):  # a kill cut the last line: end it first
                os.write(fd, b"\n")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _ends_with_newline(self, st: os.stat_result) -> bool:
        """The write descriptor is write-only (never seeked): read the last byte through a second one."""
        try:
            rfd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            same = os.fstat(rfd)
            return (same.st_dev, same.st_ino) == (st.st_dev, st.st_ino) and os.pread(rfd, 1, st.st_size - 1) == b"\n"
        finally:
            os.close(rfd)

    def reopen(self):
        """SIGHUP: logrotate moved the file away; continue in a new one at the same path (0600). The old file keeps
        its lines; if the new one cannot be opened, the error is raised and the old one stays in use. Call it from
        a thread, not from a signal handler: it takes the writers' lock."""
        with self._lock:  # writers wait for one open(), a few microseconds
            if self._fd is None:  # closed: stays closed
                return
            new = self._open()
            old, self._fd, self._cut = self._fd, new, False
        os.close(old)
        log.info("audit log reopened: %s", self.path)

    def close(self):
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _emit(self, event: dict):
        """One line, one os.write, fsynced. Raises OSError (disk full, log closed): never dropped silently."""
        if self.path is None:
            return
        with self._lock:  # the time under the lock: the lines are in time order
            if self._fd is None:
                raise OSError(errno.EBADF, f"audit log {self.path} is closed")
            event = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **event,
                     "AuditSourceIdentification": {"AuditSourceID": self.source_id}}
            data = (json.dumps(event, default=str) + "\n").encode()
            if self._cut:
                data = b"\n" + data
            self._cut = True  # until the whole line is written
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"audit log {self.path}: {written} of {len(data)} bytes written")
            self._cut = False
            os.fsync(self._fd)

    @staticmethod
    def _event(event_id: dict, action: str, outcome: int, reason: str = "", type_code: dict | None = None) -> dict:
        if outcome not in OUTCOMES:
            raise ValueError(f"EventOutcomeIndicator {outcome!r}: one of {OUTCOMES}")
        event = {"EventID": event_id, "EventActionCode": action, "EventOutcomeIndicator": outcome}
        if reason and outcome:
            event["EventOutcomeDescription"] = _one_line(reason)
        if type_code:
            event["EventTypeCode"] = type_code
        return event

    def _us(self, *, requestor: bool = False, role: dict | None = None, ae: str | None = None) -> dict:
        return _participant(ae or self.source_id, requestor=requestor, role=role, address=self.host)

    # ------------------------------------------------------------------ the events
    def started(self, *, settings: dict):
        """110100 Application Activity / 110120 Application Start, with the effective settings. The caller passes
        only non-secret values (paths to key files, not keys); names that say key/password/token/credential and
        not file/path are written as "(set)" all the same."""
        event = self._event(APPLICATION_ACTIVITY, "E", 0, type_code=APPLICATION_START)
        event["ActiveParticipant"] = [self._us(role=APPLICATION),
                                      _participant(_os_user(), requestor=True, role=APPLICATION_LAUNCHER)]
        event["settings"] = _public(settings)
        self._emit(event)

    def stopped(self, *, reason: str):
        """110100 Application Activity / 110121 Application Stop; why (e.g. "SIGTERM") in the description."""
        event = self._event(APPLICATION_ACTIVITY, "E", 0, type_code=APPLICATION_STOP)
        if reason:
            event["EventOutcomeDescription"] = _one_line(reason)
        event["ActiveParticipant"] = [self._us(role=APPLICATION)]
        self._emit(event)

    def association(self, *, peer: str, calling_ae: str, called_ae: str, tls_subject: str | None, accepted: bool,
                    reason: str = ""):
        """110114 User Authentication / 110122 Login: a DICOM association accepted (0) or refused (4). The peer's
        UserID is its calling AE title (what the node's logs name it by); AlternativeUserID is how it proved it:
        its verified certificate's subject, or "plain" (no client certificate)."""
        event = self._event(USER_AUTHENTICATION, "E", 0 if accepted else 4, reason or "refused", LOGIN)
        event["ActiveParticipant"] = [
            _participant(calling_ae or peer, requestor=True, address=peer, alternative=tls_subject or "plain"),
            self._us(ae=called_ae)]
        self._emit(event)

    def tls_failed(self, *, peer: str, port_kind: str, reason: str):
        """110113 Security Alert / 110126 Node Authentication, outcome 4: a TLS handshake that failed (no or a bad
        certificate, unknown CA, expired, old protocol, not TLS, timeout). The alert subject is the peer's node
        (110182 Node ID); `port_kind` ("dicom", "https") says where it knocked."""
        event = self._event(SECURITY_ALERT, "E", 4, reason or "TLS handshake failed", NODE_AUTHENTICATION)
        event["ActiveParticipant"] = [_participant(peer, requestor=True, address=peer), self._us()]
        event["ParticipantObjectIdentification"] = [
            {"ParticipantObjectID": peer, "ParticipantObjectTypeCode": SYSTEM_OBJECT,
             "ParticipantObjectIDTypeCode": NODE_ID, "ParticipantObjectDetail": _details(port=port_kind)}]
        self._emit(event)

    def instance_received(self, *, peer: str, calling_ae: str, sop_instance_uid: str, sop_class: str | None,
                          study_instance_uid: str | None, patient_id: str | None, outcome: int, reason: str = ""):
        """110104 DICOM Instances Transferred, EventActionCode C (the receiver did not hold it): the peer is the
        Source (110153), this node the Destination (110152). The study (110180) carries the SOP class and instance;
        the patient (RFC 3881 "2" Patient Number) as given (--log-patient-id applied by the caller; None: left out).
        outcome: 0 stored, 4 refused or deferred (the sender may try again), 8 failed."""
        event = self._event(INSTANCES_TRANSFERRED, "C", outcome, reason)
        event["ActiveParticipant"] = [
            _participant(calling_ae or peer, requestor=True, role=SOURCE_ROLE, address=peer),
            self._us(role=DESTINATION_ROLE)]
        objects = [_study(study_instance_uid, sop_class, sop_instance_uid)]
        if patient_id:
            objects.append(_patient(patient_id))
        event["ParticipantObjectIdentification"] = objects
        self._emit(event)

    def report(self, *, destination: str, kind: str, sop_instance_uid: str, study_instance_uid: str | None,
               state: str, reason: str = ""):
        """110104 DICOM Instances Transferred, EventActionCode R (PS3.15: R when the audit source is not the
        receiver): a report (kind "sr" or "sc") this node sent. Outcome: sent 0; refused 4 (the destination
        answered no: that one object set aside in refused/, a person can fix and resend it); expired 8 (nobody
        took it within --send-max-age-h: the path to the destination failed)."""
        if state not in REPORT_STATES:
            raise ValueError(f"report state {state!r}: one of {', '.join(REPORT_STATES)}")
        event = self._event(INSTANCES_TRANSFERRED, "R", REPORT_STATES[state], reason or state)
        event["ActiveParticipant"] = [self._us(requestor=True, role=SOURCE_ROLE),
                                      _participant(destination, requestor=False, role=DESTINATION_ROLE)]
        event["ParticipantObjectIdentification"] = [
            _study(study_instance_uid, REPORT_SOP_CLASSES.get(kind, kind), sop_instance_uid)]
        self._emit(event)

    def http_request(self, *, client: str, method: str, path: str, status: int, auth: str, tls_subject: str | None,
                     images: int | None):
        """One HTTP request to /v1/predict or /dicomweb/...: the client is the Source (110153), this server the
        Destination (110152); the object is the path (RFC 3881 "12" URI) with method, status, auth, images.

        A POST under /dicomweb/ (STOW-RS) is 110104 DICOM Instances Transferred, action C: instances come in,
        as over DIMSE. Anything else (/v1/predict) is 110112 Query, action E, object role 24 Query: the client
        asks a question about an image it holds and takes the answer away, and nothing is kept; 110106 Export
        would say our data left our control, and 110107 Import or 110104 that we now hold the image, neither true.
        Outcome: 0 below 400, 4 for 4xx (refused: the client's to fix), 8 for 5xx (our failure)."""
        if auth not in AUTH_WORDS:
            raise ValueError(f"auth {auth!r}: one of {', '.join(AUTH_WORDS)} (never the credential itself)")
        outcome = 0 if status < 400 else 4 if status < 500 else 8
        stow = method.upper() == "POST" and path.startswith("/dicomweb/")
        event = self._event(INSTANCES_TRANSFERRED if stow else QUERY, "C" if stow else "E", outcome, f"HTTP {status}")
        event["ActiveParticipant"] = [
            _participant(client, requestor=True, role=SOURCE_ROLE, address=client, alternative=tls_subject),
            self._us(role=DESTINATION_ROLE)]
        event["ParticipantObjectIdentification"] = [
            {"ParticipantObjectID": path, "ParticipantObjectTypeCode": SYSTEM_OBJECT,
             "ParticipantObjectTypeCodeRole": ROLE_REPORT if stow else ROLE_QUERY, "ParticipantObjectIDTypeCode": URI,
             "ParticipantObjectDetail": _details(method=method.upper(), status=status, auth=auth, images=images)}]
        self._emit(event)

    def auth_failed(self, *, client: str, what: str, reason: str, tls_subject: str | None = None):
        """110114 User Authentication / 110122 Login, outcome 4: a missing or wrong API key, a missing or refused
        client certificate, a refused AE title. `what` names the credential ("api-key", "client-certificate",
        "ae-title"), `reason` is our words: neither is ever the credential presented."""
        event = self._event(USER_AUTHENTICATION, "E", 4, f"{what}: {reason}", LOGIN)
        event["ActiveParticipant"] = [_participant(client, requestor=True, address=client, alternative=tls_subject),
                                      self._us()]
        self._emit(event)


def _os_user() -> str:
    """Who started the server (the Application Launcher)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
