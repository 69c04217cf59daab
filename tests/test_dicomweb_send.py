"""Reports by DICOMweb STOW-RS (issue #21, item 2): --send-to dicomweb+http[s]://HOST/ROOT and --send-credentials.

The parts on their own: parsing the destination, the credentials file, the multipart body (read back with the
standard library's MIME parser), the archive's answer, what each answer means, Retry-After. Then xray-serve's
node against a real Orthanc with its DICOMweb plugin (the report and the heatmap found by QIDO-RS in the source's
study; the archive down, up, killed, up again: each report delivered once), and against a scripted HTTP archive
for what Orthanc will not do on demand (401 then a renewed token, 409 / 400 refusals, 503 with Retry-After,
202 with the heatmap refused). Everything on 127.0.0.1, started by the tests."""
from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import run_command
from peers import (OrthancDicomWeb, ScriptedStow, events, free_port, multipart_parts, part_uids, results, storescu,
                   stow_answer, wait_until)
from pynetdicom.sop_class import (ComprehensiveSRStorage, DigitalXRayImageStorageForPresentation,
                                  SecondaryCaptureImageStorage)
from serving import SERVE, Server
from test_dicom_node import node_port, store, write_dicom
from test_infer import radiograph

from xray.common.errors import XrayError
from xray.serve.dicom.credentials import CredentialsError, authorization_header
from xray.serve.dicom.destination import Destination, DicomWebDestination, parse_destination
from xray.serve.dicom.options import node_settings_from
from xray.serve.dicom.outbox import Entry
from xray.serve.dicom.stow_client import (StowTransport, decide, multipart_related, parse_answer, retry_after_s,
                                          short_text)
from xray.serve.dicom.transport import REFUSED, RETRY, SENT

TERMINAL = ("sr_sent", "sr_refused", "sr_expired")
NO_PROXY = {"no_proxy": "*", "NO_PROXY": "*"}  # whatever the environment says, loopback is never proxied


