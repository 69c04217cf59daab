"""The DICOM node over a month (issue #30): idempotent report UIDs, one final record per receipt, a duplicate never
queued twice, out of memory answered 0xA700 and never an image verdict, the log repaired after a crash between a
line and its outbox step, results.jsonl reopened on SIGHUP, and bookkeeping that does not grow with the
associations served. The node runs in this process (the app's lifespan through Starlette's TestClient) so that
its bookkeeping can be read; its peers are pynetdicom SCUs and a scripted PACS on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from peers import ScriptedPacs, events, free_port, wait_until
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from serving import Server
from test_dicom_node import node_port, scu, store, write_dicom
from test_infer import radiograph

RECORD = {"prediction": "NORMAL", "probability": 0.7, "probabilities": {"NORMAL": 0.7, "PNEUMONIA": 0.2,
          "TUBERCULOSIS": 0.1}, "ood": False, "ood_score": 1.0}
MODEL = {"name": "efficientnet_lite0", "precision": "int8", "checkpoint_sha256": "ab" * 32, "version": "0"}


def _dx(folder: Path, name: str, seed: int) -> Path:
    return write_dicom(folder / f"{name}.dcm", radiograph(128, seed=seed), DigitalXRayImageStorageForPresentation, 12,
                       patient=name.upper(), BodyPartExamined="CHEST")


# ---------------------------------------------------------------------------------------------------- pure parts
def test_report_uids_are_a_function_of_the_source_the_model_and_the_kind(tmp_path):
    from xray.serve.dicom.reports import build_reports, report_uids

    source = pydicom.dcmread(_dx(tmp_path, "uid", 1))
    first, again = (build_reports(source, RECORD, MODEL, None)[0] for _ in range(2))
    assert first.SOPInstanceUID == again.SOPInstanceUID and first.SeriesInstanceUID == again.SeriesInstanceUID
    assert first.SOPInstanceUID.startswith("2.25.") and len(first.SOPInstanceUID) <= 64
    other_model = build_reports(source, RECORD, {**MODEL, "checkpoint_sha256": "cd" * 32}, None)[0]
    assert other_model.SOPInstanceUID != first.SOPInstanceUID  # a new checkpoint is a new report
    sr, sc = report_uids(source, MODEL, "sr"), report_uids(source, MODEL, "sc")
    assert sr["sop_instance_uid"] == first.SOPInstanceUID and len(set(sr.values()) | set(sc.values())) == 4
    other = pydicom.dcmread(_dx(tmp_path, "other", 2))
    assert report_uids(other, MODEL, "sr") != sr
    del source.SOPInstanceUID, source.file_meta.MediaStorageSOPInstanceUID  # nothing to derive from: random
    assert report_uids(source, MODEL, "sr") == {}


def test_lines_since_reads_back_to_the_given_time_and_skips_a_cut_last_line(tmp_path):
    from xray.serve.dicom.results_log import ResultsLog, lines_since

    log = ResultsLog(tmp_path)
    for i in range(2000):
        log.write("instance", n=i, pad="x" * 600)  # > 1 MB: read back over several chunks
    log.close()
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"time": "2026-')  # a crash mid-write
    seen = [e["n"] for e in lines_since(tmp_path / "results.jsonl", 0, chunk=65536)]
    assert seen == list(range(1999, -1, -1))
    assert list(lines_since(tmp_path / "results.jsonl", time.time() + 60)) == []
    assert list(lines_since(tmp_path / "missing.jsonl", 0)) == []


def test_a_restart_marks_what_the_log_says_was_delivered_and_recovers_a_missing_instance_line(tmp_path):
    """Kill points: (a) after sr_sent was written, before the outbox step; (b) after the outbox rename, before the
    instance line. The restart sends neither again, logs neither twice, and gives (b) its instance line."""
    from xray.serve.dicom.node import reconcile
    from xray.serve.dicom.outbox import Outbox
    from xray.serve.dicom.reports import build_reports
    from xray.serve.dicom.results_log import ResultsLog

    log, outbox = ResultsLog(tmp_path), Outbox(tmp_path)
    a, b = (pydicom.dcmread(_dx(tmp_path, n, s)) for n, s in (("a", 3), ("b", 4)))
    line = {"status": "classified", "sop_instance_uid": "", **RECORD, "model": MODEL}
    entry_a = outbox.put(a.SOPInstanceUID, build_reports(a, RECORD, MODEL, None), {**line, "sop_instance_uid": a.SOPInstanceUID})
    log.write("instance", **entry_a.record, entry=entry_a.name)
    log.write("sr_sent", entry=entry_a.name, sop_instance_uid=a.SOPInstanceUID, sr_sop_instance_uid=entry_a.sr_uid)
    entry_b = outbox.put(b.SOPInstanceUID, build_reports(b, RECORD, MODEL, None), {**line, "sop_instance_uid": b.SOPInstanceUID})

    restarted = Outbox(tmp_path)
    assert restarted.backlog() == 2
    reconcile(restarted, log)
    log.close()
    assert [e.name for e in restarted.entries()] == [entry_b.name] and not entry_a.path.exists()
    assert restarted.bookkeeping() == {"outbox_entries": 1, "outbox_sources": 1}
    recovered = [e for e in events(tmp_path, "instance") if e.get("recovered")]
    assert [(e["entry"], e["sop_instance_uid"], e["prediction"]) for e in recovered] == \
        [(entry_b.name, b.SOPInstanceUID, "NORMAL")]
    assert len(events(tmp_path, "sr_sent")) == 1
    again = Outbox(tmp_path)  # a second restart: nothing more to repair
    reconcile(again, ResultsLog(tmp_path))
    assert len([e for e in events(tmp_path, "instance") if e.get("recovered")]) == 1


def test_a_result_left_by_the_previous_version_is_sent_without_a_made_up_instance_line(tmp_path):
    """Before #30 result.json had no record and no object kinds, and its instance line named no entry: the
    upgraded node sends it (an SR) and writes no `recovered` line for it."""
    from xray.serve.dicom.node import reconcile
    from xray.serve.dicom.outbox import Outbox
    from xray.serve.dicom.reports import build_reports
    from xray.serve.dicom.results_log import ResultsLog

    source = pydicom.dcmread(_dx(tmp_path, "old", 5))
    folder = tmp_path / "outbox" / "0000000000001-0ld0ld00"
    folder.mkdir(parents=True)
    sr = build_reports(source, RECORD, MODEL, None)[0]
    sr.save_as(folder / "sr.dcm", enforce_file_format=True)
    (folder / "result.json").write_text(json.dumps({"created": time.time(), "source_uid": source.SOPInstanceUID,
                                                    "objects": [{"file": "sr.dcm", "sop_instance_uid": sr.SOPInstanceUID,
                                                                 "sop_class": sr.SOPClassUID}]}))
    outbox, log = Outbox(tmp_path), ResultsLog(tmp_path)
    reconcile(outbox, log)
    log.close()
    (entry,) = outbox.entries()
    assert entry.pending() == entry.objects and entry.objects[0]["kind"] == "sr" and events(tmp_path, "instance") == []


def test_out_of_memory_while_decoding_is_not_a_corrupt_image(monkeypatch):
    from PIL import Image

    from xray.common import imageio

    def exhausted(*a, **kw):
        raise MemoryError

    png = _png_bytes()
    monkeypatch.setattr(Image.Image, "load", exhausted)
    with pytest.raises(MemoryError):
        imageio.load_image(png, name="film.png")


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- a node in process
@pytest.fixture
def in_process(tiny_onnx, tmp_path):
    """Start a node (send_to: a port, None for no --send-to) in this process; yields (node, DICOM port, results)."""
    from fastapi.testclient import TestClient

    from xray.infer.model import open_model
    from xray.serve.app import create_app
    from xray.serve.dicom.destination import Destination
    from xray.serve.dicom.node import NodeSettings
    from xray.serve.settings import Settings

    started = []

    def start(send_port: int | None, **settings):
        model, _ = open_model(str(tiny_onnx[0]), "fp32", 1, False)
        out = tmp_path / "results"
        node_settings = NodeSettings(port=0, results_dir=out, send_backoff_max_s=1, **settings,
                                     send_to=Destination("PACS", "127.0.0.1", send_port) if send_port else None)
        app = create_app(model, Settings(decode_workers=1), node_settings)
        app.state.node.start()
        client = TestClient(app)
        client.__enter__()  # the lifespan: the model's warm-up; the exit stops the node
        started.append(client)
        wait_until(lambda: client.get("/health/ready").status_code == 200, 60, what="the node's model warm-up")
        return app.state.node, app.state.node.port, out

    yield start
    for client in started:
        client.__exit__(None, None, None)


def _settled(node):
    """No association open, nothing being classified, the outbox empty: the node at rest."""
    wait_until(lambda: not node._server.active_associations and node.bookkeeping()["in_flight"] == 0
               and (node.outbox is None or node.outbox.backlog() == 0), 30, what="the node at rest")
    return node.bookkeeping()


def _associations(port: int, n: int, files: list[Path], store_every: int = 10):
    """n associations: a C-STORE of the next file on every store_every-th, a C-ECHO on the others."""
    ae = scu("LOADTEST")
    for i in range(n):
        assoc = ae.associate("127.0.0.1", port, ae_title="XRAY_EDGE")
        assert assoc.is_established
        if i % store_every == 0:
            ds = pydicom.dcmread(files[i // store_every % len(files)])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            assert assoc.send_c_store(ds).Status == 0x0000
        else:
            assert assoc.send_c_echo().Status == 0x0000
        assoc.release() if i % 7 else assoc.abort()  # an abort now and then: it must not leave anything behind


@pytest.mark.slow
def test_bookkeeping_after_a_thousand_associations_equals_that_after_ten(in_process, tmp_path):
    files = [_dx(tmp_path, f"mem{i}", 10 + i) for i in range(3)]
    with ScriptedPacs() as pacs:
        node, port, out = in_process(pacs.port)
        _associations(port, 10, files)
        after_10 = _settled(node)
        _associations(port, 990, files)
        after_1000 = _settled(node)
    assert after_1000 == after_10 == {"associations": 0, "receiving": 0, "in_flight": 0, "outbox_entries": 0,
                                      "outbox_sources": 0}
    assert len(events(out, "sr_sent")) == 100 and len(pacs.counts()) == 100


@pytest.mark.slow
def test_an_instance_received_again_while_its_report_waits_is_not_queued_twice(in_process, tmp_path):
    dx = _dx(tmp_path, "again", 20)
    node, port, out = in_process(free_port())  # nothing listens there: the report waits
    assert store(port, [dx, dx], calling="MODALITY") == [0x0000, 0x0000]  # a modality's retry on one association
    assert store(port, [dx]) == [0x0000]  # and a re-push later
    first, *again = events(out, "instance")
    assert first["entry"] and "duplicate_of" not in first and len(again) == 2
    for line in again:
        assert line["duplicate_of"] == first["entry"] and "entry" not in line
        assert line["sr_sop_instance_uid"] == first["sr_sop_instance_uid"] and line["prediction"] == first["prediction"]
    assert node.outbox.backlog() == 1 and node.bookkeeping()["outbox_sources"] == 1
    uid = first["sop_instance_uid"]
    node._receiving.add(uid)  # the same instance arriving while another association classifies it
    try:
        node.outbox._forget(node.outbox.entries()[0])  # (as if its report had gone, so it is not a duplicate)
        assert store(port, [dx]) == [0xA700]
    finally:
        node._receiving.discard(uid)
    deferred = events(out, "instance")[-1]
    assert deferred["status"] == "deferred" and "the same instance is being received" in deferred["reason"]


@pytest.mark.slow
def test_out_of_memory_answers_0xa700_and_a_corrupt_image_is_logged_with_its_kind(in_process, tmp_path, monkeypatch):
    dx = _dx(tmp_path, "oom", 21)
    node, port, out = in_process(None)

    def exhausted(*a, **kw):
        raise MemoryError

    monkeypatch.setattr(node.service, "classify_blocking", exhausted)
    assert store(port, [dx]) == [0xA700]  # the modality sends it again later
    monkeypatch.undo()
    assert store(port, [dx]) == [0x0000]
    deferred, classified = events(out, "instance")
    assert deferred["status"] == "deferred" and deferred["reason"].startswith("out of memory"), deferred
    assert "kind" not in deferred and classified["status"] == "classified"

    broken = pydicom.dcmread(dx)
    broken.PixelData = broken.PixelData[:100]  # 100 bytes for 128 x 128 16-bit pixels
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "broken.dcm"
    broken.save_as(path, enforce_file_format=True)
    assert store(port, [path]) == [0x0000]  # received and logged: nothing for the modality to resend
    error = events(out, "instance")[-1]
    assert error["status"] == "error" and error["kind"] == "bad_dicom" and error["reason"], error


@pytest.mark.slow
def test_sighup_reopens_results_jsonl_after_logrotate_moved_it(tiny_onnx, tmp_path):
    out = tmp_path / "results"
    first, second = _dx(tmp_path, "before", 30), _dx(tmp_path, "after", 31)
    with Server("--model", tiny_onnx[0], "--dicom-port", 0, "--results", out) as node:
        port = node_port(node)
        assert store(port, [first]) == [0x0000]
        os.rename(out / "results.jsonl", out / "results.jsonl.1")  # logrotate's create mode, then its postrotate
        node.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: (out / "results.jsonl").exists(), 10, what="a new results.jsonl after SIGHUP")
        assert store(port, [second]) == [0x0000]
        assert node.proc.poll() is None  # SIGHUP does not end the server
    old = [json.loads(line) for line in (out / "results.jsonl.1").read_text().splitlines()]
    new = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["sop_instance_uid"] for r in old if r["event"] == "instance"] == [str(pydicom.dcmread(first).SOPInstanceUID)]
    assert [r["sop_instance_uid"] for r in new if r["event"] == "instance"] == [str(pydicom.dcmread(second).SOPInstanceUID)]
    assert (out / "results.jsonl").stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_out_of_memory_on_http_is_503_with_retry_after_not_an_image_error(tiny_onnx, monkeypatch):
    from fastapi.testclient import TestClient

    from xray.infer.model import open_model
    from xray.serve.app import create_app
    from xray.serve.settings import Settings

    model, _ = open_model(str(tiny_onnx[0]), "fp32", 1, False)
    app = create_app(model, Settings(decode_workers=1))
    with TestClient(app) as client:
        wait_until(lambda: client.get("/health/ready").status_code == 200, 60, what="warm-up")
        def exhausted(*a, **kw):
            raise MemoryError

        monkeypatch.setattr(app.state.service, "_prepare", exhausted)  # decoding, on the decode pool
        answer = client.post("/v1/predict", files={"file": ("film.png", _png_bytes(), "image/png")})
        monkeypatch.undo()
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5", answer.text
        assert "out of memory" in answer.json()["detail"]
        assert client.post("/v1/predict", files={"file": ("film.png", _png_bytes(), "image/png")}).status_code == 200


def test_a_kill_while_a_delivered_result_is_removed_leaves_nothing_unreadable(tmp_path):
    """The folder of a delivered result is renamed to .gone- before it is deleted file by file: a kill in between
    leaves a folder the next start sweeps, never an entry without its result.json (reported forever)."""
    from xray.serve.dicom.outbox import Outbox

    gone = tmp_path / "outbox" / ".gone-0000000000001-deadbeef"
    gone.mkdir(parents=True)
    (gone / "object1.dcm").write_bytes(b"DICM half removed")
    outbox = Outbox(tmp_path)
    assert not gone.exists() and outbox.unreadable == [] and outbox.backlog() == 0


def test_out_of_memory_in_xray_infer_is_one_line_not_a_row_saying_corrupt(tiny_onnx, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from xray.infer import predict
    from xray.infer.cli import main

    films = []
    for i in range(3):
        films.append(tmp_path / f"film{i}.png")
        films[-1].write_bytes(_png_bytes())

    def exhausted(*a, **kw):
        raise MemoryError

    monkeypatch.setattr(predict, "prepare_or_error", exhausted)
    result = CliRunner().invoke(main, ["--model", str(tiny_onnx[0]), "-f", "jsonl", *map(str, films)])
    assert result.exit_code == 1, result.output
    assert "error: out of memory while decoding or running a batch: lower --batch-size" in result.output
    assert "Traceback" not in result.output and "corrupt" not in result.output


@pytest.mark.slow
def test_bench_node_memory_runs_as_the_readme_shows(tiny_onnx):
    """The README's command, shortened: the script starts a node, runs its associations, drains the outbox."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "scripts" / "bench_node_memory.py"
    proc = subprocess.run([sys.executable, bench, "--model", tiny_onnx[0], "--associations", "600"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "60 C-STOREs and 540 C-ECHOs answered 0x0000, 0 associations failed" in proc.stdout
    assert "the SCP received 60 reports" in proc.stdout and "(limit 20 MB): ok" in proc.stdout


def test_a_line_cut_by_a_kill_stays_alone_and_the_next_start_writes_whole_lines(tmp_path):
    from xray.serve.dicom.results_log import ResultsLog

    (tmp_path / "results.jsonl").write_text('{"time": "2026-12-06T10:00:00.000+00:00", "event": "instance"}\n{"ti')
    log = ResultsLog(tmp_path)
    log.write("node_started")
    log.close()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert lines[1] == '{"ti' and json.loads(lines[2])["event"] == "node_started" and len(lines) == 3


@pytest.mark.slow
def test_the_outbox_keeps_no_patient_id_the_log_may_not_keep(in_process, tmp_path):
    key = tmp_path / "key"
    key.write_text("k" * 32)
    node, port, out = in_process(free_port(), log_patient_id="hash", patient_id_key=key)  # the report waits
    assert store(port, [_dx(tmp_path, "secretpatient", 40)]) == [0x0000]
    (entry,) = node.outbox.entries()
    saved = (entry.path / "result.json").read_text()
    assert "SECRETPATIENT" not in saved and json.loads(saved)["record"]["patient_id_hmac"]
    assert "SECRETPATIENT" not in (out / "results.jsonl").read_text()
