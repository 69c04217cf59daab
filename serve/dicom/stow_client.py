"""The DICOMweb transport of the Sender: a STOW-RS POST (PS3.18 10.5) of one result, the objects still to deliver
(the SR and its heatmap SC) as the parts of one multipart/related request, to ROOT/studies. Standard library only:
the edge install gains no dependency for it.

What an answer means for each object (the same terminal events as DIMSE, one per object):
- 200 (all stored), or the object in the ReferencedSOPSequence (0008,1199): sent (a WarningReason is named in a
  `warning`); in the FailedSOPSequence with FailureReason 0x0111 / 45070 ("already stored"): sent, with
  `already_stored`; with 0xA7xx (out of resources): retry; with any other reason: refused;
- 202, 400, 409, 413, 415, 422, other 4xx, and the object in neither sequence: refused, with the archive's
  FailureReason (0008,1197) codes or its message, shortened (Orthanc answers 400 yet stores the good parts:
  those are listed, so they count as sent);
- 5xx, 408, 429, 401 (the credentials file is read again on the next try), 403 and 404 (the URL or the
  permissions of the whole destination are wrong, not this report: fixing them delivers what waits), a
  redirect, no connection, a timeout: retry, honouring Retry-After.
"""
from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path

from .credentials import CredentialsError, authorization_header
from .destination import DicomWebDestination
from .outbox import Entry
from .transport import Outcome

CONNECT_TIMEOUT_S = 10.0  # like the DIMSE sender: an unreachable host must not hold the round for minutes
MAX_ANSWER_BYTES = 1 << 20  # a STOW answer is a few kB; an archive's error page is not read further
TRANSIENT = {401, 403, 404, 408, 429}  # and every 5xx and 3xx
REFERENCED, FAILED, SOP_CLASS, SOP_INSTANCE = "00081199", "00081198", "00081150", "00081155"
FAILURE_REASON, WARNING_REASON = "00081197", "00081196"
ALREADY_STORED = {0x0111, 45070}  # "duplicate SOP instance" (PS3.7), Azure's "already stored": it is there
FAILURE_NAMES = {0xA700: "out of resources", 0xA900: "data set does not match SOP class",
                 0xC000: "cannot understand", 0xC122: "transfer syntax not supported", 0x0110: "processing failure",
                 0x0111: "duplicate SOP instance", 0x0122: "SOP class not supported", 0x0124: "not authorized",
                 0xB000: "coercion of data elements", 0xB006: "elements discarded",
                 0xB007: "data set does not match SOP class"}


