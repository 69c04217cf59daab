"""The trust outputs: CAM and out-of-distribution score inside the ONNX graph, the guard's decisions
through xray-infer, heatmaps, the probe sets, and models exported before any of it."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, ROOT, run_command, run_script, xray_export, xray_infer
from PIL import Image

from xray.common.imageio import load_image
from xray.common.metrics import ood_separation
from xray.common.preprocess import preprocess
from xray.common.probes import GENERATED, GROUP, TRANSFORMED, probe_sets
from xray.evaluate.gradcam import gradcam
from xray.export.edge_graph import OUTPUT_NAMES, EdgeGraph, feature_map, pooled_and_logits
from xray.export.ood import METHODS, OodScorer
from xray.export.onnx_export import export_onnx
from xray.train.data import scan_split
from xray.train.models import REGISTRY, build_model


def chest_batch(synthetic_raw, spec, n=12):
    files = sorted(p for p in synthetic_raw.rglob("*") if p.suffix in (".png", ".jpeg"))[:: max(1, 90 // n)][:n]
    return torch.from_numpy(np.stack([preprocess(load_image(p), spec) for p in files]))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_feature_map_is_what_the_backbone_pools(name):
    torch.manual_seed(0)
    model = build_model(name, 3, pretrained=False).eval()
    x = torch.randn(2, REGISTRY[name].spec.channels, 64, 64)
    with torch.no_grad():
        fmap = feature_map(model.backbone, x)
        assert fmap.dim() == 4 and fmap.shape[2] * fmap.shape[3] > 1
        assert torch.allclose(fmap.mean(dim=(2, 3)), model.backbone(x), atol=1e-5)


@pytest.fixture(scope="module")
def lite(synthetic_raw):
    """ImageNet Lite0 at 64 px with a sharpened random head, and chest images for it."""
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 3, pretrained=True).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(10)
    spec = REGISTRY["efficientnet_lite0"].spec.with_size(64)
    return model, spec, chest_batch(synthetic_raw, spec, 24)


@pytest.mark.parametrize("method", METHODS)
def test_in_graph_ood_score_equals_the_numpy_reference(lite, tmp_path, method):
    model, spec, x = lite
    fit, held_out = x[:16], x[16:]
    with torch.no_grad():
        feats, logits = pooled_and_logits(model, fit)
        scorer = OodScorer.fit(method, feats.numpy())
        graph = EdgeGraph(model, scorer.module(), temperature=1.7).eval()
    noise = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (4, 3, 64, 64)).astype(np.float32))
    probe = torch.cat([held_out, noise])
    path = tmp_path / "m.onnx"
    export_onnx(graph, spec, path, output_names=OUTPUT_NAMES)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    _, ood, _ = sess.run(None, {"input": probe.numpy()})
    with torch.no_grad():
        f, z = pooled_and_logits(model, probe)
    ref = scorer.score(f.numpy(), z.numpy())
    assert np.abs(ood - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert ood[-4:].min() > ood[:-4].max() or method == "energy", "noise must score stranger than chest images"


def test_mahalanobis_is_exact_while_the_training_set_is_smaller_than_its_rank():
    """Ledoit-Wolf's shrunk covariance of n < 257 features is low-rank + identity: the 256-direction form
    equals the full D x D Mahalanobis distance; with more images it approximates it (one floor variance)."""
    from sklearn.covariance import LedoitWolf

    from xray.export.ood import l2_normalise

    rng = np.random.default_rng(0)
    mix = rng.standard_normal((512, 512)) * 0.1  # D = 512: 256 directions kept, 256 at the floor
    feats = rng.standard_normal((120, 512)) @ mix + 1
    test = l2_normalise(rng.standard_normal((10, 512)) @ mix + 1)
    z = l2_normalise(feats)
    mean = z.mean(axis=0)
    cov = LedoitWolf(assume_centered=True).fit(z - mean).covariance_
    full = np.einsum("nd,de,ne->n", test - mean, np.linalg.inv(cov), test - mean) / 512
    assert np.allclose(OodScorer.fit("mahalanobis", feats).score(test, None), full, rtol=1e-8)


def test_in_graph_cam_is_the_head_over_the_feature_map_and_grad_cam(lite, tmp_path):
    model, spec, x = lite
    with torch.no_grad():
        graph = EdgeGraph(model, OodScorer.fit("energy", np.zeros((2, 1280))).module(), temperature=2.0).eval()
    path = tmp_path / "m.onnx"
    export_onnx(graph, spec, path, output_names=OUTPUT_NAMES)
    logits, _, cam = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        fmap = feature_map(model.backbone, x)
        ref = torch.einsum("ck,nkhw->nchw", model.head[-1].weight, fmap).numpy()
        raw = model(x).numpy()
    assert cam.shape == (len(x), 3, 2, 2) and np.abs(cam - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    bias = model.head[-1].bias.detach().numpy()
    assert np.allclose(cam.mean(axis=(2, 3)) + bias, raw, atol=1e-4)  # CAM decomposes the un-tempered logit
    assert np.allclose(logits, raw / 2.0, atol=1e-4)  # the class output carries the temperature
    corrs = []
    for i in range(len(x)):
        c = int(raw[i].argmax())
        g, explained = gradcam(model, x[i:i + 1], c)
        ours = F.interpolate(torch.from_numpy(np.maximum(cam[i:i + 1, c:c + 1], 0)), size=g.shape, mode="bilinear",
                             align_corners=False)[0, 0].numpy()
        if g.max() > 0:
            corrs.append(np.corrcoef(ours.ravel(), g.ravel())[0, 1])
    assert len(corrs) >= len(x) // 2 and min(corrs) >= 0.99, corrs


def test_temperature_leaves_the_ood_score_alone(lite):
    model, _, x = lite
    with torch.no_grad():
        scorer = OodScorer.fit("mahalanobis", pooled_and_logits(model, x)[0].numpy())
        one, two = (EdgeGraph(model, scorer.module(), t).eval()(x) for t in (None, 3.0))
    assert torch.allclose(one[0], two[0] * 3.0, atol=1e-5)
    assert torch.equal(one[1], two[1]) and torch.equal(one[2], two[2])


def test_probe_sets_are_reproducible_and_complete(synthetic_raw):
    chest = [load_image(p) for p in sorted(synthetic_raw.rglob("*.png"))[:5]]
    a, b = probe_sets(chest, per_family=3, seed=4), probe_sets(chest, per_family=3, seed=4)
    assert set(a) == set(TRANSFORMED) | set(GENERATED) | {"photographs", "other_medical"}  # scikit-image: dev extra
    for family, images in a.items():
        assert images and all(im.mode == "L" for im in images), family
        assert all(np.array_equal(np.asarray(i), np.asarray(j)) for i, j in zip(images, b[family])), family
    assert np.array_equal(np.asarray(a["inverted"][0]), 255 - np.asarray(chest[0]))
    assert a["rotated_90"][0].size == chest[0].size[::-1]
    assert np.asarray(a["flat_grey"][0]).std() == 0 and np.asarray(a["noise"][0]).std() > 50
    assert len(a["photographs"]) >= 10
    assert {GROUP[f] for f in a} == {"transformed", "generated", "photographs"}


def test_ood_separation_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(0, 1, 200), rng.normal(1.5, 1, 50)
    m = ood_separation(s_in, s_out)
    assert m["auroc"] == pytest.approx(roc_auc_score(np.r_[np.zeros(200), np.ones(50)], np.r_[s_in, s_out]))
    assert m["fpr_at_95"] == pytest.approx((s_out <= np.sort(s_in)[189]).mean())
    assert ood_separation(s_in, s_in + 100) == {"auroc": 1.0, "fpr_at_95": 0.0}


# ------------------------------------------------------------------ the trained run, through the real CLIs


def test_export_report_and_metadata_carry_the_guard(exported):
    out, proc = exported
    report = json.loads((out / "export_report.json").read_text())
    trust, guard = report["trust"], report["trust"]["guard"]
    assert guard["score"] == "mahalanobis" and set(trust["methods"]) == set(METHODS)
    assert guard["val_acceptance"] >= guard["accept"] == 0.95
    assert trust["backends"]["onnx_fp32"]["ood_score_max_rel_diff"] <= 1e-4
    assert trust["backends"]["onnx_fp32"]["cam_max_rel_diff"] <= 1e-4
    assert trust["backends"]["onnx_int8"]["ood_decision_agreement"] >= 0.98 == report["gate"]["min_ood_agreement"]
    assert trust["backends"]["onnx_int8"]["cam_correlation_mean"] >= 0.8
    for family, m in trust["families"].items():
        if m["group"] == "generated":
            assert m["flagged_pytorch"] == m["flagged_onnx_fp32"] == m["flagged_onnx_int8"] == 1.0, family
    assert "## Out-of-distribution guard and heatmaps" in proc.stdout and "| noise | generated |" in proc.stdout
    for name, own in (("model.onnx", guard), ("model.int8.onnx", trust["int8_guard"])):
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
        meta = json.loads(sess.get_modelmeta().custom_metadata_map["xray.ood"])
        assert meta == own and meta["statistics_sha256"] == guard["statistics_sha256"]
        assert meta["val_acceptance"] >= 0.95 and meta["threshold"] > 0


@pytest.fixture(scope="module")
def guard_run(tmp_path_factory):
    """Lite0 at 160 px (5 x 5 maps) trained briefly (phases A and B) on 300 synthetic films, exported: enough val and test
    images (45 each) for the guard's acceptance to mean something, and maps fine enough to locate findings."""
    base = tmp_path_factory.mktemp("guard")
    run_script("make_synthetic", "--out", base / "raw", "--per-class", 100, "--size", 160, "--seed", 3)
    run_script("split_dataset", "--raw", base / "raw", "--out", base / "data")
    run_command([sys.executable, ROOT / "train" / "main.py", "--data-dir", base / "data", "--output-dir", base,
                 "--run-name", "g", "--image-size", 160, "--batch-size", 16, "--workers", 0, "--phases", "A,B",
                 "--epochs-a", 6, "--epochs-b", 4, "--lr-a", 3e-3])
    xray_export(base / "g", *QUICK, "--min-agreement", 0.5, "--max-accuracy-drop", 50)
    return base / "g", base / "data"


