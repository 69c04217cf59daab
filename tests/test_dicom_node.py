"""The DICOM node (xray-serve --dicom-port) with real associations on 127.0.0.1: C-ECHO, C-STORE of the
real chest CR and of generated DX / Secondary Capture files, results equal to xray-infer's, SRs arriving
at a test SCP playing the PACS, refusals, limits, and 50 instances over 4 simultaneous associations."""
from __future__ import annotations

import json
import re
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from conftest import run_command, run_script, xray_infer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (ComprehensiveSRStorage, CTImageStorage, DigitalXRayImageStorageForPresentation,
                                  SecondaryCaptureImageStorage, Verification)
from serving import SERVE, Server
from test_infer import radiograph

pytestmark = pytest.mark.slow
STORAGE = [DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage,
           "1.2.840.10008.5.1.4.1.1.1"]  # CR


def write_dicom(path: Path, image: np.ndarray, sop_class, bits: int, *, patient="P001", study=None, **extra) -> Path:
    """A radiograph in [0, 1] as a MONOCHROME2 DICOM file with `bits` stored bits (8, 12 or 16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = patient, "Test^Patient", "OT" if sop_class == SecondaryCaptureImageStorage else "DX"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8 if bits == 8 else 16), bits, bits - 1
    dtype = np.uint8 if bits == 8 else np.uint16
    ds.PixelData = np.rint(image * (2 ** bits - 1)).astype(dtype).tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory):
    from test_common_imageio import _find_rg1

    root = tmp_path_factory.mktemp("dicoms")
    cr = _find_rg1()
    assert cr is not None, "RG1_UNCR.dcm (pydicom-data) is not installed"
    files = {"cr": Path(cr)}
    for i, (name, sop, bits) in enumerate((("dx16", DigitalXRayImageStorageForPresentation, 16),
                                           ("dx12", DigitalXRayImageStorageForPresentation, 12),
                                           ("sc8", SecondaryCaptureImageStorage, 8))):
        files[name] = write_dicom(root / f"{name}.dcm", radiograph(640 + 64 * i, seed=30 + i), sop, bits,
                                  patient=f"P{i:03d}")
    files["lateral"] = write_dicom(root / "lateral.dcm", radiograph(600, seed=40), DigitalXRayImageStorageForPresentation,
                                   16, ViewPosition="LL", BodyPartExamined="CHEST")
    files["hand"] = write_dicom(root / "hand.dcm", radiograph(600, seed=41), DigitalXRayImageStorageForPresentation,
                                16, BodyPartExamined="HAND")
    corrupt = pydicom.dcmread(files["dx16"])
    corrupt.PixelData = corrupt.PixelData[: len(corrupt.PixelData) // 3]
    corrupt.SOPInstanceUID = corrupt.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    files["corrupt"] = root / "corrupt.dcm"
    corrupt.save_as(files["corrupt"], enforce_file_format=True)
    return files


class Pacs:
    """A Storage SCP playing the PACS: keeps every SR it receives."""

    def __init__(self):
        self.received, self.arrived = [], threading.Event()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context(SecondaryCaptureImageStorage)
        ae.add_supported_context(Verification)

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            self.arrived.set()
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self.server.server_address[1]

    def wait_for(self, n: int, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.received


def wait_until(condition, timeout: float = 30, what: str = "condition"):
    """Poll `condition()` until it is truthy (returned) or the deadline passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def srs_for(pacs: Pacs, source_uids) -> dict:
    """{source SOP Instance UID: the SR the PACS received for it}, once every one has arrived."""
    from xray.serve.dicom.sr import summarize_sr

    def found():
        out = {}
        for ds in list(pacs.received):
            if ds.SOPClassUID == ComprehensiveSRStorage:
                for uid in summarize_sr(ds)["references"]:
                    out[uid] = ds
        return out if set(source_uids) <= set(out) else None

    return wait_until(found, what=f"SRs of {len(source_uids)} instances at the PACS")


def node_port(server: Server) -> int:
    return int(re.search(r"DICOM node \S+ listening on 127\.0\.0\.1:(\d+)", server.output()).group(1))


