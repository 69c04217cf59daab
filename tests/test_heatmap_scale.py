"""Heatmaps on one scale per model (`xray.cam_scale`): a class whose map is 10x weaker than the prediction's is
drawn 10x fainter, not as hot; a model exported before the key falls back to one scale per image and says so
(/v1/metadata `heatmap`, xray-infer's warning line); xray-export measures the scale on the val split and writes
it into both model files."""
from __future__ import annotations

import base64
import io
import json
import shutil
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import xray_infer
from PIL import Image
from test_infer import radiograph

from xray.common.errors import XrayError
from xray.common.image_spec import ImageSpec
from xray.common.model_meta import ModelInfo
from xray.common.preprocess import preprocess
from xray.infer.heatmap import ALPHA, LEGEND_MODEL, LEGEND_PER_IMAGE, SCALE_NOTE_PER_IMAGE, heat, heat_layer, legend

KEY = "xray.cam_scale"
STRONG, WEAK = 0, 1  # class 1's head row is class 0's / 10: its map is exactly 10x weaker, everywhere


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def film(seed=3, size=300) -> Image.Image:
    return Image.fromarray(np.rint(radiograph(size, seed=seed) * 255).astype(np.uint8), "L")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def alpha(url: str) -> np.ndarray:
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64", head
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))[..., 3].astype(np.float64)


@pytest.fixture(scope="module")
def weak_class_models(tiny_onnx, tmp_path_factory):
    """tiny_onnx's model with maps, NORMAL always predicted (its bias) and PNEUMONIA's head row NORMAL's / 10:
    (the model with xray.cam_scale = the max of NORMAL's map on `film()`, the same model exported before the key,
    that scale)."""
    import copy

    import torch

    from xray.export.edge_graph import OUTPUT_NAMES, EdgeGraph
    from xray.export.onnx_export import export_onnx, set_metadata

    _, model, spec, classes = tiny_onnx
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        head = model.head[-1]
        head.weight[STRONG] *= -1  # the random head's NORMAL map of film() is negative everywhere: make it positive
        head.weight[WEAK] = head.weight[STRONG] / 10
        head.bias[STRONG] += 100.0

    class NoGuard(torch.nn.Module):
        def forward(self, pooled, raw):
            return raw.new_zeros(raw.shape[0])

    root = tmp_path_factory.mktemp("weak_class")
    legacy = root / "legacy" / "model.onnx"
    legacy.parent.mkdir()
    export_onnx(EdgeGraph(model, NoGuard()), spec, legacy, output_names=OUTPUT_NAMES)
    set_metadata(legacy, ModelInfo(classes, spec, "efficientnet_lite0").to_metadata())
    sess = ort.InferenceSession(str(legacy), providers=["CPUExecutionProvider"])
    logits, cam = sess.run(["logits", "cam"], {"input": preprocess(film(), spec)[None]})
    assert logits[0].argmax() == STRONG and cam[0, STRONG].max() > 0
    np.testing.assert_allclose(cam[0, WEAK], cam[0, STRONG] / 10, rtol=1e-3, atol=1e-5)
    scale = float(cam[0, STRONG].max())  # the prediction's peak is drawn at exactly full colour
    scaled = root / "scaled" / "model.onnx"
    scaled.parent.mkdir()
    shutil.copy(legacy, scaled)
    set_metadata(scaled, ModelInfo(classes, spec, "efficientnet_lite0",
                                   cam_scale={"value": scale, "method": "test: the peak of film()"}).to_metadata())
    return scaled, legacy, scale


def test_heat_is_the_map_over_the_models_scale_clipped_and_per_image_without_one():
    spec = ImageSpec().with_size(64)
    strong = np.array([[2.0, 1.0], [-1.0, 0.5]], np.float32)
    on_scale = heat((40, 40), strong, spec, scale=2.0)
    assert on_scale.max() == pytest.approx(1.0, abs=1e-6) and on_scale.min() == 0.0  # ReLU'd
    np.testing.assert_allclose(heat((40, 40), strong / 10, spec, scale=2.0), on_scale / 10, atol=1e-6)
    assert heat((40, 40), strong * 3, spec, scale=2.0).max() == 1.0  # stronger than the scale: clipped, not wrapped
    # per image (no scale): each map on its own maximum, so the weak one looks exactly as hot as the strong one
    np.testing.assert_allclose(heat((40, 40), strong / 10, spec), heat((40, 40), strong, spec), atol=1e-6)
    weak_layer = np.asarray(heat_layer((40, 40), strong / 10, spec, 2.0))[..., 3]
    strong_layer = np.asarray(heat_layer((40, 40), strong, spec, 2.0))[..., 3]
    assert strong_layer.max() == round(255 * ALPHA) and weak_layer.max() == round(255 * ALPHA / 10)
    with pytest.raises(ValueError):
        heat((40, 40), strong, spec, scale=0.0)