def write_probes(folder, data, per_family=4):
    """Generated non-radiographs and transformed test images as PNG files, by family."""
    folder.mkdir()
    _, test = scan_split(data / "test")
    files = {}
    chest = [load_image(p) for p, _ in test[::7][:per_family]]
    for family, images in probe_sets(chest, per_family=per_family).items():
        for k, im in enumerate(images):
            files.setdefault(family, []).append(folder / f"{family}_{k}.png")
            im.save(files[family][-1])
    return files


@pytest.mark.xdist_group("guard_run")  # one worker builds the run
def test_xray_infer_flags_every_generated_probe_and_accepts_test_images(guard_run, tmp_path):
    run, data = guard_run
    out = run / "export"
    files = write_probes(tmp_path / "probes", data)
    for model in ("model.int8.onnx", "model.onnx"):
        generated = [f for fam in GENERATED for f in files[fam]]
        proc = xray_infer("-m", out / model, *generated, "-f", "jsonl")
        recs = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(recs) == len(generated) and all(r["ood"] is True for r in recs), [r["file"] for r in recs if not r["ood"]]
        assert proc.stderr.count("not like the training data") == len(generated)
        ev = json.loads(xray_infer("-m", out / model, data / "test", "--eval", "-f", "json").stdout)
        assert len(ev["predictions"]) == 45 and ev["metrics"]["ood_acceptance"] >= 0.9
    table = xray_infer("-m", out / "model.int8.onnx", files["noise"][0], data / "test",
                       "--ood-action", "abstain").stdout.splitlines()
    assert table[0].split()[-2:] == ["ood", "ood_score"]
    noise_row = next(line for line in table if "noise_0" in line).split()
    assert noise_row[1:3] == ["OUT_OF_DISTRIBUTION", "-"] and noise_row[-2] == "OOD"
    rows = list(csv.DictReader(io.StringIO(xray_infer("-m", out / "model.int8.onnx", files["noise"][0], "-f", "csv",
                                                      "--ood-action", "abstain").stdout)))
    assert rows[0]["prediction"] == "OUT_OF_DISTRIBUTION" and rows[0]["ood"] == "true"
    assert "threshold" in rows[0]["reason"] and rows[0]["probability"] == ""


