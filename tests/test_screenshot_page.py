"""scripts/screenshot_page.py, the maker of docs/serve_page.png, on a small model in seconds: it runs the real
xray-serve and headless Chromium, uploads two films, the CR DICOM and a photograph, and writes a PNG of the
requested size with four cards, the photograph flagged."""
from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def guarded_cam_onnx(tiny_onnx, tmp_path_factory):
    """cam_onnx's model (tiny_onnx with the class activation map output) plus an out-of-distribution guard that
    works: cam_onnx has none, and the screenshot must show a flagged photograph. The kNN score over the pooled
    features of 30 synthetic films (no fitting: seconds), its threshold twice the highest score of 15 other films
    (films score ~0.1, a photograph ~0.7)."""
    import torch
    from make_synthetic import KNOWN_FINDINGS, Anatomy, encode, render

    from xray.common.model_meta import ModelInfo
    from xray.export.edge_graph import OUTPUT_NAMES, EdgeGraph, pooled_and_logits
    from xray.export.ood import OodScorer
    from xray.export.onnx_export import export_onnx, set_metadata
    from xray.infer.predict import prepare

    _, model, spec, classes = tiny_onnx

    def features(seeds, stream):
        films = []
        for seed in seeds:
            for ci, finding in enumerate(KNOWN_FINDINGS.values()):
                rng = np.random.default_rng([seed, ci, stream])
                films.append(prepare(encode(render(finding, Anatomy.sample(rng, 128), rng), "png"), spec, name="f.png"))
        with torch.no_grad():
            return [t.numpy() for t in pooled_and_logits(model, torch.from_numpy(np.stack(films)))]

    scorer = OodScorer.fit("knn", features(range(10), 11)[0])
    threshold = 2 * float(scorer.score(*features(range(5), 12)).max())
    path = tmp_path_factory.mktemp("guarded_cam_onnx") / "model.onnx"
    export_onnx(EdgeGraph(model, scorer.module()), spec, path, output_names=OUTPUT_NAMES)
    guard = {"score": "knn", "output": "ood_score", "higher_is_ood": True, "threshold": threshold}
    set_metadata(path, ModelInfo(classes, spec, "efficientnet_lite0", precision="fp32", ood=guard).to_metadata())
    return path


def test_screenshot_shows_four_cards_with_the_photograph_flagged(guarded_cam_onnx, tmp_path):
    out = tmp_path / "page.png"
    # an untrained head: its calls may be wrong, so --any-prediction (never used for docs/serve_page.png)
    proc = run_script("screenshot_page", "--model", guarded_cam_onnx, "--out", out, "--size", "1200x880",
                      "--film-size", "128", "--any-prediction")
    assert Image.open(out).size == (1200, 880)
    cards = re.findall(r"^card (\d): (\S+): (.*)$", proc.stdout, re.M)
    assert [int(n) for n, _, _ in cards] == [1, 2, 3, 4], proc.stdout
    names = [name for _, name, _ in cards]
    assert names[0].startswith("synthetic_normal_") and names[1].startswith("synthetic_tuberculosis_")
    assert names[2:] == ["RG1_UNCR.dcm", "holiday_photo.jpg"]
    for _, _, line in cards[:2]:  # each film's heatmap drawn over it, seen in the browser's pixels
        assert int(re.search(r"heatmap on: \w+, (\d+) coloured pixels", line).group(1)) > 200, line
    assert cards[3][2].startswith("Not assessed") and "flagged" in cards[3][2]
    assert re.search(r"^film NORMAL: seed \d+", proc.stdout, re.M)
    assert "Not assessed" not in "".join(line for _, _, line in cards[:2])


def test_screenshot_refuses_a_model_without_a_guard_in_one_line(cam_onnx, tmp_path):
    proc = run_script("screenshot_page", "--model", cam_onnx, "--out", tmp_path / "page.png", "--any-prediction",
                      check=False)
    assert proc.returncode == 1 and not (tmp_path / "page.png").exists()
    assert proc.stderr.strip().count("\n") == 0 and "no out-of-distribution guard" in proc.stderr