def _uid(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


def _terminal(out: Path, source_uid: str) -> list[dict]:
    return [r for r in events(out, *TERMINAL) if r.get("sop_instance_uid") == source_uid]


def _dx(folder: Path, name: str, seed: int, size: int = 256) -> Path:
    return write_dicom(folder / f"{name}.dcm", radiograph(size, seed=seed), DigitalXRayImageStorageForPresentation, 12,
                       patient=name.upper(), BodyPartExamined="CHEST")


@pytest.fixture
def entry(tmp_path) -> Entry:
    """An outbox entry of two small real DICOM files (the transport sends bytes; what they hold is not its business)."""
    folder = tmp_path / "outbox" / "0000000000001-abcdef01"
    folder.mkdir(parents=True)
    objects = []
    for i, name in enumerate(("sr.dcm", "object1.dcm")):
        path = write_dicom(folder / name, radiograph(32, seed=i), SecondaryCaptureImageStorage, 8)
        objects.append({"file": name, "kind": "sr" if i == 0 else "sc", "sop_instance_uid": _uid(path),
                        "sop_class": SecondaryCaptureImageStorage})
    return Entry(folder, time.time(), "1.2.3.4", objects)


# ---------------------------------------------------------------------------------------------------- --send-to
@pytest.mark.parametrize("text, stow", [
    ("dicomweb+http://127.0.0.1:8042/dicom-web", "http://127.0.0.1:8042/dicom-web/studies"),
    ("dicomweb+http://127.0.0.1:8042/dicom-web/", "http://127.0.0.1:8042/dicom-web/studies"),
    ("dicomweb+http://127.0.0.1:8042/dicom-web//", "http://127.0.0.1:8042/dicom-web/studies"),
    ("dicomweb+http://archive:8042", "http://archive:8042/studies"),
    ("dicomweb+http://archive/", "http://archive/studies"),
    ("DICOMweb+HTTPS://pacs.example.org/wado", "https://pacs.example.org/wado/studies"),
    ("dicomweb+http://[::1]:8042/dicom-web", "http://[::1]:8042/dicom-web/studies"),
    ("dicomweb+https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb",
     "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb/studies"),
])
def test_a_dicomweb_url_gives_its_stow_endpoint(text, stow):
    destination = parse_destination(text)
    assert isinstance(destination, DicomWebDestination) and destination.stow_url == stow
    assert destination.where == text


def test_ae_at_host_port_is_still_dimse():
    assert parse_destination("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    assert parse_destination("PACS@10.0.0.5:104").where == "PACS@10.0.0.5:104"


@pytest.mark.parametrize("text, words", [
    ("dicomweb+ftp://archive/dicom-web", "starts with dicomweb+http:// or dicomweb+https://"),
    ("http://archive:8042/dicom-web", "starts with dicomweb+http://"),
    ("dicomweb+http://:8042/dicom-web", "expected dicomweb+https://HOST[:PORT]"),
    ("dicomweb+http://archive:99999/dicom-web", "port 1-65535"),
    ("dicomweb+http://archive:0/dicom-web", "port 1-65535"),
    ("dicomweb+http://archive:port/dicom-web", "port 1-65535"),
    ("dicomweb+http://archive/dicom web", "no spaces"),
    ("dicomweb+http://archive/dicom-web?x=1", "no ?query"),
    ("dicomweb+https://edge:s3cret@archive/dicom-web", "no credentials in the URL"),
    ("PACS-host-104", "expected AE_TITLE@HOST:PORT"),
])
def test_a_malformed_destination_is_one_clear_line(text, words):
    with pytest.raises(ValueError) as raised:
        parse_destination(text)
    message = str(raised.value)
    assert words in message and "\n" not in message, message
    assert "s3cret" not in message  # a password in the URL is not echoed back


def _settings(**kw):
    args = {"host": "127.0.0.1", "dicom_port": 0, "dicomweb": False, "ae_title": "XRAY_EDGE", "allow_ae": (), "results_dir": "r",
            "send_to": None, "send_credentials": None, "send_heatmap": False, "send_backoff_max_s": 60.0,
            "send_max_age_h": 168.0, "accept_any_called_ae": False, "log_patient_id": "keep", "patient_id_key": None,
            "max_instance_mb": 64.0, "max_associations": 8, "max_pdu_kb": 64}
    return node_settings_from(**{**args, **kw})


def test_send_options_make_the_settings_or_one_line_errors(tmp_path):
    token = tmp_path / "token"
    token.write_text("Bearer abc.def-ghi\n")
    settings = _settings(send_to="dicomweb+https://archive/dicom-web", send_credentials=str(token))
    assert settings.send_to.stow_url == "https://archive/dicom-web/studies" and settings.send_credentials == token
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for kw, words in (({"send_to": "PACS@h:104", "send_credentials": str(token)}, "for a DICOMweb destination"),
                      ({"send_credentials": str(token)}, "for a DICOMweb destination"),
                      ({"send_to": "dicomweb+https://a/r", "send_credentials": str(tmp_path / "nope")},
                       "No such file"),
                      ({"send_to": "dicomweb+https://a/r", "send_credentials": str(empty)}, "the file is empty"),
                      ({"dicom_port": None, "send_credentials": str(token)}, "add --dicom-port"),
                      ({"send_to": "dicomweb+https://a/r?q"}, "--send-to")):
        with pytest.raises(XrayError) as raised:
            _settings(**kw)
        assert words in str(raised.value) and "\n" not in str(raised.value), (kw, str(raised.value))


@pytest.mark.slow
def test_bad_dicomweb_options_exit_2_with_one_line(tiny_onnx, tmp_path):
    token = tmp_path / "token"
    token.write_text("Bearer t0ken\n")
    for args, words in ((["--send-to", "dicomweb+http://archive:notaport/dicom-web"], "port 1-65535"),
                        (["--send-to", "PACS@127.0.0.1:104", "--send-credentials", token], "DICOMweb destination"),
                        (["--send-to", "dicomweb+http://127.0.0.1:9/r", "--send-credentials", tmp_path / "none"],
                         "--send-credentials")):
        proc = run_command([*SERVE, "--model", tiny_onnx[0], "--dicom-port", 0, "--results", tmp_path / "r", *args],
                           check=False, timeout=90)
        errors = [line for line in proc.stderr.splitlines() if words in line]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------------- credentials
def test_credentials_file_gives_the_authorization_header(tmp_path):
    path = tmp_path / "credentials"
    path.write_text("Bearer ya29.a0-Token_x\nsecond line ignored\n")
    assert authorization_header(path) == "Bearer ya29.a0-Token_x"
    path.write_text("\ufeffbearer   spaced\r\n", encoding="utf-8")  # a BOM, CRLF, any case, extra blanks
    assert authorization_header(path) == "Bearer spaced"
    path.write_text("edge:pa ss:wörd\n", encoding="utf-8")  # the password may hold colons, blanks and non-ASCII
    header = authorization_header(path)
    assert header.startswith("Basic ") and base64.b64decode(header[6:]).decode() == "edge:pa ss:wörd"
    for content, words in (("", "empty"), ("  \n", "empty"), ("just-a-token\n", "expected 'Bearer TOKEN'"),
                           ("Bearer\n", "followed by one token"), ("Bearer two words\n", "followed by one token"),
                           (":password\n", "expected 'Bearer TOKEN'")):
        path.write_text(content)
        with pytest.raises(CredentialsError, match=words) as raised:
            authorization_header(path)
        assert "password" not in str(raised.value).replace("user:password", "")  # the content is never echoed
    with pytest.raises(CredentialsError, match="No such file"):
        authorization_header(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------- the request
def test_multipart_body_reads_back_with_the_stdlib_mime_parser(entry):
    files = [(entry.path / o["file"]).read_bytes() for o in entry.objects]
    body, content_type = multipart_related(files)
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    import email
    import email.policy

    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body,
                                       policy=email.policy.HTTP)
    assert message.get_content_type() == "multipart/related" and message.get_param("type") == "application/dicom"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["application/dicom"] * 2
    assert [p.get_payload(decode=True) for p in parts] == files  # byte for byte: binary parts survive
    assert [str(pydicom.dcmread(io.BytesIO(p.get_payload(decode=True))).SOPInstanceUID) for p in parts] == \
        [o["sop_instance_uid"] for o in entry.objects]
    assert body.endswith(f"--{message.get_boundary()}--\r\n".encode())


def test_the_boundary_is_in_none_of_the_parts(monkeypatch):
    import uuid

    taken, fresh = uuid.UUID(int=1), uuid.UUID(int=2)
    ids = iter([taken, fresh])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(ids))
    part = b"DICM...--xray-edge-" + taken.hex.encode() + b"...pixels"
    body, content_type = multipart_related([part])
    assert content_type.endswith(f"boundary=xray-edge-{fresh.hex}")
    assert multipart_parts({"headers": {"content-type": content_type}, "body": body}) == [part]


# ---------------------------------------------------------------------------------------------------- the answer
ORTHANC_200 = b"""{"00080005": {"Value": ["ISO_IR 100"], "vr": "CS"},
 "00081190": {"Value": ["http://127.0.0.1:8042/dicom-web/studies/1.2"], "vr": "UR"},
 "00081198": {"vr": "SQ"},
 "00081199": {"Value": [{"00081150": {"Value": ["1.2.840.10008.5.1.4.1.1.88.33"], "vr": "UI"},
                         "00081155": {"Value": ["1.2.3.10"], "vr": "UI"},
                         "00081190": {"Value": ["http://127.0.0.1:8042/dicom-web/studies/1.2/series/1.3/instances/1.2.3.10"],
                                      "vr": "UR"}}], "vr": "SQ"}}"""  # what Orthanc 1.10's DICOMweb plugin answers


def test_store_instances_responses_parse():
    answer = parse_answer(ORTHANC_200)
    assert answer.stored == {"1.2.3.10": None} and answer.failed == {} and answer.text == ""
    _, _, body = stow_answer(["1.2.3.10"], {"1.2.3.11": 0xA900})
    answer = parse_answer(body)
    assert answer.stored == {"1.2.3.10": None} and answer.failed == {"1.2.3.11": 0xA900}
    listed = json.dumps([{"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["9.8"]},
                                                              "00081196": {"vr": "US", "Value": [0xB000]}}]}}])
    assert parse_answer(listed.encode()).stored == {"9.8": 0xB000}  # an array of one dataset; a WarningReason
    google = b'{"error": {"code": 400, "message": "invalid DICOM: missing StudyInstanceUID", "status": "INVALID"}}'
    assert parse_answer(google).text == "invalid DICOM: missing StudyInstanceUID"
    html = b"<html><head><title>409</title></head><body><h1>Conflict</h1>\n\n<p>Study UID mismatch</p></body></html>"
    assert parse_answer(html).text == "409 Conflict Study UID mismatch"
    assert parse_answer(b"").text == "" and parse_answer(b"\xff\xfe junk").stored == {}
    assert len(short_text(b"x" * 5000)) == 200


