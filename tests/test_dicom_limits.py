"""The DICOM node's protective limits, each with a live node on 127.0.0.1: an oversized PDU is aborted from its
header, the Deflated transfer syntax is refused in negotiation, a saturated server answers 0xA700 (which
modalities retry) and recovers, SIGTERM ends associations in progress and exits 0, and the outbox survives a
crash mid-write."""
from __future__ import annotations

import json
import signal
import socket
import struct
import time

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
from serving import Server
from test_dicom_node import dicoms, node_port, results, scu, wait_until  # noqa: F401 (dicoms is a fixture)

pytestmark = pytest.mark.slow


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.fixture(scope="module")
def node(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("limits")
    with Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--max-queue", 1) as s:
        yield s, node_port(s), out


def test_oversized_pdus_are_aborted_from_their_header(node, dicoms):
    server, port, _ = node
    before = vm_hwm_kb(server.proc.pid)
    # an A-ASSOCIATE-RQ announcing 200 MB: answered with an A-ABORT (type 0x07) at once, nothing buffered
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x01\x00" + struct.pack(">L", 200_000_000) + b"\x00" * 64)
        answer = s.recv(6)
    assert answer[:1] == b"\x07", answer
    # a P-DATA-TF longer than the advertised maximum on an established association: aborted
    assoc = scu().associate("127.0.0.1", port, ae_title="XRAY_EDGE")
    assert assoc.is_established and assoc.acceptor.maximum_length == 65536
    assoc.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">L", 300_000_000) + b"\x00" * 1024)
    wait_until(lambda: not assoc.is_established, 10, "the node to abort the association")
    assert assoc.is_aborted
    assert vm_hwm_kb(server.proc.pid) - before < 100_000  # neither 200 nor 300 MB was allocated
    assert "exceeds this node's maximum" in server.output()
    assoc = scu().associate("127.0.0.1", port, ae_title="XRAY_EDGE")  # the node is fine
    assert assoc.is_established and assoc.send_c_store(pydicom.dcmread(dicoms["dx16"])).Status == 0x0000
    assoc.release()


def test_deflated_transfer_syntax_is_refused_in_negotiation(node):
    _, port, out = node
    ae = scu(contexts=())
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="XRAY_EDGE")
    assert assoc.is_established
    assert {str(cx.abstract_syntax) for cx in assoc.accepted_contexts} == {Verification}
    assoc.release()
    ae = scu(contexts=())
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, [DeflatedExplicitVRLittleEndian,
                                                                      ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="XRAY_EDGE")  # offered with another: that one is chosen
    assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [ExplicitVRLittleEndian]
    assoc.release()


