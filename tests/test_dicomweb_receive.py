"""STOW-RS in (issue #21 item 1): `xray-serve --dicomweb` takes instances at POST /dicomweb/studies[/{study}],
each part through the DICOM node's own receive() (the checks, results.jsonl, SR and outbox of a C-STORE), and
answers the PS3.18 response. A real server process; a DIMSE PACS in the test takes the SRs; Orthanc with its
DICOMweb plugin pushes through its own DICOMweb client and files the SRs it gets back by STOW-RS."""
from __future__ import annotations


import pydicom
import pytest
import requests
from peers import OrthancDicomWeb, events, free_port, wait_until
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage
from serving import Server, raw_http
from test_dicom_node import Pacs, dicoms, instances, write_dicom  # noqa: F401  (dicoms: a fixture)
from test_infer import radiograph

from xray.serve.dicom.stow_client import multipart_related

pytestmark = pytest.mark.slow


def stow(server: Server, *files, path: str = "/dicomweb/studies", headers: dict | None = None) -> requests.Response:
    body, content_type = multipart_related([f if isinstance(f, bytes) else f.read_bytes() for f in files])
    return requests.post(server.url + path, data=body, timeout=120,
                         headers={"Content-Type": content_type, "Accept": "application/dicom+json", **(headers or {})})


def referenced(answer: dict) -> list[str]:
    return [i["00081155"]["Value"][0] for i in answer.get("00081199", {}).get("Value", [])]


def failed(answer: dict) -> list[tuple[str | None, int]]:
    return [(i.get("00081155", {}).get("Value", [None])[0], i["00081197"]["Value"][0])
            for i in answer.get("00081198", {}).get("Value", [])]


