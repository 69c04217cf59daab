"""The DICOM node's TLS with real archives on 127.0.0.1: Orthanc 1.10 with DICOM TLS on (client certificates
required both ways) pushes a chest CR to the node over TLS and gets the SR back over TLS into the same study; and a
DCMTK storescp +tls PACS whose certificate the node must not trust (another root) keeps the reports in the outbox,
saying why, until the PACS comes back with a good certificate: then each report arrives exactly once."""
from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from peers import Orthanc, events, free_port, wait_until
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from serving import Server
from test_dicom_node import store, write_dicom
from test_dicom_tls import TlsStorescp, audit_events, dcmtk_tls, dicom_port, echo, issue
from test_infer import radiograph
from tls_certs import make_pki

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dicom_tls_peers")]
TERMINAL = ("sr_sent", "sr_refused", "sr_expired")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _uid(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


def _waiting(out: Path) -> str:
    return "\n".join(f"  {r}" for r in events(out, "send_waiting", "sr_refused", "sr_expired")) or "  (none)"


# ---------------------------------------------------------------------------------------------------- 6. Orthanc
def test_orthanc_pushes_over_tls_and_files_the_sr_it_gets_back_over_tls(tiny_onnx, pki, tmp_path):
    from test_common_imageio import _find_rg1

    cr = _find_rg1()
    assert cr is not None, "RG1_UNCR.dcm (pydicom-data) is not installed"
    out, audit = tmp_path / "results", tmp_path / "audit.jsonl"
    pacs = Orthanc(tmp_path / "orthanc")
    pacs.config.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.pacs.cert),
                        "DicomTlsPrivateKey": str(pki.pacs.key), "DicomTlsTrustedCertificates": str(pki.ca.cert),
                        "DicomTlsRemoteCertificateRequired": True})
    with pacs, Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--audit", audit,
                      "--dicom-tls-cert", pki.server.cert, "--dicom-tls-key", pki.server.key,
                      "--dicom-tls-ca", pki.ca.cert, "--allow-ae", "ORTHANC=ORTHANC",
                      "--send-to", f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--send-tls-ca", pki.ca.cert,
                      "--send-tls-cert", pki.server.cert, "--send-tls-key", pki.server.key) as node:
        # Orthanc's DICOM port speaks TLS only, and wants our certificate: whatever arrives there came over TLS
        assert echo(pacs.dicom_port, calling="XRAY_EDGE", called="ORTHANC").returncode != 0
        assert echo(pacs.dicom_port, "+tla", "+cf", str(pki.ca.cert), calling="XRAY_EDGE",
                    called="ORTHANC").returncode != 0
        assert echo(pacs.dicom_port, *dcmtk_tls(pki.server, pki.ca), calling="XRAY_EDGE",
                    called="ORTHANC").returncode == 0, "the node's own identity is not good enough for Orthanc"
        port = dicom_port(node)
        r = pacs.session.put(f"{pacs.url}/modalities/edge", timeout=30,
                             json={"AET": "XRAY_EDGE", "Host": "127.0.0.1", "Port": port, "UseDicomTls": True})
        assert r.ok, r.text
        assert pacs.echo("edge"), f"Orthanc's C-ECHO over TLS to the node failed:\n{pacs.log()[-3000:]}"
        job = pacs.store_to("edge", [pacs.upload(cr)])
        assert job["InstancesCount"] == 1 and job["FailedInstancesCount"] == 0, (job, pacs.log()[-3000:])

        uid, study_uid = _uid(cr), _uid(cr, "StudyInstanceUID")
        rec = wait_until(lambda: next((r for r in events(out, "instance") if r["sop_instance_uid"] == uid), None), 30,
                         what="the instance line")
        assert rec["status"] == "classified" and rec["calling_ae"] == "ORTHANC", rec
        assert "CN=ORTHANC" in rec["tls_subject"].split(","), rec
        (done,) = wait_until(lambda: [r for r in events(out, *TERMINAL) if r.get("sop_instance_uid") == uid], 30,
                             what="the report's outcome")
        assert done["event"] == "sr_sent" and "(TLS)" in done["destination"], f"{done}\n{_waiting(out)}"

        def srs():
            studies = pacs.lookup_studies(study_uid)
            assert len(studies) == 1, f"{len(studies)} studies with the CR's StudyInstanceUID"
            return [i for s in pacs.series(studies[0]) if s["MainDicomTags"].get("Modality") == "SR"
                    for i in s["Instances"]]

        (sr_id,) = wait_until(srs, 30, what="the SR series in the CR's study in Orthanc")
        sr = pydicom.dcmread(pacs.download(sr_id, tmp_path / "sr.dcm"))
        assert str(sr.SOPInstanceUID) == done["sr_sop_instance_uid"] and str(sr.StudyInstanceUID) == study_uid
        assert not events(out, "tls_refused"), events(out, "tls_refused")
    logins = [e for e in audit_events(audit, "110114") if e["ActiveParticipant"][0]["UserID"] == "ORTHANC"]
    assert logins and {e["EventOutcomeIndicator"] for e in logins} == {0}, logins
    assert all("CN=ORTHANC" in e["ActiveParticipant"][0]["AlternativeUserID"] for e in logins), logins