def test_legend_has_exactly_scale_value_legend():
    assert legend(1.5) == {"scale": "model", "value": 1.5, "legend": LEGEND_MODEL}
    assert legend(None) == {"scale": "per_image", "value": None, "legend": LEGEND_PER_IMAGE}
    assert "99th percentile" in LEGEND_MODEL and "weak class stays faint" in LEGEND_MODEL
    assert "xray.cam_scale" in LEGEND_PER_IMAGE and "xray.cam_scale" in SCALE_NOTE_PER_IMAGE


def test_cam_scale_metadata_round_trip_fallback_and_corrupt(weak_class_models):
    scaled, legacy, scale = weak_class_models
    info = ModelInfo.from_metadata(metadata(scaled))
    assert info.cam_scale_value == pytest.approx(scale) and json.loads(metadata(scaled)[KEY])["value"] == scale
    assert ModelInfo.from_metadata(info.to_metadata()).cam_scale == info.cam_scale
    assert KEY not in metadata(legacy) and ModelInfo.from_metadata(metadata(legacy)).cam_scale_value is None
    for bad in ('{"value": 0}', '{"value": -1}', '{"value": "big"}', '{"method": "no value"}', '{"value": NaN}'):
        with pytest.raises(XrayError, match="cam_scale"):
            ModelInfo.from_metadata({**metadata(scaled), KEY: bad})