def scu(calling="MODALITY", contexts=(Verification, *STORAGE)) -> AE:
    ae = AE(ae_title=calling)
    for cx in contexts:
        ae.add_requested_context(cx)
    return ae


def results(folder: Path) -> list[dict]:
    path = folder / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def instances(folder: Path) -> dict:
    return {r["sop_instance_uid"]: r for r in results(folder) if r["event"] == "instance"}


@pytest.fixture(scope="module")
def node(tiny_onnx, tmp_path_factory):
    pacs = Pacs()
    out = tmp_path_factory.mktemp("node_results")
    with Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--allow-ae", "MODALITY",
                "--allow-ae", "LOADTEST", "--send-to", f"PACS@127.0.0.1:{pacs.port}") as s:
        yield s, node_port(s), out, pacs
    pacs.server.shutdown()


def store(port: int, paths, calling="MODALITY") -> list[int]:
    assoc = scu(calling).associate("127.0.0.1", port, ae_title="XRAY_EDGE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(pydicom.dcmread(p)).Status for p in paths]
    finally:
        assoc.release()


def test_c_echo(node):
    _, port, _, _ = node
    assoc = scu().associate("127.0.0.1", port, ae_title="XRAY_EDGE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_c_store_results_equal_xray_infer_and_srs_reach_the_pacs(node, dicoms, tiny_onnx):
    from xray.serve.dicom.sr import summarize_sr

    _, port, out, pacs = node
    names = ("cr", "dx16", "dx12", "sc8")
    assert store(port, [dicoms[n] for n in names]) == [0x0000] * 4
    cli = {Path(p["file"]).name: p for p in json.loads(xray_infer("--model", tiny_onnx[0],
                                                                    *[dicoms[n] for n in names], "-f", "json").stdout)["predictions"]}
    logged = instances(out)
    for n in names:
        ds = pydicom.dcmread(dicoms[n], stop_before_pixels=True)
        rec = logged[ds.SOPInstanceUID]
        assert rec["status"] == "classified" and rec["calling_ae"] == "MODALITY"
        assert rec["study_instance_uid"] == ds.StudyInstanceUID and rec["series_instance_uid"] == ds.SeriesInstanceUID
        assert rec["patient_id"] == str(ds.PatientID) and rec["model"]["name"] == "efficientnet_lite0"
        assert len(rec["model"]["checkpoint_sha256"]) in (0, 64) and rec["timing"]["total_ms"] > 0
        ref = cli[dicoms[n].name]
        assert rec["prediction"] == ref["prediction"]
        for c, p in ref["probabilities"].items():
            assert rec["probabilities"][c] == pytest.approx(p, abs=1e-6), (n, c)
    import highdicom as hd

    sources = [pydicom.dcmread(dicoms[n], stop_before_pixels=True).SOPInstanceUID for n in names]
    by_source = srs_for(pacs, sources)
    for n in names:
        ds = pydicom.dcmread(dicoms[n], stop_before_pixels=True)
        sr = by_source[ds.SOPInstanceUID]
        hd.sr.ComprehensiveSR.from_dataset(sr)  # validates as an SR highdicom can read
        summary = summarize_sr(sr)
        assert summary["intended_use"].startswith("Research use only")
        assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.SOPClassUID == ComprehensiveSRStorage
        assert summary["finding"].lower() == logged[ds.SOPInstanceUID]["prediction"].lower()
        for c, p in logged[ds.SOPInstanceUID]["probabilities"].items():
            assert summary["probabilities"][c] == pytest.approx(p, abs=1e-6)
    sent = wait_until(lambda: {r["sop_instance_uid"]: r for r in results(out) if r["event"] == "sr_sent"}.keys()
                      >= set(sources) and [r for r in results(out) if r["event"] == "sr_sent"], what="sr_sent lines")
    for r in sent:
        if r["sop_instance_uid"] in sources:
            assert r["sr_sop_instance_uid"] == by_source[r["sop_instance_uid"]].SOPInstanceUID
            assert r["status"] == "0x0000" and r["attempts"] >= 1 and "already_stored" not in r


def test_non_chest_instances_are_logged_with_a_reason_and_get_no_diagnosis(node, dicoms):
    _, port, out, pacs = node
    before = len(pacs.received)
    assert store(port, [dicoms["lateral"], dicoms["hand"], dicoms["corrupt"], dicoms["dx16"]]) == [0x0000] * 4
    logged = instances(out)
    uid = lambda n: pydicom.dcmread(dicoms[n], stop_before_pixels=True).SOPInstanceUID  # noqa: E731
    lateral, hand, corrupt = logged[uid("lateral")], logged[uid("hand")], logged[uid("corrupt")]
    assert lateral["status"] == "not_classified" and "lateral view" in lateral["reason"] and "prediction" not in lateral
    assert hand["status"] == "not_classified" and "BodyPartExamined HAND" in hand["reason"]
    assert corrupt["status"] == "error" and "pixel data" in corrupt["reason"] and "prediction" not in corrupt
    assert logged[uid("dx16")]["status"] == "classified"  # the next instance still works
    # reports go out in the order they were written: once dx16's has arrived, any for the others would have too
    srs_for(pacs, [uid("dx16")])
    from xray.serve.dicom.sr import summarize_sr

    refs = {u for sr in pacs.received[before:] for u in summarize_sr(sr)["references"]}
    assert uid("lateral") not in refs and uid("hand") not in refs and uid("corrupt") not in refs


def test_non_image_sop_class_is_refused_in_negotiation(node):
    _, port, out, _ = node
    ae = scu(contexts=(Verification, CTImageStorage, "1.2.840.10008.5.1.4.1.1.88.11"))  # CT, Basic Text SR
    assoc = ae.associate("127.0.0.1", port, ae_title="XRAY_EDGE")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assert accepted == {Verification}
    assoc.release()
    refused = [r for r in results(out) if r["event"] == "contexts_refused"]
    assert refused and "CT Image Storage" in refused[-1]["sop_classes"] and "Basic Text SR Storage" in refused[-1]["sop_classes"]


def test_unknown_calling_ae_is_rejected(node):
    _, port, out, _ = node
    assoc = scu("STRANGER").associate("127.0.0.1", port, ae_title="XRAY_EDGE")
    assert assoc.is_rejected and not assoc.is_established
    wait_until(lambda: any(r["event"] == "association_rejected" and r["calling_ae"] == "STRANGER"
                           for r in results(out)), what="the rejection in results.jsonl")


def test_wrong_called_ae_is_rejected(node):
    _, port, out, _ = node
    assoc = scu().associate("127.0.0.1", port, ae_title="SOMEONE_ELSE")
    assert assoc.is_rejected and not assoc.is_established
    wait_until(lambda: any(r["event"] == "association_rejected" and r.get("called_ae") == "SOMEONE_ELSE"
                           for r in results(out)), what="the rejection in results.jsonl")


def test_fifty_instances_over_four_associations_none_lost(node, dicoms, tmp_path):
    _, port, out, _ = node
    files = []
    for i in range(50):
        files.append(write_dicom(tmp_path / f"load{i:02d}.dcm", radiograph(256, seed=100 + i % 5),
                                 DigitalXRayImageStorageForPresentation, 12, patient=f"L{i:02d}"))
    statuses = {}

    def worker(k):
        statuses[k] = store(port, files[k::4], calling="LOADTEST")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(len(v) for v in statuses.values()) == 50 and all(s == 0 for v in statuses.values() for s in v)
    logged = instances(out)
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert uids <= set(logged) and all(logged[u]["status"] == "classified" for u in uids)


def test_instance_size_limit_and_failed_sends_never_block_receiving(tiny_onnx, dicoms, tmp_path):
    out = tmp_path / "results"
    # nothing listens on the --send-to port: every report waits in the outbox, and receiving goes on
    with Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--max-instance-mb", 2,
                "--send-to", "NOBODY@127.0.0.1:9", "--send-backoff-max-s", 1, "--max-associations", 2) as s:
        port = node_port(s)
        held = [scu().associate("127.0.0.1", port, ae_title="XRAY_EDGE") for _ in range(2)]
        assert all(a.is_established for a in held)
        third = scu().associate("127.0.0.1", port, ae_title="XRAY_EDGE")  # over --max-associations 2
        assert third.is_rejected
        for a in held:
            a.release()

        def associate():  # the node frees the slots as the released associations' threads end
            assoc = scu().associate("127.0.0.1", port, ae_title="XRAY_EDGE")
            return assoc if assoc.is_established else None

        assoc = wait_until(associate, 10, "an association after the held ones were released")
        start = time.monotonic()
        assert assoc.send_c_store(pydicom.dcmread(dicoms["dx16"])).Status == 0x0000
        assert time.monotonic() - start < 5  # answered while the SR send is failing
        status = assoc.send_c_store(pydicom.dcmread(dicoms["cr"]))  # 7 MB > 2 MB: the node aborts
        assert getattr(status, "Status", None) != 0x0000
        wait_until(lambda: not assoc.is_established, 10, "the requestor to notice the A-ABORT")
        assert assoc.is_aborted
        assert store(port, [dicoms["sc8"]]) == [0x0000]  # the next association works
        health = wait_until(lambda: requests.get(s.url + "/health/ready", timeout=5).json()["outbox"]["backlog"] == 2
                            and requests.get(s.url + "/health/ready", timeout=5).json(), what="2 reports waiting")
        assert health["outbox"]["destination"] == "NOBODY@127.0.0.1:9" and health["outbox"]["oldest_age_s"] > 0
        assert s.metrics()["xray_dicom_outbox_backlog"] == 2
        wait_until(lambda: any(r["event"] == "send_waiting" for r in results(out)), what="send_waiting")
    log = results(out)
    assert any(r["event"] == "association_aborted" and "2 MB limit" in r["reason"] for r in log)
    assert not [r for r in log if r["event"].startswith(("sr_", "sc_"))]  # nothing delivered, refused or expired
    waiting = [r for r in log if r["event"] == "send_waiting"]
    assert "NOBODY@127.0.0.1:9" in waiting[0]["destination"]
    assert len([p for p in (out / "outbox").iterdir() if p.is_dir()]) == 2  # still on disk after the stop
    assert stat.S_IMODE((out / "outbox").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "results.jsonl").stat().st_mode) == 0o600