def test_retry_after_seconds_or_http_date():
    assert retry_after_s("7") == 7.0 and retry_after_s(" 0 ") == 0.0
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after_s(later) <= 31
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now
    assert retry_after_s(None) is None and retry_after_s("soon") is None and retry_after_s("-3") is None


def _decide(status, body=b"", entry=None, retry_after=None):
    """(the SR's outcome, the heatmap's outcome)"""
    return tuple(decide(status, parse_answer(body), entry.objects, "dicomweb+http://archive/r", retry_after))


def test_what_each_answer_means_for_each_object(entry):
    sr, sc = (o["sop_instance_uid"] for o in entry.objects)
    sent = _decide(200, ORTHANC_200, entry)  # 200: stored, whatever the body lists
    assert [o.kind for o in sent] == [SENT, SENT] and sent[0].fields == {"http_status": 200}
    sr_out, sc_out = _decide(202, stow_answer([sr], {sc: 0xA900})[2], entry)  # the heatmap refused, not the SR
    assert sr_out.kind == SENT and sr_out.fields == {"http_status": 202}
    assert sc_out.kind == REFUSED and "object1.dcm failed (0xA900 data set does not match SOP class)" in sc_out.reason
    lost_sr, stored_sc = _decide(202, stow_answer([sc], {sr: 0xC000})[2], entry)
    assert lost_sr.kind == REFUSED and "sr.dcm failed (0xC000 cannot understand)" in lost_sr.reason
    assert stored_sc.kind == SENT
    busy, _ = _decide(202, stow_answer([sc], {sr: 0xA700})[2], entry)
    assert busy.kind == RETRY and "0xA700 out of resources" in busy.reason
    assert {o.kind for o in _decide(202, b"", entry)} == {REFUSED}  # "some failed", and no word of which
    again = _decide(409, stow_answer([], {sr: 0x0111, sc: 45070}, status=409)[2], entry)  # a resend after a crash
    assert [(o.kind, o.fields.get("already_stored")) for o in again] == [(SENT, True), (SENT, True)]
    conflict, sc_conflict = _decide(409, stow_answer([], {sr: 0xA900}, status=409)[2], entry)
    assert conflict.kind == REFUSED and conflict.reason.startswith("HTTP 409 Conflict from dicomweb+http://archive/r")
    assert "0xA900" in conflict.reason and conflict.fields == {"http_status": 409}
    assert sc_conflict.kind == REFUSED and "sr.dcm: 0xA900" in sc_conflict.reason  # not in the answer
    orthanc_sr, orthanc_sc = _decide(400, stow_answer([sr])[2], entry)  # Orthanc: 400, the good part stored anyway
    assert orthanc_sr.kind == SENT and orthanc_sc.kind == REFUSED
    warned, _ = _decide(200, stow_answer([sr])[2].replace(b'"00081155"', b'"00081196": {"vr": "US", "Value": '
                                                                           b'[45056]}, "00081155"'), entry)
    assert warned.kind == SENT and "sr.dcm stored with warning 0xB000" in warned.fields["warning"]
    _, only_sc = _decide(409, stow_answer([], {sc: 0xC122}, status=409)[2], entry)  # named by our file, not its UID
    assert only_sc.kind == REFUSED and "object1.dcm failed (0xC122 transfer syntax not supported)" in only_sc.reason
    bad, _ = _decide(400, b"<html><body>Missing Study Instance UID</body></html>", entry)
    assert bad.kind == REFUSED and bad.reason.endswith(": Missing Study Instance UID")
    for status in (413, 415, 422):
        assert {o.kind for o in _decide(status, b"", entry)} == {REFUSED}
    for status in (301, 307, 401, 403, 404, 408, 429, 500, 502, 503, 504):
        for outcome in _decide(status, b"", entry, retry_after=5.0):
            assert outcome.kind == RETRY and outcome.retry_after_s == 5.0 and f"HTTP {status}" in outcome.reason
    assert "credentials were not accepted" in _decide(401, b"", entry)[0].reason


