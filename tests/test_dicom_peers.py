"""The DICOM node against real peers on 127.0.0.1 (issue #19, item 6): Orthanc as the PACS that pushes images and
files the reports in their studies; DCMTK as the modality (echoscu, storescu) and a second PACS (storescp), with
dsrdump reading the SR; dicom3tools' dciodvfy judging every object the node sends; and the store-and-forward
outbox: reports survive a PACS outage and a SIGKILL of the node, are delivered exactly once, and a refusal is
kept, not retried. The peers are started by the tests on free loopback ports (tests/peers.py)."""
from __future__ import annotations

import re
import stat
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from peers import (Orthanc, ScriptedPacs, Storescp, dciodvfy, dsrdump, echoscu, events, free_port, img2dcm,
                   storescu, wait_until)
from pynetdicom.sop_class import (ComprehensiveSRStorage, DigitalXRayImageStorageForPresentation,
                                  SecondaryCaptureImageStorage)
from serving import Server
from test_dicom_node import node_port, store, write_dicom
from test_infer import radiograph

pytestmark = pytest.mark.slow
TERMINAL = ("sr_sent", "sr_refused", "sr_expired")


def _jpeg(path: Path, size: int, seed: int) -> Path:
    from PIL import Image

    Image.fromarray(np.uint8(np.rint(radiograph(size, seed=seed) * 255))).save(path, quality=92)
    return path