# ---------------------------------------------------------------------------------------------------- 7. wrong CA
def test_a_pacs_with_an_untrusted_certificate_gets_nothing_until_it_has_a_good_one_then_each_report_once(
        tiny_onnx, pki, tmp_path):
    """storescp +tls with a certificate from another root (with the right SAN: only the chain is wrong): the
    node refuses it, the reports wait in the outbox and send_waiting says "certificate"; nothing reaches
    storescp. The node is stopped (SIGTERM), storescp comes back on the same port with a certificate of the
    right CA, the node restarts: each report is delivered exactly once (one sr_sent each, one SR file each)."""
    rogue_server = issue(pki.rogue_ca, tmp_path / "rogue", "rogue-server", "localhost", server=True)
    out, port = tmp_path / "results", free_port()
    files = [write_dicom(tmp_path / f"dx{i}.dcm", radiograph(256, seed=90 + i), DigitalXRayImageStorageForPresentation,
                         12, patient=f"TLSQ{i}", BodyPartExamined="CHEST") for i in range(3)]
    uids = [_uid(f) for f in files]
    args = ("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--send-to", f"PACS@127.0.0.1:{port}",
            "--send-tls-ca", pki.ca.cert, "--send-tls-cert", pki.server.cert, "--send-tls-key", pki.server.key,
            "--send-backoff-max-s", 1)
    folder = tmp_path / "pacs"
    with TlsStorescp(folder, rogue_server, pki.ca, probe=dcmtk_tls(pki.modality, pki.rogue_ca), port=port) as bad:
        with Server(*args) as node:
            assert store(dicom_port(node), files) == [0x0000] * 3
            (waiting,) = wait_until(lambda: events(out, "send_waiting"), 30, what="send_waiting")
            assert "certificate" in waiting["reason"], waiting
            time.sleep(3)  # a few retries with the 1 s back-off: still nothing may go out
            assert not events(out, *TERMINAL), events(out, *TERMINAL)
            assert len([p for p in (out / "outbox").iterdir() if p.is_dir() and not p.name.startswith(".")]) == 3
            assert bad.files() == [], bad.files()
            assert node.stop() == 0
        assert bad.proc.poll() is None, f"storescp died of the refused handshakes:\n{bad.log()}"
    assert bad.files() == [], bad.files()

    with TlsStorescp(folder, pki.server, pki.ca, probe=dcmtk_tls(pki.modality, pki.ca), port=port) as good:
        with Server(*args):
            wait_until(lambda: len(events(out, *TERMINAL)) >= 3, 30, what="three reports delivered")
            time.sleep(2)  # nothing more may come: no second send of any report
        received = [str(pydicom.dcmread(p).SOPInstanceUID) for p in good.files("SR")]
    terminal = events(out, *TERMINAL)
    assert sorted(r["sop_instance_uid"] for r in terminal) == sorted(uids), terminal
    assert {r["event"] for r in terminal} == {"sr_sent"}, terminal
    assert sorted(received) == sorted(r["sr_sop_instance_uid"] for r in terminal), (received, terminal)
    assert len(set(received)) == 3 and len(good.files()) == 3, good.files()
    assert not [p for p in (out / "outbox").iterdir() if not p.name.startswith(".")]