def test_backoff_takes_retry_after_up_to_its_maximum(tmp_path):
    from xray.serve.dicom.outbox import Outbox
    from xray.serve.dicom.sender import Sender

    sender = Sender(parse_destination("dicomweb+http://127.0.0.1:9/r"), Outbox(tmp_path), None, "XRAY_EDGE",
                    backoff_max_s=10)
    sender.failures = 1
    assert sender.backoff_s() == 1
    sender.retry_after_s = 4
    assert sender.backoff_s() == 4
    sender.retry_after_s = 3600
    assert sender.backoff_s() == 10  # capped: an archive cannot park the outbox for an hour
    sender.failures, sender.retry_after_s = 5, 2
    assert sender.backoff_s() == 10


def test_new_modules_do_not_import_torch():
    blocker = ("import sys, importlib.abc\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in {'torch', 'torchvision', 'timm', 'onnx', 'requests'}:\n"
               "            raise ImportError('blocked for this test: ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "import xray.serve.dicom.stow_client, xray.serve.dicom.dimse_client, xray.serve.dicom.sender\n"
               "import xray.serve.dicom.destination, xray.serve.dicom.credentials, xray.serve.dicom.transport\n"
               "assert 'torch' not in sys.modules and 'requests' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------------- the wire
def test_stow_transport_posts_one_request_per_result_with_basic_auth(entry, tmp_path, monkeypatch):
    for name, value in NO_PROXY.items():
        monkeypatch.setenv(name, value)
    credentials = tmp_path / "credentials"
    credentials.write_text("edge:s3cr:et\n")
    with ScriptedStow(root="/dicom-web") as archive:
        transport = StowTransport(parse_destination(archive.url + "/"), credentials, timeout_s=5)
        assert transport.open_round() is None
        outcomes = transport.send(entry, entry.objects)
        transport.close()
    assert [(obj["file"], o.kind, o.fields) for obj, o in outcomes] == \
        [("sr.dcm", SENT, {"http_status": 200}), ("object1.dcm", SENT, {"http_status": 200})]
    (request,) = archive.seen()
    assert request["path"] == "/dicom-web/studies"
    assert request["headers"]["authorization"] == "Basic " + base64.b64encode(b"edge:s3cr:et").decode()
    assert request["headers"]["accept"] == "application/dicom+json"
    assert request["headers"]["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert part_uids(request) == [o["sop_instance_uid"] for o in entry.objects]


def test_stow_transport_failures_that_may_pass(entry, tmp_path, monkeypatch):
    for name, value in NO_PROXY.items():
        monkeypatch.setenv(name, value)
    refused = StowTransport(parse_destination(f"dicomweb+http://127.0.0.1:{free_port()}/r"), None, timeout_s=5)
    (_, outcome), _ = refused.send(entry, entry.objects)
    assert outcome.kind == RETRY and "cannot reach" in outcome.reason and "refused" in outcome.reason.lower(), outcome

    with socket.socket() as silent:  # accepts, reads, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        held = []
        threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
        start = time.monotonic()
        (_, outcome), = StowTransport(parse_destination(f"dicomweb+http://127.0.0.1:{silent.getsockname()[1]}/r"),
                                      None, timeout_s=1).send(entry, entry.objects[:1])
        assert outcome.kind == RETRY and "timed out" in outcome.reason, outcome
        assert time.monotonic() - start < 5
        for conn, _ in held:
            conn.close()

    answers = iter([(503, {"Retry-After": "7"}, b"busy"), (301, {"Location": "http://elsewhere/"}, b"")])
    with ScriptedStow(lambda request: next(answers)) as archive:
        transport = StowTransport(parse_destination(archive.url), tmp_path / "no-credentials-yet", timeout_s=5)
        (_, missing), = transport.send(entry, entry.objects[:1])  # the file is read before each request: missing now is a retry
        assert missing.kind == RETRY and "no-credentials-yet" in missing.reason and archive.seen() == []
        transport.credentials = None
        (_, busy), = transport.send(entry, entry.objects[:1])
        assert busy.kind == RETRY and busy.retry_after_s == 7 and busy.fields == {"http_status": 503}
        (_, moved), = transport.send(entry, entry.objects[:1])
        assert moved.kind == RETRY and "redirected" in moved.reason
        assert len(archive.seen()) == 2  # the redirect was not followed (a POST replayed as a GET stores nothing)


# ---------------------------------------------------------------------------------------------------- real Orthanc
def _dicomweb_url(archive: OrthancDicomWeb, slash: str = "") -> str:
    return "dicomweb+" + archive.dicomweb + slash


@pytest.mark.slow
def test_orthanc_pushes_a_cr_and_finds_the_sr_and_heatmap_in_its_study_by_qido(cam_onnx, tmp_path):
    from test_common_imageio import _find_rg1

    cr = _find_rg1()
    assert cr is not None, "RG1_UNCR.dcm (pydicom-data) is not installed"
    uid, study = _uid(cr), _uid(cr, "StudyInstanceUID")
    out = tmp_path / "results"
    with OrthancDicomWeb(tmp_path / "orthanc") as archive, \
            Server("--model", cam_onnx, "--dicom-port", 0, "--results", out, "--send-heatmap",
                   "--send-to", _dicomweb_url(archive, "/"), env=NO_PROXY) as node:
        archive.add_modality("edge", "XRAY_EDGE", node_port(node))
        job = archive.store_to("edge", [archive.upload(cr)])  # Orthanc is the modality too: C-STORE to the node
        assert job["InstancesCount"] == 1 and job["FailedInstancesCount"] == 0, (job, archive.log()[-3000:])
        (done,) = wait_until(lambda: _terminal(out, uid), 60, what="the report's outcome")
        assert done["event"] == "sr_sent", done
        (heatmap,) = wait_until(lambda: events(out, "sc_sent", "sc_refused"), 30, what="the heatmap's outcome")
        srs = archive.instances_in_study(study, "SR")
        everything = archive.instances_in_study(study)
        health = requests.get(node.url + "/health/ready", timeout=10).json()
    assert done["http_status"] == 200 and "warning" not in done and done["destination"] == _dicomweb_url(archive, "/")
    assert srs == [done["sr_sop_instance_uid"]], (srs, done)
    assert heatmap["event"] == "sc_sent" and heatmap["entry"] == done["entry"], heatmap
    assert heatmap["heatmap_sop_instance_uid"] in everything and uid in everything, everything
    assert health["outbox"] == {"backlog": 0, "oldest_age_s": 0.0, "destination": _dicomweb_url(archive, "/")}
    assert list((out / "outbox").iterdir()) == []


@pytest.mark.slow
def test_archive_down_up_killed_up_delivers_each_report_once(tiny_onnx, tmp_path):
    out, port = tmp_path / "results", free_port()  # reserved: the archive is not started yet
    files = [_dx(tmp_path, f"web{i}", seed=80 + i) for i in range(2)]
    uids, studies = [_uid(f) for f in files], [_uid(f, "StudyInstanceUID") for f in files]
    url = f"dicomweb+http://127.0.0.1:{port}/dicom-web"
    with Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--send-to", url,
                "--send-backoff-max-s", 1, env=NO_PROXY) as node:
        modality = storescu(node_port(node), "XRAY_EDGE", files[0], calling="MODALITY", extra=())
        assert modality.returncode == 0, modality.stderr
        (waiting,) = wait_until(lambda: events(out, "send_waiting"), 30, what="send_waiting (archive not started)")
        assert waiting["destination"] == url and "cannot reach" in waiting["reason"], waiting
        outbox = requests.get(node.url + "/health/ready", timeout=10).json()["outbox"]
        assert outbox["destination"] == url and outbox["backlog"] == 1, outbox
        with OrthancDicomWeb(tmp_path / "archive", http_port=port) as archive:
            wait_until(lambda: _terminal(out, uids[0]), 30, what="the first report after the archive came up")
            archive.kill()
            modality = storescu(node_port(node), "XRAY_EDGE", files[1], calling="MODALITY", extra=())
            assert modality.returncode == 0, modality.stderr
            wait_until(lambda: len(events(out, "send_waiting")) == 2, 30, what="send_waiting (archive killed)")
        with OrthancDicomWeb(tmp_path / "archive", http_port=port) as archive:  # the same storage, up again
            wait_until(lambda: _terminal(out, uids[1]), 30, what="the second report after the restart")
            found = [archive.instances_in_study(s, "SR") for s in studies]
    assert len(events(out, "send_waiting")) == 2  # one per outage, not one per try
    for u, srs in zip(uids, found):
        (term,) = _terminal(out, u)
        assert term["event"] == "sr_sent" and term["destination"] == url, term
        assert srs == [term["sr_sop_instance_uid"]], (srs, term)
    assert list((out / "outbox").iterdir()) == [] and not (out / "refused").exists()


# ---------------------------------------------------------------------------------------------------- scripted archive
def _sr_source(request: dict) -> str:
    """The source instance the request's SR reports on."""
    from xray.serve.dicom.sr import summarize_sr

    return summarize_sr(pydicom.dcmread(io.BytesIO(multipart_parts(request)[0])))["references"][0]


@pytest.mark.slow
def test_a_refused_token_is_read_again_and_the_renewed_one_delivers(tiny_onnx, tmp_path):
    token, out = tmp_path / "token", tmp_path / "results"
    token.write_text("Bearer old-token\n")

    def answer(request):
        if request["headers"].get("authorization") != "Bearer new-token":
            return 401, {"WWW-Authenticate": 'Bearer realm="archive"', "Content-Type": "application/json"}, \
                b'{"error": {"code": 401, "message": "Request had invalid authentication credentials."}}'
        return stow_answer(part_uids(request))

    dx = _dx(tmp_path, "token", seed=90)
    with ScriptedStow(answer) as archive, \
            Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--send-to", archive.url,
                   "--send-credentials", token, "--send-backoff-max-s", 1, env=NO_PROXY) as node:
        assert store(node_port(node), [dx]) == [0x0000]
        (waiting,) = wait_until(lambda: events(out, "send_waiting"), 30, what="send_waiting after the 401")
        wait_until(lambda: len(archive.seen()) >= 2, 30, what="a second try with the unchanged file")
        renewed = tmp_path / "token.new"  # as a cron job renews it: write aside, then rename over
        renewed.write_text("Bearer new-token\n")
        renewed.replace(token)
        (done,) = wait_until(lambda: _terminal(out, _uid(dx)), 30, what="the report after the renewal")
        output = node.output()
    seen = [r["headers"]["authorization"] for r in archive.seen()]
    assert done["event"] == "sr_sent" and seen[-1] == "Bearer new-token", (done, seen)
    assert set(seen[:-1]) == {"Bearer old-token"} and len(seen) >= 3, seen
    assert "HTTP 401" in waiting["reason"] and "credentials were not accepted" in waiting["reason"], waiting
    assert len(events(out, "send_waiting")) == 1
    for secret in ("old-token", "new-token"):  # the token is in no log
        assert secret not in output and secret not in json.dumps(results(out))