def test_bad_dicom_options_exit_2(tiny_onnx):
    for args, words in ((["--dicom-port", 0, "--send-to", "PACS-host-104"], "expected AE_TITLE@HOST:PORT"),
                        (["--allow-ae", "X"], "add --dicom-port"),
                        (["--dicom-port", 0, "--send-heatmap"], "--send-heatmap needs --send-to"),
                        (["--dicom-port", 0, "--ae-title", "A_TITLE_LONGER_THAN_16"], "1 to 16 characters")):
        proc = run_command([*SERVE, "--model", tiny_onnx[0], *args], check=False, timeout=60)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def test_heatmap_secondary_capture_with_the_sr(exported, tmp_path):
    """--send-heatmap: with each SR of a diagnosed instance, the overlay as an RGB Secondary Capture in the same
    study, pointing at its source; none for an instance the guard flagged."""
    from PIL import Image
    from xray.serve.dicom.sr import summarize_sr

    folder, _ = exported
    test_split = folder.parent.parent / "data" / "test"
    files = []
    for i, png in enumerate(sorted(test_split.glob("*/*"))[::10][:4]):  # in-distribution images of the run
        gray = np.asarray(Image.open(png).convert("L"), np.float64) / 255
        files.append(write_dicom(tmp_path / f"sc{i}.dcm", gray, SecondaryCaptureImageStorage, 8, patient=f"H{i}"))
    pacs = Pacs()
    out = tmp_path / "results"
    try:
        with Server("--model", folder / "model.onnx", "--dicom-port", 0, "--results", out, "--send-heatmap",
                    "--send-to", f"PACS@127.0.0.1:{pacs.port}") as s:
            assert store(node_port(s), files) == [0x0000] * len(files)
            logged = instances(out)
            diagnosed = [u for u, r in logged.items() if r["status"] == "classified"]
            assert diagnosed, "the guard flagged every in-distribution test image"
            received = pacs.wait_for(len(files) + len(diagnosed))
        heatmaps = [d for d in received if d.SOPClassUID == SecondaryCaptureImageStorage]
        srs = [d for d in received if d.SOPClassUID == ComprehensiveSRStorage]
        assert len(srs) == len(files) and len(heatmaps) == len(diagnosed)
        for sc in heatmaps:
            source = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
            assert source in diagnosed
            assert sc.StudyInstanceUID == logged[source]["study_instance_uid"]
            assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
            rgb = sc.pixel_array
            assert rgb.shape[2] == 3 and (rgb[..., 0] != rgb[..., 2]).any()  # coloured: the map is drawn
        sent = {r["sop_instance_uid"]: r for r in results(out) if r["event"] == "sc_sent"}  # logged apart
        assert all(sent[u]["heatmap_sop_instance_uid"] == logged[u]["heatmap_sop_instance_uid"] for u in diagnosed)
        assert {summarize_sr(sr)["references"][0] for sr in srs} == set(logged)
    finally:
        pacs.server.shutdown()