def uid(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def node(tiny_onnx, tmp_path_factory):
    """A STOW-RS-only node (no DIMSE listener) sending its SRs to a DIMSE PACS; uploads up to 8 MB."""
    pacs = Pacs()
    out = tmp_path_factory.mktemp("stow_node")
    with Server("--model", tiny_onnx[0], "--dicomweb", "--results", out, "--max-upload-mb", 8,
                "--send-to", f"PACS@127.0.0.1:{pacs.port}") as s:
        yield s, out, pacs
    pacs.server.shutdown()


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return write_dicom(tmp_path_factory.mktemp("ct") / "ct.dcm", radiograph(256, seed=50), CTImageStorage, 16)


def test_a_mixed_request_answers_each_part_and_handles_the_rest_like_c_store(node, dicoms, ct):
    """A good DX, a CT (refused: not a chest radiograph class), bytes that are no DICOM, a hand film (received,
    not classified) and a DX whose pixels do not decode (received, logged): 202, each part where it belongs."""
    from xray.serve.dicom.sr import summarize_sr

    server, out, pacs = node
    garbage = b"this part is not a DICOM file at all" * 10
    r = stow(server, dicoms["dx16"], ct, garbage, dicoms["hand"], dicoms["corrupt"])
    assert r.status_code == 202, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    answer = r.json()
    assert referenced(answer) == [uid(dicoms["dx16"]), uid(dicoms["hand"]), uid(dicoms["corrupt"])]
    assert failed(answer) == [(uid(ct), 0x0122), (None, 0xC000)]

    logged = wait_until(lambda: (got := instances(out)) and len(got) >= 4 and got, 30, what="the instances logged")
    want = requests.post(server.url + "/v1/predict", data=dicoms["dx16"].read_bytes(),
                         headers={"Content-Type": "application/dicom"}).json()["predictions"][0]
    good = logged[uid(dicoms["dx16"])]
    assert good["status"] == "classified" and good["prediction"] == want["prediction"]
    assert good["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
    assert good["received_by"] == "STOW-RS" and good["client"] == "127.0.0.1"
    assert logged[uid(dicoms["hand"])]["status"] == "not_classified"
    assert logged[uid(dicoms["corrupt"])]["status"] == "error"
    assert logged[uid(ct)]["status"] == "refused" and "0x0122" in logged[uid(ct)]["reason"]
    assert any(r["status"] == "error" and "0xC000" in r["reason"] and not r.get("sop_instance_uid")
               for r in events(out, "instance"))
    srs = pacs.wait_for(1)  # the SR of the classified DX, sent as for a C-STORE
    summary = summarize_sr(srs[0])
    assert uid(dicoms["dx16"]) in summary["references"] and summary["finding"].lower() == want["prediction"].lower()


def test_study_url_takes_only_that_study(node, dicoms):
    server, _, _ = node
    study = str(pydicom.dcmread(dicoms["dx12"], stop_before_pixels=True).StudyInstanceUID)
    r = stow(server, dicoms["dx12"], dicoms["sc8"], path=f"/dicomweb/studies/{study}")
    assert r.status_code == 202, r.text
    assert referenced(r.json()) == [uid(dicoms["dx12"])]
    assert failed(r.json()) == [(uid(dicoms["sc8"]), 0xA900)]
    r = stow(server, dicoms["sc8"], path=f"/dicomweb/studies/{study}")  # nothing stored: 409
    assert r.status_code == 409 and failed(r.json()) == [(uid(dicoms["sc8"]), 0xA900)]


def test_all_stored_is_200_and_deflated_is_refused_per_part(node, dicoms, tmp_path):
    server, _, _ = node
    deflated = tmp_path / "deflated.dcm"
    ds = pydicom.dcmread(dicoms["sc8"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(deflated, enforce_file_format=True)
    r = stow(server, dicoms["sc8"])
    assert r.status_code == 200 and referenced(r.json()) == [uid(dicoms["sc8"])] and "00081198" not in r.json()
    r = stow(server, deflated, dicoms["dx12"])
    assert r.status_code == 202 and failed(r.json()) == [(uid(deflated), 0xC122)]


def test_bodies_that_are_not_stow_get_one_line_and_the_limit_holds_before_reading(node, dicoms):
    server, _, _ = node
    r = requests.post(server.url + "/dicomweb/studies", data=dicoms["dx16"].read_bytes(),
                      headers={"Content-Type": "application/dicom"})
    assert r.status_code == 415 and "multipart/related" in r.json()["detail"]
    r = requests.post(server.url + "/dicomweb/studies", data=b"--x\r\nno end",
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert r.status_code == 400 and "\n" not in r.json()["detail"]
    # declared 100 MB, none of it sent: 413 at once (the limit is 8 MB here)
    head = raw_http(server.port, "POST /dicomweb/studies HTTP/1.1\nHost: x\nContent-Type: multipart/related; "
                    "type=\"application/dicom\"; boundary=b\nContent-Length: 100000000\n", timeout=10)
    assert head.startswith("HTTP/1.1 413"), head
    # chunked, no length: cut off with 413 once past the limit
    def chunks():
        for _ in range(192):  # 192 x 64 KB = 12 MB
            yield b"\0" * 65536

    r = requests.post(server.url + "/dicomweb/studies", data=chunks(),
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert r.status_code == 413 and "8 MB limit" in r.json()["detail"]
    assert requests.get(server.url + "/health/ready").status_code == 200


@pytest.fixture(scope="module")
def small_limit(tiny_onnx, tmp_path_factory):
    """A STOW-RS node taking instances of up to 0.05 MB (52 kB) each, in bodies up to 64 MB (the default)."""
    out = tmp_path_factory.mktemp("small_limit")
    with Server("--model", tiny_onnx[0], "--dicomweb", "--results", out, "--max-instance-mb", 0.05) as s:
        yield s, out


def test_a_part_over_max_instance_mb_is_refused_alone_and_the_others_stored(small_limit, tmp_path):
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation as DX

    server, out = small_limit
    small = [write_dicom(tmp_path / f"small{i}.dcm", radiograph(144, seed=60 + i), DX, 8) for i in range(2)]
    large = write_dicom(tmp_path / "large.dcm", radiograph(224, seed=62), DX, 16)
    assert max(p.stat().st_size for p in small) < 0.05 * 2**20 < 90_000 < large.stat().st_size
    r = stow(server, small[0], large, small[1])
    assert r.status_code == 202, r.text
    assert referenced(r.json()) == [uid(small[0]), uid(small[1])]
    assert failed(r.json()) == [(None, 0x0110)]  # its UID unknown: the part was never read
    logged = wait_until(lambda: (got := events(out, "instance")) and len(got) >= 3 and got, 30,
                        what="the instances logged")
    assert sorted(r["status"] for r in logged) == ["classified", "classified", "refused"]
    refused = next(r for r in logged if r["status"] == "refused")
    assert "0.05 MB limit (--max-instance-mb)" in refused["reason"] and not refused["sop_instance_uid"]
    assert {r["sop_instance_uid"] for r in logged if r["status"] == "classified"} == {uid(p) for p in small}


def test_the_event_loop_answers_while_a_60_mb_body_is_parsed(small_limit):
    """/health/live keeps answering while the node parses a 60 MB body of 80,000 parts. The body lacks its
    closing boundary: all of it is parsed and nothing is stored (400), so the wait after its last byte is the
    parsing. Measured on a loaded 2-core machine: parsed on the event loop, 0-3 probes were answered in waits of
    1.1-1.3 s (the loop blocked for all of it); on a worker thread, 100-142 in 1.5-3 s."""
    import http.client
    import threading
    import time

    server, _ = small_limit
    body, content_type = multipart_related([bytes([i % 251]) * 650 for i in range(80_000)])
    body = body[:-100]  # the closing boundary and the end of the last part cut off
    probes, done = [], threading.Event()

    def probe():
        with requests.Session() as session:
            while not done.is_set():
                start = time.perf_counter()
                status = session.get(server.url + "/health/live", timeout=30).status_code
                probes.append((start, time.perf_counter(), status))

    prober = threading.Thread(target=probe)
    prober.start()
    post = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        post.request("POST", "/dicomweb/studies", body, {"Content-Type": content_type})
        sent = time.perf_counter()  # the whole body written: the server reads the rest of it, then parses
        answer = post.getresponse()
        detail = answer.read()
        answered = time.perf_counter()
    finally:
        done.set()
        prober.join()
        post.close()
    assert answer.status == 400 and b"closing boundary" in detail
    assert {status for _, _, status in probes} == {200}
    during = [p for p in probes if sent < p[0] and p[1] < answered]
    assert len(during) >= 20, f"{len(during)} probes answered in the {answered - sent:.2f} s the body was parsed"


def test_the_endpoints_need_the_key_and_are_absent_without_dicomweb(tiny_onnx, dicoms, tmp_path):
    key = tmp_path / "key.txt"
    key.write_text("k-123\n")
    with Server("--model", tiny_onnx[0], "--dicomweb", "--results", tmp_path / "out", "--api-key-file", key) as s:
        assert stow(s, dicoms["dx16"]).status_code == 401
        r = stow(s, dicoms["dx16"], headers={"Authorization": "Bearer k-123"})
        assert r.status_code == 200 and referenced(r.json()) == [uid(dicoms["dx16"])]
    with Server("--model", tiny_onnx[0]) as plain:
        assert stow(plain, dicoms["dx16"]).status_code == 404
        assert "/dicomweb/studies" not in requests.get(plain.url + "/openapi.json").json()["paths"]


def test_orthanc_pushes_by_dicomweb_and_gets_its_reports_back_by_stow(tiny_onnx, dicoms, tmp_path):
    """The whole loop over HTTP only: Orthanc's DICOMweb client STOWs a CR and a DX to the node, the node STOWs
    an SR per instance back, and QIDO-RS finds each in its source's study."""
    archive_port = free_port()
    out, key = tmp_path / "out", tmp_path / "key.txt"
    key.write_text("orthanc-pushes-with-this-key\n")
    with Server("--model", tiny_onnx[0], "--dicomweb", "--results", out, "--api-key-file", key,
                "--send-to", f"dicomweb+http://127.0.0.1:{archive_port}/dicom-web") as node:
        archive = OrthancDicomWeb(tmp_path / "orthanc", http_port=archive_port)
        archive.config["DicomWeb"]["Servers"] = {"edge": {  # the node's API key as Orthanc's extra header
            "Url": node.url + "/dicomweb/", "HttpHeaders": {"Authorization": "Bearer orthanc-pushes-with-this-key"}}}
        with archive:
            sources = [dicoms["cr"], dicoms["dx16"]]
            ids = [archive.upload(p) for p in sources]
            pushed = archive.post("/dicom-web/servers/edge/stow", json={"Resources": ids, "Synchronous": True})
            assert pushed.ok, pushed.text
            for path in sources:
                study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                found = wait_until(lambda: archive.instances_in_study(study, "SR"), 60,
                                   what=f"the SR of {path.name} in its study")
                assert len(found) == 1
            sent = [r for r in events(out, "sr_sent")]
            assert sorted(r["sop_instance_uid"] for r in sent) == sorted(uid(p) for p in sources)
            logged = instances(out)
            assert {logged[uid(p)]["received_by"] for p in sources} == {"STOW-RS"}
