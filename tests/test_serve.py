"""xray-serve through real server processes on 127.0.0.1: endpoints, numbers equal to xray-infer's,
limits and bad input, dynamic batching, the API key, CORS, SIGTERM, stalled uploads, a failed warm-up."""
from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from conftest import run_command, xray_infer
from PIL import Image
from serving import SERVE, Server, listening_addresses, raw_http, wait_until
from test_infer import MODES, png_bomb, radiograph, save_mode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory, dicom_file):
    """Real-size generated radiographs in every flavour xray-infer reads, plus the real chest CR DICOM."""
    root = tmp_path_factory.mktemp("serve_images")
    files = {m: save_mode(radiograph(900 + 41 * i, seed=10 + i), m, root / f"cxr_{m}") for i, m in enumerate(MODES)}
    files["dicom"] = dicom_file
    return files


@pytest.fixture(scope="module")
def dicom_file():
    from test_common_imageio import _find_rg1

    path = _find_rg1()
    assert path is not None, "RG1_UNCR.dcm (pydicom-data, a dev dependency) is not installed"
    return path


@pytest.fixture(scope="module")
def server(tiny_onnx):
    """Small limits so every limit can be hit cheaply."""
    with Server("--model", tiny_onnx[0], "--max-upload-mb", 16, "--max-files", 4, "--max-pixels", 20_000_000) as s:
        yield s


def predict(server, files, **params):
    """POST files ({name: path}) as multipart."""
    parts = [("file", (name, open(path, "rb").read())) for name, path in files.items()]
    return requests.post(server.url + "/v1/predict", files=parts, params=params, timeout=60)


def infer_json(model, paths) -> dict:
    out = json.loads(xray_infer("--model", model, *paths, "-f", "json", "--top-k", 2).stdout)
    return {p["file"]: p for p in out["predictions"]}


def assert_same_as_cli(served: list[dict], cli: dict, names_to_paths: dict):
    assert len(served) == len(names_to_paths)
    for rec in served:
        ref = cli[str(names_to_paths[rec["file"]])]
        assert rec["prediction"] == ref["prediction"]
        for c, p in ref["probabilities"].items():
            assert rec["probabilities"][c] == pytest.approx(p, abs=1e-6), (rec["file"], c)
        assert [t["class"] for t in rec["top_k"]] == [t["class"] for t in ref["top_k"]]
        for key in ("ood", "ood_score"):
            assert (key in rec) == (key in ref)
            if key in ref:
                assert rec[key] == pytest.approx(ref[key], rel=1e-5)


# ------------------------------------------------------------------------------------------ the CLI


def test_help_and_bad_options_exit_with_one_line(tiny_onnx, tmp_path):
    proc = run_command([*SERVE, "--help"])
    for option in ("--model", "--host", "--port", "--api-key-file", "--max-batch", "--max-delay-ms", "--max-queue",
                   "--max-upload-mb", "--precision"):
        assert option in proc.stdout
    for args, message in ((["--model", tmp_path / "none.onnx"], "model file not found"),
                          (["--model", tiny_onnx[0], "--allow-origin", "*"], "'*' is refused"),
                          (["--model", tmp_path], "no model.int8.onnx or model.onnx")):
        proc = run_command([*SERVE, *args], check=False, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    empty = tmp_path / "key.txt"
    empty.write_text("\n")
    proc = run_command([*SERVE, "--model", tiny_onnx[0], "--api-key-file", empty], check=False, timeout=60)
    assert proc.returncode == 2 and "API key file is empty" in proc.stderr


def test_failed_warm_up_exits_non_zero_with_one_line(tiny_onnx, tmp_path):
    """A model that loads but fails on its first run (here: an input fixed at batch 1, and the warm-up runs
    --max-batch 16): one log line naming onnxruntime's reason and a non-zero exit, not a server that stays
    unready forever."""
    import onnx

    model = onnx.load(str(tiny_onnx[0]))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    batch1 = tmp_path / "batch1.onnx"
    onnx.save(model, str(batch1))
    proc = run_command([*SERVE, "--model", batch1, "--port", 0, "--max-batch", 16], check=False, timeout=90)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "warm-up failed" in line]
    assert len(lines) == 1 and "ERROR" in lines[0] and "Expected: 1" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Exception in" not in proc.stderr, proc.stderr


