"""The installable service (issue #31, item 7): deploy/xray-serve.service passes `systemd-analyze verify` (on a copy
whose ExecStart is this venv's xray-serve: verify refuses a binary that does not exist) with the hardening the
docs promise, and deploy/xray-serve.yaml, the example --config, starts a real xray-serve with every key it sets
(its paths pointed at the test's files; the ports and binds from the command line, which wins)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT
from serving import Server
from test_dicom_node import node_port
from tls_certs import make_pki

UNIT, EXAMPLE = ROOT / "deploy" / "xray-serve.service", ROOT / "deploy" / "xray-serve.yaml"


def verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)


def test_the_unit_verifies_and_is_hardened(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze missing (Debian's systemd)"
    text = UNIT.read_text()
    serve = Path(sys.executable).parent / "xray-serve"
    copy = tmp_path / "xray-serve.service"
    copy.write_text(text.replace("/opt/xray-edge/bin/xray-serve", str(serve)))
    proc = verify(copy)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr  # a typo'd directive is a warning line
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings["User"] == "xray-serve" and settings["StateDirectory"] == "xray-serve"
    assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    assert settings["Restart"] == "on-failure" and "--config /etc/xray-edge/xray-serve.yaml" in settings["ExecStart"]
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    broken = tmp_path / "broken.service"  # the check can fail: a misspelt value is reported
    broken.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictly"))
    bad = verify(broken)
    assert "strictly" in bad.stderr, bad  # what the first check's empty stderr rules out


def test_the_example_config_starts_xray_serve_with_every_key(tiny_onnx, tmp_path):
    pki = make_pki(tmp_path / "pki")
    key = tmp_path / "api-key"
    key.write_text("a-long-enough-api-key\n")
    pid_key = tmp_path / "patient-id.key"
    pid_key.write_text("0123456789abcdef0123456789abcdef\n")
    files = {"model": tiny_onnx[0], "api-key-file": key, "audit": tmp_path / "audit.jsonl",
             "dicom-tls-cert": pki.server.cert, "dicom-tls-key": pki.server.key, "dicom-tls-ca": pki.ca.cert,
             "results": tmp_path / "results", "patient-id-key": pid_key, "send-tls-ca": pki.ca.cert,
             "send-tls-cert": pki.server.cert, "send-tls-key": pki.server.key}
    config = yaml.safe_load(EXAMPLE.read_text())
    assert set(files) <= set(config), set(files) - set(config)
    config.update({k: str(v) for k, v in files.items()})
    copy = tmp_path / "xray-serve.yaml"
    copy.write_text(yaml.safe_dump(config))
    with Server("--config", copy, "--dicom-host", "127.0.0.1", "--dicom-port", 0, "--host", "127.0.0.1") as s:
        port = node_port(s)
        output = s.output()
    assert port > 0 and "without TLS" not in output
    assert (tmp_path / "audit.jsonl").stat().st_mode & 0o777 == 0o600
    started = yaml.safe_load((tmp_path / "audit.jsonl").read_text().splitlines()[0])
    settings = started["settings"]
    assert settings["dicom_tls"] and settings["dicom_client_certificates"] and settings["api_key"]
    assert settings["ae_certificates"] == {"CR_ROOM1": "cr-room1.radiology.example", "PACS": "pacs.radiology.example"}
    assert settings["send_to"].startswith("PACS@pacs.radiology.example:104") and settings["send_tls"]
    assert settings["log_patient_id"] == "hash"