@pytest.mark.slow
def test_refusals_are_kept_with_the_reason_and_a_busy_archive_is_retried(tiny_onnx, tmp_path):
    out, credentials = tmp_path / "results", tmp_path / "credentials"
    credentials.write_text("edge:s3cr:et\n")
    files = {name: _dx(tmp_path, name, seed=100 + i) for i, name in enumerate(("conflict", "bad", "busy"))}
    source = {_uid(path): name for name, path in files.items()}
    busy_answers = iter([(503, {"Retry-After": "1"}, b"<h1>Service Unavailable</h1>")] * 2)

    def answer(request):
        name = source[_sr_source(request)]
        if name == "conflict":
            return stow_answer([], {part_uids(request)[0]: 0xA900}, status=409)
        if name == "bad":
            return 400, {"Content-Type": "text/html"}, b"<html><body><h1>Bad Request</h1><p>Missing Study Instance UID</p>"
        return next(busy_answers, None) or stow_answer(part_uids(request))

    with ScriptedStow(answer) as archive, \
            Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--send-to", archive.url,
                   "--send-credentials", credentials, "--send-backoff-max-s", 1, env=NO_PROXY) as node:
        assert store(node_port(node), list(files.values())) == [0x0000] * 3
        wait_until(lambda: all(_terminal(out, u) for u in source), 30, what="3 terminal report events")
    outcome = {source[u]: _terminal(out, u) for u in source}
    assert all(len(v) == 1 for v in outcome.values()), outcome
    (conflict,), (bad,), (busy,) = outcome["conflict"], outcome["bad"], outcome["busy"]
    assert conflict["event"] == "sr_refused" and conflict["http_status"] == 409, conflict
    assert "HTTP 409 Conflict" in conflict["reason"] and "0xA900 data set does not match SOP class" in conflict["reason"]
    assert bad["event"] == "sr_refused" and bad["reason"].endswith("Bad Request Missing Study Instance UID"), bad
    assert busy["event"] == "sr_sent" and busy["attempts"] == 3, busy
    for refused in (conflict, bad):
        kept = Path(refused["kept"])
        assert kept.parent == out / "refused" and (kept / "sr.dcm").is_file()
        assert _uid(kept / "sr.dcm") == refused["sr_sop_instance_uid"]
        status = json.loads((kept / "status.json").read_text())
        sr_status = status["objects"]["sr.dcm"]
        assert status["state"] == "refused" and sr_status["state"] == "refused" and sr_status["reason"] == refused["reason"]
        assert sr_status["http_status"] == refused["http_status"] and sr_status["destination"] == archive.url
    (waiting,) = events(out, "send_waiting")
    assert "HTTP 503" in waiting["reason"] and "Service Unavailable" in waiting["reason"], waiting
    per_source = [source[_sr_source(r)] for r in archive.seen()]
    assert sorted(per_source) == ["bad", "busy", "busy", "busy", "conflict"], per_source  # refusals not retried
    basic = "Basic " + base64.b64encode(b"edge:s3cr:et").decode()
    assert {r["headers"]["authorization"] for r in archive.seen()} == {basic}
    assert list((out / "outbox").iterdir()) == []