def _uid(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


def _status(value) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


def _terminal(out: Path, source_uid: str) -> list[dict]:
    return [r for r in events(out, *TERMINAL) if r.get("sop_instance_uid") == source_uid]


def _no_errors(path: Path, what: str) -> list[str]:
    errors, warnings = dciodvfy(path)
    assert errors == [], f"dciodvfy on the {what} ({path.name}):\n" + "\n".join(errors + warnings)
    return warnings


def _failures(out: Path) -> str:
    return "\n".join(f"  {r}" for r in events(out, "sr_refused", "sc_refused", "sr_expired", "send_waiting")) \
        or "  (none)"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The real CR, a generated DX, and img2dcm JPEG Secondary Captures with and without Modality (as real
    archives hold them), all chest."""
    from test_common_imageio import _find_rg1

    root = tmp_path_factory.mktemp("peer_sources")
    cr = _find_rg1()
    assert cr is not None, "RG1_UNCR.dcm (pydicom-data) is not installed"
    return {
        "cr": Path(cr),
        "dx": write_dicom(root / "dx.dcm", radiograph(512, seed=51), DigitalXRayImageStorageForPresentation, 16,
                          patient="PEER_DX", BodyPartExamined="CHEST"),
        "sc_modality": img2dcm(_jpeg(root / "a.jpg", 512, 52), root / "sc_modality.dcm", PatientID="PEER_SC1",
                               PatientName="Peer^One", BodyPartExamined="CHEST", Modality="OT"),
        "sc_no_modality": img2dcm(_jpeg(root / "b.jpg", 512, 53), root / "sc_no_modality.dcm", PatientID="PEER_SC2",
                                  PatientName="Peer^Two", BodyPartExamined="CHEST"),
    }


# ---------------------------------------------------------------------------------------------------- 1. Orthanc
def test_orthanc_pushes_four_kinds_of_chest_image_and_files_every_report_in_its_study(tiny_onnx, sources, tmp_path):
    out = tmp_path / "results"
    with Orthanc(tmp_path / "orthanc") as pacs, \
            Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out,
                   "--send-to", f"ORTHANC@127.0.0.1:{pacs.dicom_port}") as node:
        pacs.add_modality("edge", "XRAY_EDGE", node_port(node))
        assert pacs.echo("edge"), "Orthanc's C-ECHO to the node failed"
        ids = {name: pacs.upload(path) for name, path in sources.items()}
        job = pacs.store_to("edge", list(ids.values()))
        assert job["InstancesCount"] == 4 and job["FailedInstancesCount"] == 0, (job, pacs.log()[-3000:])

        source = {name: {k: _uid(p, k) for k in ("SOPInstanceUID", "StudyInstanceUID", "PatientID")}
                  for name, p in sources.items()}
        logged = {r["sop_instance_uid"]: r for r in events(out, "instance")}
        for name, s in source.items():
            rec = logged.get(s["SOPInstanceUID"])
            assert rec and rec["status"] == "classified" and rec["calling_ae"] == "ORTHANC", (name, rec)

        def reports() -> dict:
            """source name -> (its study's Orthanc ID, the SR instances in it), for the sources that have one."""
            found = {}
            for name, s in source.items():
                studies = pacs.lookup_studies(s["StudyInstanceUID"])
                assert len(studies) == 1, f"{name}: {len(studies)} studies with its StudyInstanceUID"
                srs = [i for ser in pacs.series(studies[0]) if ser["MainDicomTags"].get("Modality") == "SR"
                       for i in ser["Instances"]]
                if srs:
                    found[name] = (studies[0], srs)
            return found

        def settled(found: dict) -> bool:  # every source has its SR in Orthanc, or the node gave up on it
            given_up = {r.get("sop_instance_uid") for r in events(out, "sr_refused", "sr_expired")}
            return all(n in found or s["SOPInstanceUID"] in given_up for n, s in source.items())

        deadline = time.monotonic() + 30
        while not settled(found := reports()) and time.monotonic() < deadline:
            time.sleep(0.25)
        missing = sorted(set(source) - set(found))
        assert not missing, f"no SR in Orthanc for {missing} (the node gave up, or 30 s passed):\n{_failures(out)}"
        downloaded = {name: pacs.download(srs[0], tmp_path / f"{name}.sr.dcm") for name, (_, srs) in found.items()}
        assert all(len(srs) == 1 for _, srs in found.values()), {n: len(srs) for n, (_, srs) in found.items()}

    from xray.serve.dicom.sr import summarize_sr

    for name, path in downloaded.items():
        sr = pydicom.dcmread(path)
        assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
        assert sr.StudyInstanceUID == source[name]["StudyInstanceUID"] and sr.PatientID == source[name]["PatientID"]
        summary = summarize_sr(sr)
        assert source[name]["SOPInstanceUID"] in summary["references"], name
        assert summary["finding"].lower() == logged[source[name]["SOPInstanceUID"]]["prediction"].lower(), name
        _no_errors(path, f"SR of the {name} as Orthanc stored it")
    sent = {r["sop_instance_uid"] for r in events(out, "sr_sent")}
    assert {s["SOPInstanceUID"] for s in source.values()} <= sent


# ---------------------------------------------------------------------------------------------------- 2. DCMTK
def test_dcmtk_modality_and_storescp_pacs_with_the_heatmap(cam_onnx, sources, tmp_path):
    out = tmp_path / "results"
    with Storescp(tmp_path / "storescp", aet="PACS") as pacs, \
            Server("--model", cam_onnx, "--dicom-port", 0, "--results", out, "--send-heatmap",
                   "--send-to", f"PACS@127.0.0.1:{pacs.port}") as node:
        port = node_port(node)
        echo = echoscu(port, "XRAY_EDGE", calling="MODALITY")
        assert echo.returncode == 0, echo.stderr
        sent = storescu(port, "XRAY_EDGE", sources["sc_no_modality"], calling="MODALITY")  # JPEG baseline: -xy
        assert sent.returncode == 0 and "Store Failed" not in sent.stderr, sent.stderr
        uid = _uid(sources["sc_no_modality"])
        rec = wait_until(lambda: next((r for r in events(out, "instance") if r["sop_instance_uid"] == uid), None), 30,
                         what="the instance event")
        assert rec["status"] == "classified" and rec["calling_ae"] == "MODALITY", rec
        done = wait_until(lambda: _terminal(out, uid), 30, what="the report's outcome")
        assert done[0]["event"] == "sr_sent", f"the report was not sent:\n{_failures(out)}"
        (heatmap,) = wait_until(lambda: events(out, "sc_sent", "sc_refused", "sc_expired"), 30,
                                what="the heatmap's outcome")
        assert heatmap["event"] == "sc_sent" and heatmap["entry"] == done[0]["entry"] == rec["entry"], heatmap
    received = {}
    for f in pacs.files():
        ds = pydicom.dcmread(f)
        received.setdefault(str(ds.SOPClassUID), []).append((f, ds))
    srs, scs = received.get(ComprehensiveSRStorage, []), received.get(SecondaryCaptureImageStorage, [])
    assert len(srs) == 1 and len(scs) == 1, {k: [f.name for f, _ in v] for k, v in received.items()}

    sr_path, sr = srs[0]
    assert str(sr.SOPInstanceUID) == done[0]["sr_sop_instance_uid"] and sr.StudyInstanceUID == _uid(
        sources["sc_no_modality"], "StudyInstanceUID")
    dump = dsrdump(sr_path)
    meaning = {"NORMAL": "Normal", "PNEUMONIA": "Pneumonia", "TUBERCULOSIS": "Tuberculosis"}[rec["prediction"]]
    assert re.search(rf'"Finding"\)=\([^)]*"{meaning}"\)', dump), dump[:3000]
    _no_errors(sr_path, "SR storescp received")

    sc_path, sc = scs[0]
    assert str(sc.SOPInstanceUID) == heatmap["heatmap_sop_instance_uid"] == rec["heatmap_sop_instance_uid"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == uid and sc.StudyInstanceUID == sr.StudyInstanceUID
    _no_errors(sc_path, "heatmap Secondary Capture storescp received")
    assert sc.BurnedInAnnotation == "YES", "the caption is drawn into the heatmap's pixels"


# ---------------------------------------------------------------------------------------------------- 3. outbox
def _pending(out: Path) -> list[Path]:
    return [p for p in (out / "outbox").iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_reports_survive_a_pacs_outage_and_a_sigkill_mid_send_and_each_is_logged_once(tiny_onnx, tmp_path):
    """A PACS outage longer than the old retry budget, then a slow PACS and a SIGKILL while the outbox drains into
    it (sends in flight): after the restart every report is delivered, each logged by exactly one sr_sent, and
    the PACS holds each SR UID: the one cut mid-send arrives again as the very same object (same UID)."""
    out, pacs_port = tmp_path / "results", free_port()  # reserved: nothing listens there yet (the PACS is down)
    files = [write_dicom(tmp_path / f"dx{i}.dcm", radiograph(256, seed=60 + i), DigitalXRayImageStorageForPresentation,
                         12, patient=f"OUT{i}") for i in range(6)]
    uids = [_uid(f) for f in files]
    args = ("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--send-to", f"PACS@127.0.0.1:{pacs_port}",
            "--send-backoff-max-s", 1)
    with Server(*args) as node:
        down_since = time.monotonic()
        assert store(node_port(node), files) == [0x0000] * 6
        wait_until(lambda: {r["sop_instance_uid"] for r in events(out, "instance")} >= set(uids), 30,
                   what="6 instance events")
        while time.monotonic() < down_since + 20:  # a PACS outage longer than the old 15 s of retries
            assert not events(out, *TERMINAL), _failures(out)
            time.sleep(0.5)
        assert len(_pending(out)) == 6
        with ScriptedPacs(port=pacs_port, status=lambda ds: time.sleep(0.7) or 0x0000) as slow:  # up, but slow
            wait_until(lambda: len(slow.received) >= 2, 30, what="the outbox draining into the slow PACS")
            node.proc.kill()  # SIGKILL mid-round: a C-STORE in flight, no shutdown, no flushing
            node.proc.wait(30)
            before = slow.counts()
    delivered_before = {r["sr_sop_instance_uid"] for r in events(out, "sr_sent")}
    assert 1 <= len(delivered_before) < 6, delivered_before
    # a kill that lands after a line and before its folder goes leaves that folder (the restart reads the line)
    assert 6 - len(delivered_before) <= len(_pending(out)) <= 7 - len(delivered_before), delivered_before
    with ScriptedPacs(port=pacs_port) as pacs, Server(*args):
        wait_until(lambda: all(_terminal(out, u) for u in uids), 30, what="6 terminal report events after the restart")
    counts = before + pacs.counts()
    for u in uids:
        (term,) = _terminal(out, u)  # exactly one terminal line per report, across the kill
        assert term["event"] == "sr_sent" and term["sop_instance_uid"] == u, term
        assert 1 <= counts[term["sr_sop_instance_uid"]] <= 2, (term, counts)
    assert len(counts) == 6, counts  # the same six objects, whatever was resent
    assert not (set(pacs.counts()) & delivered_before), "a report logged as sent before the kill was sent again"
    assert _pending(out) == [] and not events(out, "sr_refused", "sr_expired")
    assert stat.S_IMODE((out / "results.jsonl").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "outbox").stat().st_mode) == 0o700


def test_a_kill_between_a_send_and_its_line_resends_the_same_object_and_logs_it_once(tiny_onnx, tmp_path):
    """The one moment a random kill cannot hit (the object is in the PACS, its line not yet written), held open by
    the sender's test pause: after the restart the report goes again as the same object (same UID: the PACS has
    one report) and results.jsonl has one sr_sent for it."""
    out, dx = tmp_path / "results", write_dicom(tmp_path / "dx.dcm", radiograph(256, seed=66),
                                                DigitalXRayImageStorageForPresentation, 12, patient="PAUSE")
    with ScriptedPacs() as pacs:
        args = ("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out, "--send-to", f"PACS@127.0.0.1:{pacs.port}")
        with Server(*args, env={"XRAY_TEST_PAUSE_AFTER_SEND_S": "60"}) as node:
            assert store(node_port(node), [dx]) == [0x0000]
            wait_until(lambda: "test pause after send" in node.output(), 30, what="the sender's pause after the send")
            node.proc.kill()
            node.proc.wait(30)
        assert list(pacs.counts().values()) == [1] and not events(out, *TERMINAL)
        with Server(*args):
            (term,) = wait_until(lambda: _terminal(out, _uid(dx)), 30, what="the report after the restart")
        assert pacs.counts() == {term["sr_sop_instance_uid"]: 2}, pacs.counts()  # one object, sent twice
    (instance,) = events(out, "instance")
    assert term["event"] == "sr_sent" and term["entry"] == instance["entry"] and _pending(out) == []


# ---------------------------------------------------------------------------------------------------- 4. refused
def test_a_refused_report_is_kept_and_a_warning_or_a_duplicate_counts_as_sent(tiny_onnx, tmp_path):
    out = tmp_path / "results"
    answer = {"sr": 0xA900}  # "data set does not match SOP class": a permanent refusal
    files = [write_dicom(tmp_path / f"dx{i}.dcm", radiograph(256, seed=70 + i), DigitalXRayImageStorageForPresentation,
                         12, patient=f"REF{i}") for i in range(3)]
    refused_uid, warned_uid, duplicate_uid = (_uid(f) for f in files)
    with ScriptedPacs(status=lambda ds: answer["sr"] if ds.SOPClassUID == ComprehensiveSRStorage else 0) as pacs, \
            Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out,
                   "--send-to", f"PACS@127.0.0.1:{pacs.port}", "--send-backoff-max-s", 1) as node:
        port = node_port(node)
        assert store(port, files[:1]) == [0x0000]
        wait_until(lambda: _terminal(out, refused_uid), 30, what="the refusal")
        answer["sr"] = 0xB000  # "coercion of data elements": stored, with a warning
        assert store(port, files[1:2]) == [0x0000]
        wait_until(lambda: _terminal(out, warned_uid), 30, what="the warned report's outcome")
        answer["sr"] = 0x0111  # "duplicate SOP instance": the archive has it already
        assert store(port, files[2:]) == [0x0000]
        wait_until(lambda: _terminal(out, duplicate_uid), 30, what="the duplicate's outcome")
    (refused,) = _terminal(out, refused_uid)
    assert refused["event"] == "sr_refused" and _status(refused["status"]) == 0xA900, refused
    kept = [p for p in (out / "refused").rglob("*") if p.is_file()]
    dicoms = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in kept
              if pydicom.misc.is_dicom(p)}
    assert refused["sr_sop_instance_uid"] in dicoms, [str(p) for p in kept]
    (warned,) = _terminal(out, warned_uid)
    assert warned["event"] == "sr_sent" and warned["status"] == "0xB000" and "already_stored" not in warned, warned
    (duplicate,) = _terminal(out, duplicate_uid)
    assert duplicate["event"] == "sr_sent" and duplicate["already_stored"] is True, duplicate
    counts = pacs.counts()
    assert counts[refused["sr_sop_instance_uid"]] == 1, "a refused report must not be resent"
    assert counts[warned["sr_sop_instance_uid"]] == 1 and counts[duplicate["sr_sop_instance_uid"]] == 1
    assert list((out / "outbox").iterdir()) == []