def test_a_saturated_server_answers_out_of_resources_then_recovers(node, dicoms):
    """--max-queue 1 is the model worker's budget for HTTP and DICOM together: an upload that holds it makes
    the C-STORE answer 0xA700 (the modality sends it again), and the next C-STORE is stored."""
    server, port, out = node
    ds = pydicom.dcmread(dicoms["dx12"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as held:
        held.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
                     b"\x89PNG")  # admitted, then waiting for the rest of its body
        wait_until(lambda: server.metrics()["xray_requests_in_flight"] == 1, 10, "the upload to be admitted")
        assoc = scu().associate("127.0.0.1", port, ae_title="XRAY_EDGE")
        assert assoc.send_c_store(ds).Status == 0xA700
        assoc.release()
    wait_until(lambda: server.metrics()["xray_requests_in_flight"] == 0, 10, "the upload's slot to be freed")
    assoc = scu().associate("127.0.0.1", port, ae_title="XRAY_EDGE")
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    lines = [r for r in results(out) if r["event"] == "instance" and r["sop_instance_uid"] == ds.SOPInstanceUID]
    assert [r["status"] for r in lines] == ["deferred", "classified"] and "0xA700" in lines[0]["reason"]


def test_sigterm_ends_open_associations_and_exits_0(tiny_onnx, tmp_path):
    out = tmp_path / "results"
    server = Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--send-to", "PACS@127.0.0.1:9")
    port = node_port(server)
    held = scu().associate("127.0.0.1", port, ae_title="XRAY_EDGE")
    assert held.is_established
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    def refused():  # no new associations while the held one keeps the process draining
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return True
        return False

    wait_until(refused, 10, "the node to stop listening")
    assert server.proc.poll() is None
    assert held.send_c_echo().Status == 0x0000  # the open association still works while draining
    assert server.proc.wait(30) == 0
    assert time.monotonic() - start < 30
    log = results(out)
    assert any(r["event"] == "association_aborted" and "shutting down" in r["reason"] for r in log)
    assert log[-1]["event"] == "node_stopped" and log[-1]["outbox_backlog"] == 0
    server.stop()


def test_outbox_drops_half_written_results_and_keeps_whole_ones(tmp_path, dicoms):
    """A crash mid-write leaves a .tmp- folder (never acknowledged, so the modality resends): removed on start.
    A whole result is found again, with its SR's UID unchanged."""
    from xray.serve.dicom.outbox import Outbox
    from xray.serve.dicom.sr import build_sr

    record = {"prediction": "NORMAL", "probability": 0.9, "probabilities": {"NORMAL": 0.9, "PNEUMONIA": 0.1}}
    source = pydicom.dcmread(dicoms["dx16"])
    outbox = Outbox(tmp_path)
    entry = outbox.put(source.SOPInstanceUID, [build_sr(source, record, {"name": "m"})])
    half = tmp_path / "outbox" / ".tmp-0000000000001-deadbeef"
    half.mkdir()
    (half / "sr.dcm").write_bytes(b"DICM partial")
    damaged = tmp_path / "outbox" / "0000000000002-0badf00d"  # not ours, or edited by hand: reported, never sent
    damaged.mkdir()
    again = Outbox(tmp_path)
    assert not half.exists() and again.unreadable == [damaged] and damaged.exists()
    (resumed,) = again.entries()
    assert resumed.path == entry.path and resumed.sr_uid == entry.sr_uid == str(resumed.datasets()[0].SOPInstanceUID)
    assert resumed.objects[0]["kind"] == "sr" and resumed.pending() == resumed.objects
    again.mark(resumed, resumed.objects[0], "refused", status=0xA900, reason="test")
    kept = tmp_path / "refused" / entry.name
    status = json.loads((kept / "status.json").read_text())
    assert again.backlog() == 0 and status["state"] == "refused" and status["objects"]["sr.dcm"]["status"] == 0xA900
    assert (kept / "sr.dcm").exists() and Outbox(tmp_path).backlog() == 0


def test_patient_ids_hashed_with_a_key_or_omitted(tmp_path):
    from xray.common.errors import XrayError
    from xray.serve.dicom.results_log import PatientIdPolicy, ResultsLog

    key = tmp_path / "key"
    key.write_text("a-secret-of-some-length\n")
    for policy in ("keep", "hash", "omit"):
        log = ResultsLog(tmp_path / policy, PatientIdPolicy(policy, key))
        log.write("instance", patient_id="P001")
        log.write("instance", patient_id="P001")
        log.close()
    keep, hashed, omitted = ([json.loads(line) for line in (tmp_path / p / "results.jsonl").read_text().splitlines()]
                             for p in ("keep", "hash", "omit"))
    assert keep[0]["patient_id"] == "P001"
    assert "patient_id" not in hashed[0] and hashed[0]["patient_id_hmac"] == hashed[1]["patient_id_hmac"]
    assert "P001" not in json.dumps(hashed) and "P001" not in json.dumps(omitted)
    other = tmp_path / "other"
    other.write_text("another-secret-of-some-length\n")
    assert PatientIdPolicy("hash", other).apply({"patient_id": "P001"}) != {"patient_id_hmac": hashed[0]["patient_id_hmac"]}
    with pytest.raises(XrayError, match="needs --patient-id-key"):
        PatientIdPolicy("hash")


def test_node_beyond_loopback_without_allow_ae_warns(tiny_onnx, tmp_path):
    """127.0.0.2 is not one of the loopback names the node trusts (it is still this machine): it warns that any
    calling AE is accepted; with --allow-ae it does not."""
    import subprocess

    from serving import SERVE

    def log_of(*extra) -> str:
        log = tmp_path / f"serve{len(extra)}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([*SERVE, "--model", tiny_onnx[0], "--host", "127.0.0.2", "--port", "0",
                                     "--dicom-port", "0", "--results", tmp_path / "r", *extra], stdout=f,
                                    stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "Uvicorn running" in log.read_text() or proc.poll() is not None, 60, "the server")
        finally:
            proc.terminate()
            proc.wait(30)
        return log.read_text()

    assert "accepts any calling AE title" in log_of()
    assert "accepts any calling AE title" not in log_of("--allow-ae", "MODALITY")