@pytest.mark.xdist_group("guard_run")  # one worker builds the run
def test_heatmaps_are_pngs_the_size_of_the_input(guard_run, tmp_path):
    run, data = guard_run
    _, test = scan_split(data / "test")
    files = [p for p, _ in test[::10][:3]]
    proc = xray_infer("-m", run / "export" / "model.int8.onnx", *files, "--heatmap", tmp_path / "hm", "-f", "jsonl")
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(sorted((tmp_path / "hm").iterdir())) == len(files)
    colourful = 0  # on the model's one scale (xray.cam_scale) a weak map is faint: a colour map over at least one
    for f, rec in zip(files, recs):
        png = tmp_path / "hm" / f"{Path(f).stem}.{rec['prediction']}_{rec['probability']:.2f}.png"
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im, Image.open(f) as src:
            assert im.format == "PNG" and im.size == src.size and im.mode == "RGB"
            rgb = np.asarray(im).astype(int)
        assert rgb.std() > 10
        colourful += np.abs(rgb[..., 0] - rgb[..., 2]).max() > 40
    assert colourful, "a colour map over the image, not blank"


def test_models_without_the_trust_outputs_still_run(tiny_onnx, synthetic_raw, tmp_path):
    path, _, _, classes = tiny_onnx
    f = str(next(synthetic_raw.rglob("*.png")))
    proc = xray_infer("-m", path, f, "-f", "json")
    rec = json.loads(proc.stdout)["predictions"][0]
    assert rec["prediction"] in classes and "ood" not in rec and "ood_score" not in rec
    assert proc.stderr.count("\n") == 1 and "no out-of-distribution guard" in proc.stderr
    rows = list(csv.DictReader(io.StringIO(xray_infer("-m", path, f, "-f", "csv").stdout)))
    assert "ood" not in rows[0]
    bad = xray_infer("-m", path, f, "--heatmap", tmp_path / "hm", check=False)
    assert bad.returncode == 2 and bad.stdout == "" and "no class activation maps" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 2  # the note, then the one-line error


