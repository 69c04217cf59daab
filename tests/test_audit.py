"""serve/audit.py: the --audit trail's file (0600, append-only, whole lines, fsynced) and its DICOM audit codes."""
from __future__ import annotations

import errno
import inspect
import json
import os
import re
import stat
import threading

import pytest

from xray.common.errors import XrayError
from xray.serve.audit import AuditLog

SECRET = "sk-live-7f3a9c1e5b2d4f60a8e1"  # an API key as a client would send it


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def every_event(audit: AuditLog):
    """Each helper once, with the arguments the node, the sender and the middleware pass."""
    audit.started(settings={"port": 8000, "dicom_port": 11112, "audit": "/var/log/xray/audit.jsonl"})
    audit.association(peer="10.0.0.7", calling_ae="MODALITY1", called_ae="XRAY", tls_subject="CN=modality1,O=Clinic",
                      accepted=True)
    audit.association(peer="10.0.0.8", calling_ae="ROGUE", called_ae="XRAY", tls_subject=None, accepted=False,
                      reason="calling AE title 'ROGUE' not in --allow-ae")
    audit.tls_failed(peer="10.0.0.9", port_kind="dicom", reason="certificate verify failed: unknown ca")
    audit.instance_received(peer="10.0.0.7", calling_ae="MODALITY1", sop_instance_uid="1.2.3.4.5",
                            sop_class="1.2.840.10008.5.1.4.1.1.1.1", study_instance_uid="1.2.3.4",
                            patient_id="PAT-001", outcome=0)
    audit.report(destination="PACS@10.0.0.2:104", kind="sr", sop_instance_uid="1.2.9.1", study_instance_uid="1.2.3.4",
                 state="sent")
    audit.http_request(client="192.168.1.20", method="POST", path="/v1/predict", status=200, auth="key",
                       tls_subject=None, images=1)
    audit.http_request(client="192.168.1.21", method="POST", path="/dicomweb/studies", status=200,
                       auth="certificate", tls_subject="CN=ris,O=Clinic", images=3)
    audit.auth_failed(client="192.168.1.22", what="api-key", reason="missing or wrong X-API-Key")
    audit.stopped(reason="SIGTERM")


def test_created_0600_even_with_a_permissive_umask(tmp_path, permissive_umask):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.stopped(reason="test")
    assert mode(path) == 0o600
    os.rename(path, tmp_path / "audit.jsonl.1")
    audit.reopen()  # logrotate's new file: 0600 too
    audit.stopped(reason="test")
    audit.close()
    assert mode(path) == 0o600


@pytest.mark.parametrize("perms", [0o644, 0o640, 0o604])
def test_an_existing_file_readable_by_others_is_refused_in_one_line(tmp_path, perms):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"old": 1}\n')
    path.chmod(perms)
    with pytest.raises(XrayError) as e:
        AuditLog(path)
    assert "chmod 600" in str(e.value) and f"{perms:04o}" in str(e.value) and "\n" not in str(e.value)
    assert path.read_text() == '{"old": 1}\n' and mode(path) == perms  # untouched