def test_serves_with_torch_unimportable(tiny_onnx, images):
    """The service and its DICOM node never import torch (nor onnx, timm, ...), directly or through another module."""
    blocker = ("import sys, importlib.abc\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in {'torch', 'torchvision', 'timm', 'accelerate', 'onnx', 'sklearn'}:\n"
               "            raise ImportError('blocked for this test: ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "import xray.serve.dicom.sr  # the SR builder is imported lazily by the node: check it too\n"
               "import xray.serve.dicom.stow_routes, xray.serve.dicom.stow_client  # STOW-RS in and out\n"
               "from xray.serve.cli import main\n"
               "try:\n"
               "    main(prog_name='xray-serve')\n"
               "finally:\n"
               "    assert 'torch' not in sys.modules, 'xray-serve imported torch'\n")
    import sys

    from xray.serve.dicom.stow_client import multipart_related

    with Server("--model", tiny_onnx[0], "--dicom-port", 0, "--dicomweb", "--results",
                images["png8"].parent / "blocked-node", command=[sys.executable, "-c", blocker]) as s:
        r = predict(s, {"a.png": images["png8"], "b.dcm": images["dicom"]})
        assert r.status_code == 200 and all("prediction" in p for p in r.json()["predictions"]), r.text
        body, content_type = multipart_related([images["dicom"].read_bytes()])
        r = requests.post(s.url + "/dicomweb/studies", data=body, headers={"Content-Type": content_type})
        assert r.status_code == 200 and "00081199" in r.json(), r.text
    assert s.proc.returncode == 0 and "blocked for this test" not in s.output(), s.output()


# ------------------------------------------------------------------------------------------ endpoints


def test_health_metadata_and_openapi(server, tiny_onnx):
    assert requests.get(server.url + "/health/live").json() == {"status": "live"}
    assert requests.get(server.url + "/health/ready").json() == {"status": "ready"}
    meta = requests.get(server.url + "/v1/metadata").json()
    from xray.infer.model import EdgeModel

    info = EdgeModel(tiny_onnx[0]).info
    assert meta["classes"] == info.classes and meta["model_name"] == info.model_name
    assert meta["precision"] == "fp32" and meta["image_spec"]["input_size"] == info.spec.input_size
    assert meta["file"] == tiny_onnx[0].name and meta["ood_guard"] is None and meta["heatmaps"] is False
    assert meta["limits"]["max_files"] == 4 and "not a medical device" in meta["notice"].lower()
    from xray.common.cpu import detect_cpu

    assert meta["cpu_class"] == detect_cpu().cls and meta["int8_cpu_classes"] is None  # an fp32 model
    spec = requests.get(server.url + "/openapi.json").json()
    assert {"/health/live", "/health/ready", "/v1/metadata", "/v1/predict", "/metrics"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    docs = requests.get(server.url + "/docs")
    assert docs.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text) + re.findall(r"url: '([^']+)'", docs.text)
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN: works offline
    for asset in assets:
        assert requests.get(server.url + asset).status_code == 200, asset
    assert requests.get(server.url + "/redoc").status_code == 404  # ReDoc would load from a CDN: not served


