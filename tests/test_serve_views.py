"""POST /v1/predict?preview=true&heatmap=true: each image as decoded (DICOM windowing and MONOCHROME1 applied)
and its class activation map as a transparent layer of the same size; off by default; a clear 400 for a
model without heatmaps or an unknown class; an image the guard abstained on gets no heatmap unless asked."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image
from serving import Server
from test_common_imageio import _find_rg1
from test_infer import radiograph

from xray.common.image_spec import ImageSpec
from xray.common.imageio import load_image

pytestmark = pytest.mark.slow


def decode_url(url: str, kind: str) -> Image.Image:
    head, _, data = url.partition(",")
    assert head == f"data:image/{kind};base64", head
    return Image.open(io.BytesIO(base64.b64decode(data)))


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(image * 255).astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(cam_onnx):
    with Server("--model", cam_onnx) as s:
        yield s


def post(server, files, **params):
    return requests.post(server.url + "/v1/predict", params=params, files=[("file", f) for f in files], timeout=60)


def test_off_by_default_no_views_in_the_answer(server):
    answer = post(server, [("a.png", png_bytes(radiograph(300, seed=1)))])
    assert answer.status_code == 200
    (record,) = answer.json()["predictions"]
    assert not {"preview", "heatmap", "heatmap_class"} & set(record)


def test_preview_and_heatmap_of_a_png_and_a_monochrome1_dicom(server):
    rg1 = _find_rg1()
    films = [("film.png", png_bytes(radiograph(1500, seed=2))), ("rg1.dcm", open(rg1, "rb").read())]
    answer = post(server, films, preview="true", heatmap="true")
    assert answer.status_code == 200
    for (name, data), record in zip(films, answer.json()["predictions"]):
        preview = decode_url(record["preview"], "jpeg")
        assert preview.mode == "L" and max(preview.size) == 1024  # both films are larger: shrunk to 1024
        decoded = load_image(data, name=name, draft_size=ImageSpec().with_size(64).resize_size)
        assert abs(preview.size[0] / preview.size[1] - decoded.size[0] / decoded.size[1]) < 0.01
        # the same pixels as the decoder's (MONOCHROME1 inverted for RG1), within JPEG and resampling error
        expected = np.asarray(decoded.resize(preview.size, Image.Resampling.BILINEAR), np.float32)
        assert np.abs(np.asarray(preview, np.float32) - expected).mean() < 6, name
        layer = decode_url(record["heatmap"], "png")
        assert layer.mode == "RGBA" and layer.size == preview.size
        assert record["heatmap_class"] == record["prediction"]


def test_a_trained_models_heatmap_is_coloured_where_it_looked_and_abstained_images_get_none(exported):
    """The trained run's export (with its guard): an in-distribution film's layer shows the colour ramp where the
    model looked and is clear elsewhere; a flagged photo-like image abstained on gets no heatmap unless a class
    is named."""
    folder, _ = exported
    # every test film: on the model's one heatmap scale (xray.cam_scale) a film whose whole map is above it is
    # uniformly saturated (the 3-epoch run's 2 x 2 maps), one far below it faint
    films = sorted((folder.parent.parent / "data" / "test").glob("*/*"))
    noise = Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 400, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    with Server("--model", folder / "model.onnx") as server:
        records = post(server, [(p.name, p.read_bytes()) for p in films], heatmap="true").json()["predictions"]
        coloured = 0
        for record in records:
            if record.get("ood"):
                continue
            rgba = np.asarray(decode_url(record["heatmap"], "png"))
            shown = rgba[..., 3] > 0
            coloured += bool(shown.any() and (rgba[shown][:, 0] != rgba[shown][:, 2]).any()
                             and rgba[..., 3].min() < rgba[..., 3].max())
        assert coloured, "no in-distribution film got a coloured heatmap"
        (flagged,) = post(server, [("noise.png", buf.getvalue())], heatmap="true",
                          ood_action="abstain").json()["predictions"]
        assert flagged["prediction"] == "OUT_OF_DISTRIBUTION" and "heatmap" not in flagged
        (named,) = post(server, [("noise.png", buf.getvalue())], heatmap_class="NORMAL",
                        ood_action="abstain").json()["predictions"]
        assert named["heatmap_class"] == "NORMAL" and decode_url(named["heatmap"], "png").size == (400, 300)


def test_heatmap_class_names_the_class_and_errors_are_one_line(server, tiny_onnx):
    film = [("a.png", png_bytes(radiograph(200, seed=3)))]
    (record,) = post(server, film, heatmap_class="TUBERCULOSIS").json()["predictions"]
    assert record["heatmap_class"] == "TUBERCULOSIS" and "heatmap" in record and "preview" not in record
    bad = post(server, film, heatmap="true", heatmap_class="FRACTURE")
    assert bad.status_code == 400 and "not one of the model's classes" in bad.json()["detail"]
    with Server("--model", tiny_onnx[0]) as plain:  # exported without the maps
        refused = post(plain, film, heatmap="true")
        assert refused.status_code == 400 and "has no heatmaps" in refused.json()["detail"]
        assert "\n" not in refused.json()["detail"]
        assert post(plain, film, preview="true").status_code == 200  # a preview needs no maps


def test_an_abstained_image_gets_no_heatmap_unless_a_class_is_named():
    from xray.serve.views import Views, render

    spec = ImageSpec().with_size(64)
    image = Image.fromarray(np.full((80, 100), 128, np.uint8), "L")
    cam = np.random.default_rng(0).random((3, 2, 2)).astype(np.float32)
    classes = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    abstained = {"prediction": "OUT_OF_DISTRIBUTION", "ood": True}
    assert "heatmap" not in render(image, Views(heatmap=True), abstained, cam, classes, spec)
    named = render(image, Views(heatmap=True, heatmap_class=1), abstained, cam, classes, spec)
    assert named["heatmap_class"] == "PNEUMONIA" and decode_url(named["heatmap"], "png").size == (100, 80)