def test_a_10x_weaker_class_renders_10x_fainter_from_the_models_own_scale(weak_class_models, tiny_onnx):
    """render() with the scale read from the model file (what the service passes): the weak class's layer is a
    tenth of the prediction's, in alpha and in colour values; without the key both are equally hot."""
    from xray.serve.views import Views, render

    _, _, spec, classes = tiny_onnx
    image = film()
    for path, expect in ((weak_class_models[0], 0.1), (weak_class_models[1], 1.0)):
        info = ModelInfo.from_metadata(metadata(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        _, cam = sess.run(["logits", "cam"], {"input": preprocess(image, spec)[None]})
        record = {"prediction": classes[STRONG]}
        strong = render(image, Views(heatmap=True), record, cam[0], classes, spec, info.cam_scale_value)
        weak = render(image, Views(heatmap=True, heatmap_class=WEAK), record, cam[0], classes, spec,
                      info.cam_scale_value)
        assert (strong["heatmap_class"], weak["heatmap_class"]) == (classes[STRONG], classes[WEAK])
        a_strong, a_weak = alpha(strong["heatmap"]), alpha(weak["heatmap"])
        assert a_strong.max() >= round(255 * ALPHA) - 2  # the prediction reaches (nearly) full colour either way
        assert a_weak.sum() / a_strong.sum() == pytest.approx(expect, rel=0.05)
        assert a_weak.max() / a_strong.max() == pytest.approx(expect, rel=0.1)


@pytest.fixture(scope="module")
def clients(weak_class_models, cam_onnx, tiny_onnx):
    """The app in this process for: the scaled model, the same model without the key, a model without maps."""
    from contextlib import ExitStack

    from fastapi.testclient import TestClient

    from xray.infer.model import open_model
    from xray.serve.app import create_app
    from xray.serve.settings import Settings

    with ExitStack() as stack:
        out = {}
        for name, path in (("scaled", weak_class_models[0]), ("legacy", weak_class_models[1]), ("plain", tiny_onnx[0])):
            model, _ = open_model(str(path), "fp32", 1, False)
            out[name] = stack.enter_context(TestClient(create_app(model, Settings(decode_workers=1))))
        for c in out.values():
            deadline = time.monotonic() + 60
            while c.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "the app never became ready"
                time.sleep(0.05)
        yield out


def test_v1_metadata_says_how_the_heatmaps_are_scaled(clients, weak_class_models):
    scale = weak_class_models[2]
    scaled = clients["scaled"].get("/v1/metadata").json()
    assert scaled["heatmaps"] is True
    assert scaled["heatmap"] == {"scale": "model", "value": pytest.approx(scale), "legend": LEGEND_MODEL}
    legacy = clients["legacy"].get("/v1/metadata").json()
    assert legacy["heatmap"] == {"scale": "per_image", "value": None, "legend": LEGEND_PER_IMAGE}
    plain = clients["plain"].get("/v1/metadata").json()
    assert plain["heatmaps"] is False and plain["heatmap"] is None
    schema = clients["scaled"].get("/openapi.json").json()["components"]["schemas"]
    assert set(schema["HeatmapScale"]["properties"]) == {"scale", "value", "legend"}


def test_v1_predict_draws_a_weak_class_faint_on_the_models_scale(clients):
    """/v1/predict?heatmap=true vs ?heatmap_class=PNEUMONIA on the same film: on the model's scale the weak class
    is a tenth of the prediction; the model without the key draws both as hot (per image)."""
    data = png(film())
    for name, expect in (("scaled", 0.1), ("legacy", 1.0)):
        c = clients[name]
        (strong,) = c.post("/v1/predict", params={"heatmap": "true"},
                           files=[("file", ("f.png", data))]).json()["predictions"]
        (weak,) = c.post("/v1/predict", params={"heatmap_class": "PNEUMONIA"},
                         files=[("file", ("f.png", data))]).json()["predictions"]
        assert strong["heatmap_class"] == "NORMAL" and weak["heatmap_class"] == "PNEUMONIA"
        a_strong, a_weak = alpha(strong["heatmap"]), alpha(weak["heatmap"])
        assert a_weak.sum() / a_strong.sum() == pytest.approx(expect, rel=0.05), name


def test_xray_infer_warns_once_when_a_model_has_no_scale(weak_class_models, tmp_path):
    scaled, legacy, _ = weak_class_models
    files = []
    for seed in (1, 2):
        files.append(tmp_path / f"film{seed}.png")
        film(seed).save(files[-1])
    old = xray_infer("-m", legacy, *files, "--heatmap", tmp_path / "legacy", "-f", "jsonl")
    assert old.stderr.count(SCALE_NOTE_PER_IMAGE) == 1, old.stderr
    new = xray_infer("-m", scaled, *files, "--heatmap", tmp_path / "scaled", "-f", "jsonl")
    assert SCALE_NOTE_PER_IMAGE not in new.stderr and len(list((tmp_path / "scaled").iterdir())) == 2


def test_export_writes_the_val_splits_cam_scale_into_both_models(exported):
    """xray.cam_scale of each model file: per predicted class, the 99th percentile of the positive values of the
    maps of the val images predicted as it, and the median of these, from that file's own outputs (recomputed
    here); int8's within 10 % of fp32's."""
    from xray.common.imageio import load_image
    from xray.train.data import scan_split

    out, proc = exported
    assert "heatmaps: one scale per model" in proc.stderr
    data = out.parent.parent / "data"
    info = ModelInfo.from_metadata(metadata(out / "model.onnx"))
    _, val = scan_split(data / "val", info.classes)
    scales = {}
    for name in ("model.onnx", "model.int8.onnx"):
        stored = json.loads(metadata(out / name)[KEY])
        assert stored["value"] > 0 and f"over {len(val)} val images" in stored["method"]
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        x = np.stack([preprocess(load_image(p, draft_size=info.spec.resize_size), info.spec) for p, _ in val])
        logits, cam = sess.run(["logits", "cam"], {"input": x})
        predicted = logits.argmax(1)
        maps = cam[np.arange(len(x)), predicted]
        per_class = {info.classes[c]: np.percentile(maps[predicted == c][maps[predicted == c] > 0], 99)
                     for c in sorted(set(predicted)) if (maps[predicted == c] > 0).any()}
        assert stored["per_class"] == pytest.approx(per_class, rel=1e-4)
        assert stored["value"] == pytest.approx(np.median(list(per_class.values())), rel=1e-4)
        scales[name] = stored["value"]
    assert scales["model.int8.onnx"] == pytest.approx(scales["model.onnx"], rel=0.1)