# ---------------------------------------------------------------------------------------------------- the request
def multipart_related(parts: list[bytes]) -> tuple[bytes, str]:
    """The body and Content-Type of a STOW-RS request: one `application/dicom` part per DICOM file (PS3.18 8.6.1),
    with a boundary found in none of them."""
    while True:
        boundary = f"xray-edge-{uuid.uuid4().hex}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in p for p in parts):
            break
    body = b"".join(marker + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + marker + b"--\r\n", f'multipart/related; type="application/dicom"; boundary={boundary}'


# ---------------------------------------------------------------------------------------------------- the answer
@dataclass
class StowAnswer:
    """What the archive's application/dicom+json answer says: stored UIDs (with a WarningReason or None), failed
    UIDs (with their FailureReason or None), and a short text of the body when it is not such a dataset."""

    stored: dict[str, int | None] = field(default_factory=dict)
    failed: dict[str, int | None] = field(default_factory=dict)
    text: str = ""


def parse_answer(body: bytes) -> StowAnswer:
    """The Store Instances Response (PS3.18 10.5.3) in DICOM JSON; anything else gives only a short text."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return StowAnswer(text=short_text(body))
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # some archives answer an array of one dataset
    if not isinstance(data, dict) or not (REFERENCED in data or FAILED in data):
        return StowAnswer(text=_message(data) or short_text(body))
    answer = StowAnswer()
    for tag, into, reason in ((REFERENCED, answer.stored, WARNING_REASON), (FAILED, answer.failed, FAILURE_REASON)):
        for item in _values(data.get(tag)):
            uid = _first(item, SOP_INSTANCE)
            if isinstance(uid, str) and uid:
                code = _first(item, reason)
                into[uid.strip()] = code if isinstance(code, int) else None
    return answer


def _values(element) -> list:
    value = element.get("Value") if isinstance(element, dict) else None
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _first(item: dict, tag: str):
    element = item.get(tag)
    value = element.get("Value") if isinstance(element, dict) else None
    return value[0] if isinstance(value, list) and value else None


def _message(data) -> str:
    """The message of a JSON error body (Google's {"error": {"message"}}, Orthanc's {"Message"}, ...)."""
    if isinstance(data, list) and data:
        data = data[0]
    if not isinstance(data, dict):
        return ""
    error = data.get("error")
    for value in (error.get("message") if isinstance(error, dict) else error, data.get("message"),
                  data.get("Message"), data.get("OrthancError"), data.get("detail")):
        if isinstance(value, str) and value.strip():
            return short_text(value.encode("utf-8"))
    return ""


def short_text(body: bytes, limit: int = 200) -> str:
    """One line of an archive's answer for a log line: tags dropped, blanks collapsed, cut at `limit`."""
    text = re.sub(r"<[^>]*>", " ", body[: 16 * limit].decode("utf-8", "replace"))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def retry_after_s(value: str | None) -> float | None:
    """Retry-After: delay-seconds or an HTTP-date (RFC 9110 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


# ---------------------------------------------------------------------------------------------------- the decision
def decide(http_status: int, answer: StowAnswer, objects: list[dict], where: str,
           retry_after: float | None = None) -> list[Outcome]:
    """What one STOW-RS answer means for each object of the request, in order (see the module's docstring)."""
    head = f"HTTP {http_status}{_phrase(http_status)} from {where}"
    if http_status in TRANSIENT or http_status >= 500 or 300 <= http_status < 400:
        why = {401: ": the credentials were not accepted (read again on the next try)",
               403: ": this destination refuses these credentials (check their permissions)",
               404: ": no DICOMweb service at this URL (check the root of --send-to)",
               }.get(http_status, ": redirected (give --send-to the final URL)" if http_status < 400 else "")
        retry = Outcome.retry(f"{head}{why}{_detail(answer, objects)}", retry_after, http_status=http_status)
        return [retry for _ in objects]
    all_stored = 200 <= http_status < 300 and http_status != 202  # 202: "some failed" (PS3.18 10.5.3.1)
    return [_one(http_status, head, answer, obj, objects, all_stored, retry_after) for obj in objects]


def _one(http_status: int, head: str, answer: StowAnswer, obj: dict, objects: list[dict], all_stored: bool,
         retry_after: float | None) -> Outcome:
    uid, name = obj["sop_instance_uid"], obj["file"]
    if uid in answer.failed:
        code = answer.failed[uid]
        if code in ALREADY_STORED:  # it is there (a resend after a crash, a re-pushed study): delivered
            return Outcome.sent(http_status=http_status, already_stored=True)
        reason = f"{head}: {name} failed ({_code(code)})"
        if code is not None and code >> 8 == 0xA7:
            return Outcome.retry(reason, retry_after, http_status=http_status)
        return Outcome.refused(reason, http_status=http_status)
    if uid in answer.stored:
        warned = answer.stored[uid]
        return Outcome.sent(http_status=http_status,
                            **({"warning": f"{head}: {name} stored with warning {_code(warned)}"} if warned else {}))
    if all_stored:
        return Outcome.sent(http_status=http_status)
    if http_status < 300:
        return Outcome.refused(f"{head}: {name} is not among the stored instances{_detail(answer, objects)}",
                               http_status=http_status)
    return Outcome.refused(f"{head}{_detail(answer, objects)}", http_status=http_status)


def _detail(answer: StowAnswer, objects: list[dict] | None = None) -> str:
    """The archive's reasons: FailureReason per object (our file's name where the UID is ours), else its text."""
    if answer.failed:
        names = {o["sop_instance_uid"]: o["file"] for o in objects or []}
        return ": " + ", ".join(f"{names.get(uid, uid)}: {_code(code)}" for uid, code in list(answer.failed.items())[:3])
    return f": {answer.text}" if answer.text else ""


def _code(code: int | None) -> str:
    if code is None:
        return "no FailureReason"
    name = FAILURE_NAMES.get(code) or FAILURE_NAMES.get(code & 0xFF00) or ""
    return f"0x{code:04X}" + (f" {name}" if name else "")


def _phrase(status: int) -> str:
    try:
        return " " + http.client.responses[status]
    except KeyError:
        return ""


# ---------------------------------------------------------------------------------------------------- the wire
class _ReadTimeout:
    """A connection whose socket waits `read_timeout` for each answer once connected (the connect has its own,
    shorter timeout: the request's)."""

    def __init__(self, *args, read_timeout: float, **kw):
        super().__init__(*args, **kw)
        self.read_timeout = read_timeout

    def connect(self):
        super().connect()
        self.sock.settimeout(self.read_timeout)


class _HTTPConnection(_ReadTimeout, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ReadTimeout, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self.read_timeout = read_timeout

    def http_open(self, req):
        return self.do_open(_HTTPConnection, req, read_timeout=self.read_timeout)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float, context=None):
        super().__init__(context=context)  # None: the default context, verified against the system's CAs
        self.read_timeout = read_timeout

    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context, read_timeout=self.read_timeout)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):
        return None  # a 3xx stays an answer: urllib would replay a redirected POST as a GET without the body