@pytest.mark.xdist_group("guard_run")  # one worker builds the run
def test_cam_peaks_where_the_generator_puts_the_findings(guard_run):
    """The in-graph maps of held-out films (val + test): TUBERCULOSIS's centroid sits in the upper half (nodules
    above the lung centre), PNEUMONIA's in the lower half (consolidation below it). A phase-A-only model
    (frozen ImageNet features) locates the diffuse consolidation poorly (0.37 here); phase B fixes it."""
    from xray.infer.model import EdgeModel
    from xray.infer.predict import predict_files

    run, data = guard_run
    model = EdgeModel(run / "export" / "model.onnx")
    classes = model.info.classes
    samples = scan_split(data / "val", classes)[1] + scan_split(data / "test", classes)[1]
    shares = {}
    for cls, upper in (("TUBERCULOSIS", True), ("PNEUMONIA", False)):
        c = classes.index(cls)
        results = list(predict_files(model, [p for p, label in samples if label == c], cam=True))
        cam = np.maximum(np.stack([r.cam[c] for r in results]), 0)
        rows = (np.arange(cam.shape[1]) + 0.5) / cam.shape[1]
        centre = (cam.sum(2) * rows).sum(1) / np.maximum(cam.sum((1, 2)), 1e-9)  # vertical centroid, 0 = top
        shares[cls] = float(((centre < 0.5) if upper else (centre > 0.5)).mean())
    assert cam.shape[1:] == (5, 5) and len(results) == 30
    assert shares["TUBERCULOSIS"] >= 0.8 and shares["PNEUMONIA"] >= 0.75, shares  # measured here: 1.0 and 0.9