def test_predictions_equal_xray_infer_for_every_format(server, tiny_onnx, images):
    names = {p.name: p for p in images.values()}
    cli = infer_json(tiny_onnx[0], list(names.values()))
    served = []
    for chunk in (list(names.items())[i:i + 4] for i in range(0, len(names), 4)):  # --max-files 4
        r = predict(server, dict(chunk), top_k=2)
        assert r.status_code == 200, r.text
        served += r.json()["predictions"]
    assert_same_as_cli(served, cli, names)
    assert len({round(r["probabilities"]["NORMAL"], 6) for r in served}) > 3  # the images really differ
    # one image as the raw body, with its Content-Type (DICOM included)
    for path, ctype in ((images["png8"], "image/png"), (images["dicom"], "application/dicom"),
                        (images["jpeg"], "image/jpeg")):
        r = requests.post(server.url + "/v1/predict?top_k=2", data=path.read_bytes(),
                          headers={"Content-Type": ctype, "X-Filename": path.name})
        assert r.status_code == 200, r.text
        assert_same_as_cli(r.json()["predictions"], cli, {path.name: path})


def test_guard_fields_equal_xray_infer(exported, images):
    """The exported model carries the out-of-distribution guard: ood / ood_score as xray-infer gives them,
    and abstain replaces the prediction as --ood-action abstain does."""
    folder = exported[0]
    noise = images["png8"].parent / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)).save(noise)
    files = {p.name: p for p in (images["png8"], images["jpeg"], images["dicom"], noise)}
    with Server("--model", folder / "model.onnx") as s:
        r = predict(s, files, top_k=2)
        assert r.status_code == 200, r.text
        cli = infer_json(folder / "model.onnx", list(files.values()))
        assert_same_as_cli(r.json()["predictions"], cli, files)
        flagged = {p["file"]: p for p in r.json()["predictions"]}["noise.png"]
        assert flagged["ood"] is True and "not like the training data" in flagged["reason"]
        abstained = {p["file"]: p for p in predict(s, {"noise.png": noise}, ood_action="abstain").json()["predictions"]}
        assert abstained["noise.png"]["prediction"] == "OUT_OF_DISTRIBUTION"
        assert abstained["noise.png"]["probability"] is None
        assert s.metrics()["xray_images_total{outcome=\"ood\"}"] >= 2
        assert requests.get(s.url + "/v1/metadata").json()["ood_guard"]["threshold"] > 0


# ------------------------------------------------------------------------------------------ bad input