class StowTransport:
    """POST each result to the archive; a connection per request (a report every few minutes needs no pool).
    Proxies come from the environment (https_proxy, no_proxy), as for any urllib client."""

    def __init__(self, destination: DicomWebDestination, credentials: Path | None = None, timeout_s: float = 30.0,
                 tls=None):
        self.destination, self.where, self.credentials = destination, destination.where, credentials
        self.connect_timeout_s, self.read_timeout_s = min(timeout_s, CONNECT_TIMEOUT_S), timeout_s
        self.tls = tls  # dimse_client.SendTls (--send-tls-ca/-cert/-key), read for every request; None: the system's CAs
        self.opener = self._opener(None)

    def _opener(self, context):
        return urllib.request.build_opener(_HTTPHandler(self.read_timeout_s), _HTTPSHandler(self.read_timeout_s, context),
                                           _NoRedirect())

    def open_round(self) -> Outcome | None:
        return None

    def close(self):
        pass

    def send(self, entry: Entry, objects: list[dict]) -> list[tuple[dict, Outcome]]:
        """One request with the objects still to deliver; an outcome for each."""
        return list(zip(objects, self._post(entry, objects)))

    def _post(self, entry: Entry, objects: list[dict]) -> list[Outcome]:
        body, content_type = multipart_related([(entry.path / o["file"]).read_bytes() for o in objects])
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json", "User-Agent": "xray-edge"}
        if self.credentials is not None:
            try:
                headers["Authorization"] = authorization_header(self.credentials)
            except CredentialsError as e:
                return [Outcome.retry(str(e))] * len(objects)
        request = urllib.request.Request(self.destination.stow_url, data=body, headers=headers, method="POST")
        opener = self.opener
        if self.tls is not None:
            from xray.common.errors import XrayError
            from xray.serve.tls import client_context

            try:
                opener = self._opener(client_context(*self.tls, option="--send-tls"))
            except XrayError as e:
                return [Outcome.retry(f"TLS files: {e}")] * len(objects)
        try:
            with opener.open(request, timeout=self.connect_timeout_s) as response:
                status, raw, after = response.status, response.read(MAX_ANSWER_BYTES), None
        except urllib.error.HTTPError as e:  # an answer all the same: 3xx, 4xx, 5xx
            status, raw, after = e.code, _read(e), retry_after_s(e.headers.get("Retry-After"))
        except urllib.error.URLError as e:
            return [Outcome.retry(f"cannot reach {self.where}: {_reason(e.reason)}")] * len(objects)
        except (OSError, http.client.HTTPException) as e:  # a timeout or a dropped connection mid-answer
            return [Outcome.retry(f"no answer from {self.where}: {_reason(e)}")] * len(objects)
        return decide(status, parse_answer(raw), objects, self.where, after)


def _read(error: urllib.error.HTTPError) -> bytes:
    """The body of an error answer (empty when it cannot be read), and the connection closed."""
    try:
        return error.read(MAX_ANSWER_BYTES) if error.fp is not None else b""
    except (OSError, http.client.HTTPException):
        return b""
    finally:
        error.close()


def _reason(e) -> str:
    if isinstance(e, TimeoutError) or "timed out" in str(e):
        return "timed out"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