def test_every_line_is_json_with_the_dcm_codes(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, source_id="XRAY")
    every_event(audit)
    audit.close()
    events = lines(path)
    got = [(e["EventID"]["code"], e.get("EventTypeCode", {}).get("code"), e["EventActionCode"],
            e["EventOutcomeIndicator"]) for e in events]
    assert got == [("110100", "110120", "E", 0),  # Application Activity / Application Start
                   ("110114", "110122", "E", 0),  # User Authentication / Login, accepted
                   ("110114", "110122", "E", 4),  # refused
                   ("110113", "110126", "E", 4),  # Security Alert / Node Authentication
                   ("110104", None, "C", 0),  # DICOM Instances Transferred, received
                   ("110104", None, "R", 0),  # sent by us
                   ("110112", None, "E", 0),  # /v1/predict: Query
                   ("110104", None, "C", 0),  # STOW-RS
                   ("110114", "110122", "E", 4),  # bad API key
                   ("110100", "110121", "E", 0)]  # Application Stop
    for e in events:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", e["time"])
        assert e["EventID"]["codeSystemName"] == "DCM" and e["AuditSourceIdentification"] == {"AuditSourceID": "XRAY"}
        assert all(p["UserID"] for p in e["ActiveParticipant"])
    start, ok, refused, tls, received, sent, predict, stow, bad_key, stop = events
    assert start["EventID"]["displayName"] == "Application Activity"
    assert start["settings"]["dicom_port"] == 11112
    assert [p["RoleIDCode"]["code"] for p in start["ActiveParticipant"]] == ["110150", "110151"]
    peer = ok["ActiveParticipant"][0]
    assert peer == {"UserID": "MODALITY1", "UserIsRequestor": True, "AlternativeUserID": "CN=modality1,O=Clinic",
                    "NetworkAccessPointTypeCode": 2, "NetworkAccessPointID": "10.0.0.7"}
    assert ok["ActiveParticipant"][1]["UserID"] == "XRAY" and "EventOutcomeDescription" not in ok
    assert refused["ActiveParticipant"][0]["AlternativeUserID"] == "plain"
    assert refused["EventOutcomeDescription"] == "calling AE title 'ROGUE' not in --allow-ae"
    subject = tls["ParticipantObjectIdentification"][0]
    assert subject["ParticipantObjectIDTypeCode"]["code"] == "110182" and subject["ParticipantObjectID"] == "10.0.0.9"
    assert "unknown ca" in tls["EventOutcomeDescription"]
    assert [p["RoleIDCode"]["code"] for p in received["ActiveParticipant"]] == ["110153", "110152"]
    study, patient = received["ParticipantObjectIdentification"]
    assert (study["ParticipantObjectTypeCode"], study["ParticipantObjectTypeCodeRole"],
            study["ParticipantObjectIDTypeCode"]["code"], study["ParticipantObjectID"]) == (2, 3, "110180", "1.2.3.4")
    assert study["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": "1.2.840.10008.5.1.4.1.1.1.1", "NumberOfInstances": 1, "Instance": [{"UID": "1.2.3.4.5"}]}]
    assert (patient["ParticipantObjectTypeCode"], patient["ParticipantObjectIDTypeCode"],
            patient["ParticipantObjectID"]) == (1, {"code": "2", "codeSystemName": "RFC-3881",
                                                    "displayName": "Patient Number"}, "PAT-001")
    us, destination = sent["ActiveParticipant"]
    assert us["UserIsRequestor"] and destination["UserID"] == "PACS@10.0.0.2:104"
    assert sent["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"]["SOPClass"][0]["UID"] == \
        "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    for event, role in ((predict, 24), (stow, 3)):
        obj = event["ParticipantObjectIdentification"][0]
        assert obj["ParticipantObjectIDTypeCode"]["code"] == "12" and obj["ParticipantObjectTypeCodeRole"] == role
    assert {d["type"]: d["value"] for d in stow["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]} == \
        {"method": "POST", "status": 200, "auth": "certificate", "images": 3}
    assert stow["ActiveParticipant"][0]["AlternativeUserID"] == "CN=ris,O=Clinic"
    assert bad_key["EventOutcomeDescription"] == "api-key: missing or wrong X-API-Key"
    assert stop["EventOutcomeDescription"] == "SIGTERM"


@pytest.mark.parametrize("state, outcome", [("sent", 0), ("refused", 4), ("expired", 8)])
def test_report_outcomes(tmp_path, state, outcome):
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.report(destination="dicomweb+https://pacs/dicom-web", kind="sc", sop_instance_uid="1.2.9.2",
                 study_instance_uid="1.2.3", state=state, reason="" if state == "sent" else "status 0xA700")
    (event,) = lines(audit.path)
    assert event["EventOutcomeIndicator"] == outcome and ("EventOutcomeDescription" in event) == bool(outcome)
    with pytest.raises(ValueError):
        audit.report(destination="x", kind="sr", sop_instance_uid="1", study_instance_uid="1", state="lost")


@pytest.mark.parametrize("status, outcome", [(200, 0), (401, 4), (413, 4), (503, 8)])
def test_http_outcomes(tmp_path, status, outcome):
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.http_request(client="::1", method="post", path="/v1/predict", status=status, auth="none", tls_subject=None,
                       images=None)
    (event,) = lines(audit.path)
    assert event["EventOutcomeIndicator"] == outcome
    assert event["ActiveParticipant"][0]["NetworkAccessPointTypeCode"] == 2
    assert "images" not in {d["type"] for d in event["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]}


def test_patient_id_none_is_left_out_and_a_bad_outcome_refused(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.instance_received(peer="10.0.0.7", calling_ae="", sop_instance_uid="1.2.3.4.5", sop_class=None,
                            study_instance_uid=None, patient_id=None, outcome=4, reason="status 0xA700")
    (event,) = lines(audit.path)
    (study,) = event["ParticipantObjectIdentification"]
    assert event["ActiveParticipant"][0]["UserID"] == "10.0.0.7"  # no AE title: the address
    assert event["EventOutcomeDescription"] == "status 0xA700"
    with pytest.raises(ValueError):
        audit.instance_received(peer="p", calling_ae="A", sop_instance_uid="1", sop_class=None, study_instance_uid="1",
                                patient_id=None, outcome=3)
    assert len(lines(audit.path)) == 1


def test_two_instances_append_never_truncate(tmp_path):
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path)
    first.started(settings={"port": 1})
    first.close()
    before = path.read_bytes()
    second = AuditLog(path)
    second.stopped(reason="SIGTERM")
    second.close()
    after = path.read_bytes()
    assert after.startswith(before) and len(lines(path)) == 2


def test_a_cut_last_line_is_ended_on_open(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"whole": 1}\n{"cut": "by a ki')
    path.chmod(0o600)
    audit = AuditLog(path)
    audit.stopped(reason="after the crash")
    audit.close()
    raw = path.read_text().split("\n")
    assert raw[:2] == ['{"whole": 1}', '{"cut": "by a ki'] and raw[-1] == ""
    assert json.loads(raw[2])["EventOutcomeDescription"] == "after the crash"
    AuditLog(path).close()  # a whole file gets no empty line
    assert path.read_text().count("\n") == 3


def test_reopen_after_rename_writes_a_new_file(tmp_path):
    path, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    audit = AuditLog(path)
    audit.started(settings={})
    os.rename(path, rotated)
    audit.reopen()
    audit.stopped(reason="SIGTERM")
    audit.close()
    assert [e["EventTypeCode"]["code"] for e in lines(rotated)] == ["110120"]
    assert [e["EventTypeCode"]["code"] for e in lines(path)] == ["110121"]
    audit.reopen()  # a closed log stays closed
    assert lines(path)[-1]["EventTypeCode"]["code"] == "110121"


def test_8_threads_x_200_events_give_1600_whole_lines(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    start = threading.Barrier(8)

    def work(t):
        start.wait()
        for i in range(200):
            audit.instance_received(peer=f"10.0.0.{t}", calling_ae=f"AE{t}", sop_instance_uid=f"1.2.{t}.{i}",
                                    sop_class="1.2.840.10008.5.1.4.1.1.7", study_instance_uid="1.2",
                                    patient_id="P" * 64, outcome=0)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    audit.close()
    events = lines(audit.path)
    seen = {e["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"]["SOPClass"][0]["Instance"][0]["UID"]
            for e in events}
    assert len(events) == 1600 and seen == {f"1.2.{t}.{i}" for t in range(8) for i in range(200)}


def test_disabled_log_accepts_everything_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fsyncs = []
    monkeypatch.setattr(os, "fsync", fsyncs.append)
    audit = AuditLog(None)
    every_event(audit)
    audit.reopen()
    audit.close()
    every_event(audit)
    assert not audit.enabled and list(tmp_path.iterdir()) == [] and fsyncs == []


def test_no_api_key_reaches_the_trail(tmp_path):
    """The helpers take no header values: what the middleware can pass of a request with a key is the word."""
    headers = {"x-api-key": SECRET, "authorization": f"Bearer {SECRET}", "cookie": f"key={SECRET}"}
    request = {"client": ("192.168.1.20", 51515), "method": "POST", "path": "/v1/predict", "headers": headers}
    audit = AuditLog(tmp_path / "audit.jsonl")
    for method in (audit.http_request, audit.auth_failed, audit.association, audit.tls_failed,
                   audit.instance_received, audit.report):
        assert not {"headers", "header", "key", "api_key", "authorization"} & set(inspect.signature(method).parameters)
    audit.http_request(client=request["client"][0], method=request["method"], path=request["path"], status=200,
                       auth="key" if "x-api-key" in request["headers"] else "none", tls_subject=None, images=1)
    audit.auth_failed(client=request["client"][0], what="api-key", reason="wrong X-API-Key")
    with pytest.raises(ValueError):  # the key passed where the word goes: refused, not written
        audit.http_request(client="192.168.1.20", method="POST", path="/v1/predict", status=200,
                           auth=headers["x-api-key"], tls_subject=None, images=1)
    # the settings: a key file's path stays, a key passed by mistake does not
    audit.started(settings={"api_key_file": "/etc/xray/api-key", "api_key": SECRET, "send_credentials_password": SECRET,
                            "token": None})
    audit.close()
    text = audit.path.read_text()
    assert SECRET not in text and "sk-live" not in text
    events = lines(audit.path)
    assert len(events) == 3 and events[0]["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"][2] == \
        {"type": "auth", "value": "key"}
    assert events[2]["settings"] == {"api_key_file": "/etc/xray/api-key", "api_key": "(set)",
                                     "send_credentials_password": "(set)", "token": None}


def test_fsync_per_event_after_the_whole_line(tmp_path, monkeypatch):
    audit = AuditLog(tmp_path / "audit.jsonl")
    real, synced = os.fsync, []

    def fsync(fd):
        synced.append(audit.path.read_text().count("\n"))  # what is in the file when it is synced
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    every_event(audit)
    assert synced == list(range(1, 11))


def test_a_write_that_fails_is_raised_and_the_next_line_starts_afresh(tmp_path, monkeypatch):
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.stopped(reason="one")
    real = os.write

    def full(fd, data):
        if fd == audit._fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    def short(fd, data):
        return real(fd, data[: len(data) // 2]) if fd == audit._fd else real(fd, data)

    for fake in (full, short):
        monkeypatch.setattr(os, "write", fake)
        with pytest.raises(OSError):
            audit.stopped(reason="lost")
        monkeypatch.setattr(os, "write", real)
        audit.stopped(reason="next")
    audit.close()
    with pytest.raises(OSError):  # a closed log says so
        audit.stopped(reason="after close")
    raw = audit.path.read_text().split("\n")
    parsed = []
    for line in raw:
        try:
            parsed.append(json.loads(line)["EventOutcomeDescription"])
        except ValueError:
            parsed.append(None)  # the half line, or an empty one: alone on its line
    assert [p for p in parsed if p] == ["one", "next", "next"]
    assert all(line.startswith('{"time"') for line, p in zip(raw, parsed) if p)