def test_bad_images_get_422_or_an_error_object(server, images, tmp_path):
    good = images["png8"]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("not an image at all\n")
    bomb = png_bomb(tmp_path / "bomb.png", 6000, 6000)  # 36 MP > --max-pixels 20 MP, a tiny file
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, kind, words in ((truncated, "corrupt", "truncated"), (text, "not_an_image", "not a recognised image"),
                              (bomb, "too_many_pixels", "too large"), (empty, "empty", "empty")):
        r = predict(server, {path.name: path})
        assert r.status_code == 422, (path.name, r.status_code, r.text)
        body = r.json()
        assert words in body["detail"] and "\n" not in body["detail"]
        assert body["predictions"][0]["error"]["kind"] == kind
    # in a batch, the bad one gets an error object and the others are answered
    r = predict(server, {"good.png": good, "truncated.png": truncated})
    assert r.status_code == 200
    good_rec, bad_rec = r.json()["predictions"]
    assert good_rec["file"] == "good.png" and good_rec["prediction"]
    assert bad_rec["file"] == "truncated.png" and bad_rec["error"]["kind"] == "corrupt"
    r = requests.post(server.url + "/v1/predict", data=b"", headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and "empty body" in r.json()["detail"]
    r = requests.post(server.url + "/v1/predict", files=[("note", (None, "just a field"))])
    assert r.status_code == 422 and "no file" in r.json()["detail"]
    errors = server.metrics()
    assert errors['xray_errors_total{kind="corrupt"}'] >= 2 and errors['xray_errors_total{kind="bad_image"}'] >= 4


def test_unknown_path_404_wrong_method_405(server):
    r = requests.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["detail"] == "Not Found"
    r = requests.get(server.url + "/v1/predict")
    assert r.status_code == 405 and "POST" in r.headers["Allow"]
    r = requests.delete(server.url + "/v1/metadata")
    assert r.status_code == 405
    m = server.metrics()
    assert m['xray_errors_total{kind="not_found"}'] >= 1 and m['xray_errors_total{kind="method_not_allowed"}'] >= 2


def test_upload_limits_413_without_reading_the_body(server, images):
    # declared 100 MB, sent none of it: the 413 arrives without the server waiting for the body
    start = time.monotonic()
    head = raw_http(server.port, "POST /v1/predict HTTP/1.1\nHost: x\nContent-Type: image/png\n"
                                 "Content-Length: 104857600\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert time.monotonic() - start < 5
    # a chunked body has no Content-Length: it is cut off once it passes the 16 MB limit
    def chunks():
        for _ in range(384):  # 384 x 64 KB = 24 MB
            yield b"\0" * 65536

    r = requests.post(server.url + "/v1/predict", data=chunks(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "16 MB limit" in r.json()["detail"]
    small = {f"{i}.png": images["png8"] for i in range(5)}  # --max-files 4
    parts = [("file", (n, b"\x89PNG" + bytes(100))) for n in small]
    r = requests.post(server.url + "/v1/predict", files=parts)
    assert r.status_code == 413 and "more than 4 files" in r.json()["detail"]
    assert server.metrics()['xray_errors_total{kind="too_large"}'] >= 3
    assert requests.get(server.url + "/health/ready").status_code == 200


def test_client_disconnecting_mid_upload_harms_nobody(server, images):
    gone = 'xray_errors_total{kind="client_disconnected"}'
    before = server.metrics().get(gone, 0)
    body = images["png8"].read_bytes()
    for _ in range(5):
        raw_http(server.port, f"POST /v1/predict HTTP/1.1\nHost: x\nContent-Type: image/png\n"
                              f"Content-Length: {len(body)}\n", body[:2000], close_after_send=True)
    parts = "\r\n".join(["--B", 'Content-Disposition: form-data; name="file"; filename="a.png"',
                         "Content-Type: image/png", "", ""]).encode() + body[:3000]
    raw_http(server.port, "POST /v1/predict HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary=B\n"
                          f"Content-Length: {len(parts) + 100000}\n", parts, close_after_send=True)
    # the counter, not the in-flight gauge: admit() frees the slot before the handler counts the disconnect
    assert wait_until(lambda: server.metrics().get(gone, 0) >= before + 6), server.metrics().get(gone)
    m = server.metrics()
    assert m["xray_requests_in_flight"] == 0 and m["xray_queue_depth"] == 0  # nothing held for the gone clients
    r = predict(server, {"after.png": images["png8"]})
    assert r.status_code == 200 and r.json()["predictions"][0]["prediction"]
    assert "Traceback" not in server.output()


def test_stalled_upload_gets_408_and_frees_its_slot(tiny_onnx, images):
    """A client that stops sending mid-body gets 408 after --read-timeout-s, and its admission slot is free
    again (--max-queue 1: the next request would get 503 if it were not); a slow but steady upload, each gap
    under the timeout and the whole over it, is no stall."""
    body = images["png8"].read_bytes()
    raw_head = f"POST /v1/predict HTTP/1.1\nHost: x\nContent-Type: image/png\nContent-Length: {len(body)}\n"
    part = "\r\n".join(["--B", 'Content-Disposition: form-data; name="file"; filename="a.png"',
                         "Content-Type: image/png", "", ""]).encode() + body[:3000]
    multipart_head = ("POST /v1/predict HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary=B\n"
                      f"Content-Length: {len(part) + 100000}\n")
    with Server("--model", tiny_onnx[0], "--read-timeout-s", 1, "--max-queue", 1) as s:
        assert requests.get(s.url + "/v1/metadata").json()["limits"]["read_timeout_s"] == 1
        for head, partial in ((raw_head, body[:2000]), (multipart_head, part)):
            start = time.monotonic()
            answer = raw_http(s.port, head, partial, timeout=30)  # part of the body, then silence
            assert answer.startswith("HTTP/1.1 408"), answer
            assert time.monotonic() - start >= 1 and "connection: close" in answer.lower()
            assert s.metrics()["xray_requests_in_flight"] == 0  # freed before the 408 was sent
            r = predict(s, {"after.png": images["png8"]})
            assert r.status_code == 200, r.text
        pieces = [body[k * len(body) // 5:(k + 1) * len(body) // 5] for k in range(5)]  # ~1.6 s in all
        answer = raw_http(s.port, raw_head, *pieces, gap_s=0.4, timeout=30)
        assert answer.startswith("HTTP/1.1 200"), answer
    assert "Traceback" not in s.output()


# ------------------------------------------------------------------------------------------ load


def test_concurrent_requests_are_batched_and_none_lost(tiny_onnx, images):
    files = [images[m] for m in ("png8", "jpeg", "rgb", "png16")]
    cli = infer_json(tiny_onnx[0], files)
    with Server("--model", tiny_onnx[0], "--max-delay-ms", 40, "--max-batch", 8) as s:
        def one(k):
            path = files[k % len(files)]
            r = requests.post(s.url + "/v1/predict?top_k=2", data=path.read_bytes(),
                              headers={"Content-Type": "image/png", "X-Filename": path.name}, timeout=60)
            return path, r

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(32)))
        for path, r in answers:
            assert r.status_code == 200, r.text
            assert_same_as_cli(r.json()["predictions"], cli, {path.name: path})
        m = s.metrics()
        assert m["xray_batch_size_sum"] == 32  # every image ran exactly once
        assert m["xray_batch_size_count"] < 32  # so some batches held more than one image
        assert m['xray_batch_size_bucket{le="1.0"}'] < m["xray_batch_size_count"]
        assert m['xray_http_requests_total{method="POST",route="/v1/predict",status="200"}'] == 32
        assert m["xray_queue_depth"] == 0 and m["xray_requests_in_flight"] == 0
        assert 'xray_model_info{' in requests.get(s.url + "/metrics").text


def test_full_queue_answers_503_with_retry_after(tiny_onnx, images):
    body = images["png16"].read_bytes()  # a ~1 MP 16-bit PNG: tens of ms to decode, no JPEG draft shortcut
    with Server("--model", tiny_onnx[0], "--max-queue", 1, "--max-batch", 1) as s:
        def one(_):
            return requests.post(s.url + "/v1/predict", data=body, headers={"Content-Type": "image/png"}, timeout=60)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, range(36)))
        codes = [r.status_code for r in answers]
        assert set(codes) == {200, 503}, codes
        busy = next(r for r in answers if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and "server busy" in busy.json()["detail"]
        assert s.metrics()['xray_errors_total{kind="queue_full"}'] == codes.count(503)


def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny_onnx, images):
    s = Server("--model", tiny_onnx[0], "--max-files", 16)
    parts = [("file", (f"{i}.png", images["png16"].read_bytes())) for i in range(12)]
    result = {}

    def slow_request():
        result["r"] = requests.post(s.url + "/v1/predict", files=parts, timeout=60)

    worker = threading.Thread(target=slow_request)
    worker.start()
    assert wait_until(lambda: s.metrics()["xray_requests_in_flight"] >= 1, every=0.005), "the request never arrived"
    assert s.stop() == 0, s.output()
    worker.join(30)
    assert result["r"].status_code == 200 and len(result["r"].json()["predictions"]) == 12
    with pytest.raises(requests.ConnectionError):
        requests.get(s.url + "/health/live", timeout=2)
    assert "Traceback" not in s.output()


# ------------------------------------------------------------------------------------------ access


def test_api_key_guards_everything_but_health_and_the_page(tiny_onnx, images, tmp_path):
    key = tmp_path / "key.txt"
    key.write_text("s3cret-key\n")
    with Server("--model", tiny_onnx[0], "--api-key-file", key, "--allow-origin", "http://ward.local") as s:
        for path in ("/health/live", "/health/ready", "/", "/static/app.js"):
            assert requests.get(s.url + path).status_code == 200, path
        for method, path in (("GET", "/v1/metadata"), ("POST", "/v1/predict"), ("GET", "/metrics"),
                             ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/unknown")):
            r = requests.request(method, s.url + path)
            assert r.status_code == 401 and "API key" in r.json()["detail"], (path, r.status_code)
            assert requests.request(method, s.url + path, headers={"X-API-Key": "wrong"}).status_code == 401
        good = {"X-API-Key": "s3cret-key"}
        assert requests.get(s.url + "/v1/metadata", headers=good).status_code == 200
        assert requests.get(s.url + "/v1/metadata", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        r = requests.post(s.url + "/v1/predict", data=images["png8"].read_bytes(),
                          headers={**good, "Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["predictions"][0]["prediction"]
        # CORS: only the named origin, never a wildcard
        ok = requests.get(s.url + "/health/live", headers={"Origin": "http://ward.local"})
        assert ok.headers["access-control-allow-origin"] == "http://ward.local"
        other = requests.get(s.url + "/health/live", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert s.metrics(good)['xray_errors_total{kind="unauthorized"}'] >= 12
    with Server("--model", tiny_onnx[0], env={"XRAY_API_KEY": "from-env"}) as s:
        assert requests.get(s.url + "/v1/metadata").status_code == 401
        assert requests.get(s.url + "/v1/metadata", headers={"X-API-Key": "from-env"}).status_code == 200


def test_cors_preflight_and_refusals_with_an_api_key(tiny_onnx, tmp_path):
    """With a key and --allow-origin, a browser's preflight needs no key, and the refusals (401, 413) carry
    the CORS headers for the allowed origin (else the page cannot read why); other origins get none."""
    key = tmp_path / "key.txt"
    key.write_text("s3cret-key\n")
    ward, evil = "http://ward.local", "http://evil.example"
    allow = "access-control-allow-origin"
    with Server("--model", tiny_onnx[0], "--api-key-file", key, "--allow-origin", ward, "--max-upload-mb", 1) as s:
        ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key, content-type"}
        r = requests.options(s.url + "/v1/predict", headers={"Origin": ward, **ask})
        assert r.status_code in (200, 204) and r.headers[allow] == ward, (r.status_code, r.text)
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        r = requests.options(s.url + "/v1/predict", headers={"Origin": evil, **ask})
        assert r.status_code >= 400 and allow not in r.headers
        for origin, allowed in ((ward, True), (evil, False)):
            r = requests.get(s.url + "/v1/metadata", headers={"Origin": origin})
            assert r.status_code == 401 and "API key" in r.json()["detail"]
            assert r.headers.get(allow) == (origin if allowed else None), r.headers
            head = raw_http(s.port, f"POST /v1/predict HTTP/1.1\nHost: x\nOrigin: {origin}\nX-API-Key: s3cret-key\n"
                                    "Content-Type: image/png\nContent-Length: 2000000\n")  # over 1 MB, none sent
            assert head.startswith("HTTP/1.1 413"), head
            assert (f"{allow}: {origin}" in head.lower()) is allowed, head
        r = requests.get(s.url + "/v1/metadata", headers={"Origin": ward, "X-API-Key": "s3cret-key"})
        assert r.status_code == 200 and r.headers[allow] == ward


def test_default_bind_is_loopback_and_no_cors(server):
    if os.path.exists("/proc/net/tcp"):  # Linux: the listening socket itself, not the URL the helper built
        assert listening_addresses(server.port) == {"127.0.0.1"}
    r = requests.get(server.url + "/v1/metadata", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    page = requests.get(server.url + "/")
    assert page.status_code == 200 and "not a medical device" in page.text.lower()
    assert '<input id="files" type="file" multiple' in page.text
    assert "http" not in page.text.split("<body>")[1].replace("http-equiv", "")  # nothing from a CDN
