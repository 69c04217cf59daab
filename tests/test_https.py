"""HTTPS (issue #29, item 3): xray-serve --tls-cert/--tls-key/--tls-client-ca against curl, the audit trail of
the HTTP side, SIGHUP re-reading the certificate, key files others can read refused, and STOW-RS out to an
Orthanc behind nginx's HTTPS, verified with --send-tls-ca and never without it. Everything on
127.0.0.1 with a PKI made by openssl for the module (scripts/make_test_pki.py)."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from peers import NginxTls, OrthancDicomWeb, events, storescu, wait_until
from serving import SERVE, Server
from test_dicom_node import node_port, write_dicom
from test_infer import radiograph, save_mode
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from tls_certs import CertFactory, make_pki

NO_PROXY = {"no_proxy": "*", "NO_PROXY": "*"}
KEY = "s3cret-test-key-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def curl(url: str, *args) -> subprocess.CompletedProcess:
    """curl -sS, printing the HTTP status on the last line (000 when no answer)."""
    return subprocess.run(["curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}", *map(str, args),
                           url], capture_output=True, text=True, timeout=60, env={**NO_PROXY, "PATH": "/usr/bin:/bin"})


def audit_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peer_certificate_cn(port: int, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        return dict(x[0] for x in s.getpeercert()["subject"])["commonName"]


def test_https_with_client_certificates_against_curl_and_the_audit_trail(tiny_onnx, pki, tmp_path):
    key_file, audit = tmp_path / "key", tmp_path / "audit.jsonl"
    key_file.write_text(KEY + "\n")
    image = save_mode(radiograph(96, seed=3), "png8", tmp_path / "film")
    mine = ("--cacert", pki.ca.cert, "--cert", pki.modality.cert, "--key", pki.modality.key)
    with Server("--model", tiny_onnx[0], "--tls-cert", pki.server.cert, "--tls-key", pki.server.key,
                "--tls-client-ca", pki.ca.cert, "--api-key-file", key_file, "--audit", audit,
                verify=str(pki.ca.cert)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        url = server.url
        # a local probe needs neither a client certificate nor the key; the answer carries HSTS
        head = subprocess.run(["curl", "-sS", "-i", "--cacert", pki.ca.cert, url + "/health/ready"], capture_output=True,
                              text=True, env=NO_PROXY, timeout=30).stdout.lower()
        assert head.startswith("http/1.1 200") and "strict-transport-security: max-age=" in head, head
        untrusted = curl(url + "/health/ready")  # the system's store does not know the test CA
        assert untrusted.returncode == 60 and "certificate" in untrusted.stderr.lower(), untrusted
        assert curl(url + "/v1/metadata", "--cacert", pki.ca.cert, "-H", f"X-API-Key: {KEY}").stdout == "403"
        assert curl(url + "/v1/metadata", *mine, "-H", f"X-API-Key: {KEY}").stdout == "200"
        assert curl(url + "/v1/metadata", *mine).stdout == "401"  # a certificate does not replace the key
        rogue = curl(url + "/v1/metadata", "--cacert", pki.ca.cert, "--cert", pki.rogue.cert, "--key", pki.rogue.key)
        assert rogue.stdout == "000" and rogue.returncode != 0, rogue  # refused in the handshake: no HTTP answer
        expired = curl(url + "/v1/metadata", "--cacert", pki.ca.cert, "--cert", pki.expired.cert, "--key", pki.expired.key)
        assert expired.stdout == "000" and expired.returncode != 0, expired
        plain = curl(url.replace("https://", "http://") + "/health/ready")
        assert plain.stdout != "200", plain  # the port speaks TLS only
        assert curl(url + "/v1/predict", *mine, "-H", "X-API-Key: wrong-key", "-F", f"file=@{image}").stdout == "401"
        assert curl(url + "/v1/predict", *mine, "-H", f"X-API-Key: {KEY}", "-F", f"file=@{image}").stdout == "200"
    lines = audit_events(audit)
    assert audit.stat().st_mode & 0o777 == 0o600
    assert KEY not in audit.read_text() and "wrong-key" not in audit.read_text()
    codes = [(e["EventID"]["code"], e["EventOutcomeIndicator"]) for e in lines]
    assert codes[0] == ("110100", 0) and lines[0]["EventTypeCode"]["code"] == "110120"  # start, with the settings
    assert lines[0]["settings"]["http"].startswith("https://") and lines[0]["settings"]["http_client_certificates"]
    assert lines[-1]["EventTypeCode"]["code"] == "110121"  # stop
    failures = [e for e in lines if e["EventID"]["code"] == "110114" and e["EventOutcomeIndicator"] == 4]
    reasons = " | ".join(e["EventOutcomeDescription"] for e in failures)
    assert "client certificate" in reasons and "API key" in reasons, reasons
    (predict,) = [e for e in lines if e["EventID"]["code"] == "110112" and e["EventOutcomeIndicator"] == 0]
    requestor = next(p for p in predict["ActiveParticipant"] if p["UserIsRequestor"])
    assert requestor["NetworkAccessPointID"] == "127.0.0.1" and "CN=MODALITY" in requestor["AlternativeUserID"]
    details = {d["type"]: d["value"] for d in predict["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]}
    assert details == {"method": "POST", "status": 200, "auth": "certificate", "images": 1}, details


def test_sighup_rereads_the_certificate_and_keeps_the_old_one_when_the_new_files_are_broken(tiny_onnx, pki, tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    key.chmod(0o600)
    second = CertFactory.of(pki.ca).issue("renewed", "renewed.localhost", server=True)  # the same CA, a new cert
    with Server("--model", tiny_onnx[0], "--tls-cert", cert, "--tls-key", key, verify=str(pki.ca.cert)) as server:
        assert peer_certificate_cn(server.port, pki.ca.cert) == "localhost"
        shutil.copy(second.cert, cert)
        shutil.copy(second.key, key)
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: peer_certificate_cn(server.port, pki.ca.cert) == "renewed.localhost", 15,
                   what="the renewed certificate on a new handshake")
        cert.write_text("not a certificate\n")
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "keeping the certificate" in server.output(), 15, what="the refused reload's line")
        assert peer_certificate_cn(server.port, pki.ca.cert) == "renewed.localhost"
        assert server.proc.poll() is None
    assert server.stop() == 0


@pytest.mark.parametrize("option", ["--tls-key", "--dicom-tls-key"])
def test_a_private_key_other_users_can_read_is_refused_in_one_line_exit_2(tiny_onnx, pki, tmp_path, option):
    key = tmp_path / "server.key"
    shutil.copy(pki.server.key, key)
    key.chmod(0o644)
    cert_option = option.replace("-key", "-cert")
    extra = ["--dicom-port", "0"] if option.startswith("--dicom") else []
    proc = subprocess.run([*SERVE, "--model", tiny_onnx[0], "--port", "0", *extra, cert_option, pki.server.cert, option, key],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc  # a usage error, as for any bad option
    assert "readable by other users" in proc.stderr and "chmod 600" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_stow_rs_out_to_an_orthanc_over_https_is_verified_with_send_tls_ca_and_never_without(tiny_onnx, pki, tmp_path):
    """Orthanc behind nginx's HTTPS (Orthanc 1.10.1's own SslEnabled port segfaults on the first request here)."""
    out = tmp_path / "results"
    film = write_dicom(tmp_path / "dx.dcm", radiograph(128, seed=29), DigitalXRayImageStorageForPresentation, 12,
                       patient="HTTPS", BodyPartExamined="CHEST")
    study = str(pydicom.dcmread(film, stop_before_pixels=True).StudyInstanceUID)
    with OrthancDicomWeb(tmp_path / "orthanc") as archive, \
            NginxTls(tmp_path / "nginx", archive.http_port, pki.pacs.cert, pki.pacs.key) as proxy:
        url = f"dicomweb+https://127.0.0.1:{proxy.port}/dicom-web"
        # the system's store does not trust the test CA: the report waits, and the line says why
        with Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--send-to", url, env=NO_PROXY) as node:
            sent = storescu(node_port(node), "XRAY_EDGE", film, calling="MODALITY", extra=())
            assert sent.returncode == 0, sent.stderr
            (waiting,) = wait_until(lambda: events(out, "send_waiting"), 60, what="send_waiting")
            assert "certificate" in waiting["reason"].lower(), waiting
            assert not events(out, "sr_sent") and archive.instances_in_study(study, "SR") == []
        with Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--send-to", url,
                    "--send-tls-ca", pki.ca.cert, env=NO_PROXY):
            (done,) = wait_until(lambda: events(out, "sr_sent"), 60, what="sr_sent over HTTPS")
            srs = archive.instances_in_study(study, "SR")
    assert done["destination"] == url and done["http_status"] == 200, done
    assert srs == [done["sr_sop_instance_uid"]]
    assert list((out / "outbox").iterdir()) == []