@pytest.mark.slow
def test_a_refused_heatmap_never_hides_the_delivered_report(cam_onnx, tmp_path):
    out = tmp_path / "results"

    def answer(request):
        sr, sc = part_uids(request)
        return stow_answer([sr], {sc: 0xA900})  # 202: the SR stored, the Secondary Capture not

    dx = _dx(tmp_path, "heat", seed=110)
    with ScriptedStow(answer) as archive, \
            Server("--model", cam_onnx, "--dicom-port", 0, "--results", out, "--send-heatmap",
                   "--send-to", archive.url, "--send-backoff-max-s", 1, env=NO_PROXY) as node:
        assert store(node_port(node), [dx]) == [0x0000]
        (done,) = wait_until(lambda: _terminal(out, _uid(dx)), 30, what="the report's outcome")
        (heatmap,) = wait_until(lambda: events(out, "sc_sent", "sc_refused"), 30, what="the heatmap's outcome")
    assert done["event"] == "sr_sent" and done["http_status"] == 202 and "warning" not in done, done
    assert heatmap["event"] == "sc_refused" and "object1.dcm failed (0xA900" in heatmap["reason"], heatmap
    assert heatmap["entry"] == done["entry"] and heatmap["heatmap_sop_instance_uid"] != done["sr_sop_instance_uid"]
    kept = Path(heatmap["kept"])
    assert kept.parent == out / "refused" and (kept / "object1.dcm").is_file()
    status = json.loads((kept / "status.json").read_text())
    assert status["objects"]["sr.dcm"]["state"] == "sent" and status["objects"]["object1.dcm"]["state"] == "refused"
    (request,) = archive.seen()  # one request: the SR and its heatmap together; the refused one is not retried
    classes = [str(pydicom.dcmread(io.BytesIO(p), stop_before_pixels=True).SOPClassUID) for p in multipart_parts(request)]
    assert classes == [ComprehensiveSRStorage, SecondaryCaptureImageStorage]
    assert list((out / "outbox").iterdir()) == [] and not events(out, "send_waiting")