def test_send_dicom_script_stores_a_folder(node, dicoms, tmp_path):
    _, port, out, _ = node
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("dx16", "sc8"):
        (folder / f"{name}.dcm").write_bytes(dicoms[name].read_bytes())
    proc = run_script("send_dicom", folder, "--to", f"XRAY_EDGE@127.0.0.1:{port}", "--calling-ae", "MODALITY",
                      "--associations", 2, "--repeat", 2)
    assert "C-ECHO: 0x0000" in proc.stdout and "4 of 4 instances stored" in proc.stdout
    proc = run_script("send_dicom", folder, "--to", f"XRAY_EDGE@127.0.0.1:{port}", "--calling-ae", "NOT_ALLOWED",
                      check=False)
    assert proc.returncode != 0 and "no association" in proc.stderr


def test_stopping_the_sender_ends_its_back_off_at_once_and_the_next_one_delivers(dicoms, tmp_path):
    """A PACS that is down and a 10 s back-off: stop() does not wait it out, the report stays on disk with no
    terminal line, and a sender started later over the same outbox delivers it once."""
    from xray.serve.dicom.node import Destination
    from xray.serve.dicom.outbox import Outbox
    from xray.serve.dicom.results_log import ResultsLog
    from xray.serve.dicom.sender import Sender
    from xray.serve.dicom.sr import build_sr

    record = {"prediction": "NORMAL", "probability": 0.7, "probabilities": {"NORMAL": 0.7, "PNEUMONIA": 0.2,
              "TUBERCULOSIS": 0.1}, "ood": False, "ood_score": 1.0}
    model = {"name": "efficientnet_lite0", "precision": "int8", "checkpoint_sha256": "ab" * 32, "version": "0"}
    source = pydicom.dcmread(dicoms["dx16"])
    log = ResultsLog(tmp_path)
    outbox = Outbox(tmp_path)
    entry = outbox.put(source.SOPInstanceUID, [build_sr(source, record, model)])
    sender = Sender(Destination("NOBODY", "127.0.0.1", 9), outbox, log, "XRAY_EDGE", backoff_max_s=10,
                    backoff_base_s=10)
    sender.start()
    wait_until(lambda: any(r["event"] == "send_waiting" for r in results(tmp_path)), 10, "the first failed round")
    start = time.monotonic()
    sender.stop()
    assert time.monotonic() - start < 5
    assert not [r for r in results(tmp_path) if r["event"].startswith("sr_")]
    assert Outbox(tmp_path).backlog() == 1  # still there for the next start

    pacs = Pacs()
    try:
        sender = Sender(Destination("PACS", "127.0.0.1", pacs.port), Outbox(tmp_path), log, "XRAY_EDGE")
        sender.start()
        sent = wait_until(lambda: [r for r in results(tmp_path) if r["event"] == "sr_sent"], 20, "sr_sent")
        sender.stop()
    finally:
        pacs.server.shutdown()
        log.close()
    assert len(sent) == 1 and sent[0]["sop_instance_uid"] == source.SOPInstanceUID
    assert [d.SOPInstanceUID for d in pacs.received] == [entry.sr_uid] == [sent[0]["sr_sop_instance_uid"]]
    assert not list((tmp_path / "outbox").iterdir())
