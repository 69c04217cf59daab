"""xray-eval: metrics against scikit-learn, PyTorch vs ONNX agreement, plots, failure modes, bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path
import shutil
import sys

import numpy as np
import pytest
from conftest import run_command
from PIL import Image
from sklearn import metrics as skm

from xray.evaluate.analysis import expected_calibration_error, failures, hard_examples

EVAL = [sys.executable, "-c", "from xray.evaluate.cli import main; main(prog_name='xray-eval')"]


def xray_eval(*args, check=True):
    return run_command(EVAL + list(args), check=check)


@pytest.fixture(scope="session")  # session: xdist's loadgroup interleaves modules, which would rebuild a module fixture
def evaluated(run, exported, tmp_path_factory):
    """The tiny run evaluated on its test split from the checkpoint and from the fp32 ONNX model."""
    base = tmp_path_factory.mktemp("eval")
    test = run.parent / "data" / "test"
    xray_eval(run, test, "--output-dir", base / "pt")
    xray_eval(exported[0] / "model.onnx", test, "--output-dir", base / "onnx")
    return base, test


def load(out):
    z = np.load(out / "probabilities.npz")
    return json.loads((out / "metrics.json").read_text()), z["probs"], z["labels"], list(z["files"])


def test_metrics_match_scikit_learn(evaluated):
    m, probs, labels, _ = load(evaluated[0] / "pt")
    pred = probs.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(labels, pred, average="weighted"))
    assert m["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=[0, 1, 2]), rel=1e-6)
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=[0, 1, 2]).tolist()
    assert m["roc_auc_ovr"]["macro"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr"))
    for i, c in enumerate(m["classes"]):
        assert m["per_class"][c]["recall"] == pytest.approx(skm.recall_score(labels, pred, labels=[i], average="macro"))
        assert m["average_precision"][c] == pytest.approx(skm.average_precision_score(labels == i, probs[:, i]))
    assert 0 <= m["ece"] <= 1 and sum(b["count"] for b in m["reliability"]) == len(labels)


def test_pytorch_and_onnx_give_the_same_numbers(evaluated):
    pt, p_pt, y_pt, f_pt = load(evaluated[0] / "pt")
    ox, p_ox, y_ox, f_ox = load(evaluated[0] / "onnx")
    assert f_pt == f_ox and (y_pt == y_ox).all()
    # the export calibrated the graph (T fitted on val); the checkpoint stays raw: undo T, softmax(T log p)
    t = ox["temperature"]
    assert t != 1.0 and ox["temperature_source"] == "baked into the ONNX graph by xray-export"
    assert pt["temperature"] == 1.0 and pt["temperature_source"] == "uncalibrated"
    raw = np.exp(t * np.log(p_ox))
    raw /= raw.sum(axis=1, keepdims=True)
    assert np.abs(p_pt - raw).max() <= 1e-4
    assert ox["calibration_effect"]["before"]["ece"] == pytest.approx(pt["ece"], abs=1e-4)
    assert pt["accuracy"] == ox["accuracy"] and pt["confusion_matrix"] == ox["confusion_matrix"]
    assert pt["model"]["kind"] == "pytorch" and ox["model"]["kind"] == "onnx"


def test_reports_name_no_absolute_path(evaluated, run, exported):
    """report.md, metrics.json, hard_examples.csv and MODEL_CARD.md travel: paths relative to their own folder
    (they resolve from there), the artifact also by sha256; none of this machine's absolute paths."""
    import os

    from xray.common.artifacts import sha256_file

    base, test = evaluated
    machine = {str(p) for p in (Path.home(), Path("/tmp"), Path.cwd(), base.resolve(), Path(os.sep) / "root")}
    cards = {run / "MODEL_CARD.md": run / "best.safetensors", exported[0] / "MODEL_CARD.md": exported[0] / "model.onnx"}
    files = [base / kind / n for kind in ("pt", "onnx") for n in ("report.md", "metrics.json", "hard_examples.csv")]
    for f in files + list(cards):
        text = f.read_text()
        assert not [m for m in machine if m in text], (f, [m for m in machine if m in text])
    for kind in ("pt", "onnx"):
        m = json.loads((base / kind / "metrics.json").read_text())
        assert (base / kind / m["data"]).resolve() == test.resolve() and (base / kind / m["model"]["path"]).is_file()
        rows = list(csv.DictReader(open(base / kind / "hard_examples.csv")))
        assert rows and all((base / kind / r["path"]).is_file() for r in rows)
    for card, artifact in cards.items():
        assert f"`{artifact.name}`" in card.read_text() and sha256_file(artifact)[:16] in card.read_text()
        # the export's calibration and int8 CPU classes, for the checkpoint's card too (its export is beside it)
        assert "- Calibration: T = " in card.read_text() and "int8 is right by construction on avx2" in card.read_text()
    summary = (run / "summary.md").read_text()  # the trainer's
    assert not [m for m in machine if m in summary]


def test_report_plots_and_hard_examples(evaluated):
    out = evaluated[0] / "pt"
    for name in ("confusion_matrix.png", "roc_pr.png", "reliability.png", "probability_histograms.png", "failures.png"):
        img = Image.open(out / name)
        assert img.format == "PNG" and img.width >= 300 and img.height >= 100, name
        assert np.asarray(img.convert("L")).std() > 5, f"{name} is blank"
    m, probs, labels, files = load(out)
    rows = list(csv.DictReader(open(out / "hard_examples.csv")))
    wrong = int((probs.argmax(axis=1) != labels).sum())
    assert sum(r["reason"] == "misclassified" for r in rows) == wrong
    report = (out / "report.md").read_text()
    assert "Confusion matrix" in report and "Failure modes" in report and "Expected calibration error" in report


def test_ece_and_reliability_bins():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    calibrated = np.array([[0.75, 0.25]] * 4 + [[0.25, 0.75]] * 4)  # 75 % confident...
    labels_75 = np.array([0, 0, 0, 1, 1, 1, 1, 0])  # ...and right 3 times in 4
    assert expected_calibration_error(calibrated, labels_75, bins=10)[0] == pytest.approx(0.0)
    overconfident = np.array([[0.99, 0.01]] * 4 + [[0.01, 0.99]] * 4)
    ece, bins = expected_calibration_error(overconfident, labels_75, bins=10)
    assert ece == pytest.approx(0.99 - 0.75)
    assert bins[-1]["count"] == 8 and bins[-1]["accuracy"] == pytest.approx(0.75)
    assert expected_calibration_error(overconfident, labels, bins=10)[0] == pytest.approx(0.01)


def test_failures_and_hard_examples_order():
    classes = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    files = ["a", "b", "c", "d", "e"]
    probs = np.array([[0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.9, 0.05, 0.05], [0.45, 0.4, 0.15], [0.2, 0.1, 0.7]])
    labels = np.array([0, 0, 0, 0, 1])
    f = failures(files, probs, labels, classes)
    assert list(f) == [("NORMAL", "PNEUMONIA"), ("PNEUMONIA", "TUBERCULOSIS")]
    assert [x["path"] for x in f[("NORMAL", "PNEUMONIA")]] == ["a", "b"]  # most confident first
    rows = hard_examples(files, probs, labels, classes, low_margin=0.2)
    # hardest first: lowest probability of the true class (a and e tie at 0.1: file order)
    assert [(r["path"], r["reason"]) for r in rows] == [("a", "misclassified"), ("e", "misclassified"),
                                                        ("b", "misclassified"), ("d", "low_margin")]


def test_bad_input(run, tmp_path):
    test = run.parent / "data" / "test"

    def fails(*args, message):
        proc = xray_eval(*args, check=False)
        assert proc.returncode == 2, proc.stderr[-1500:]
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]

    fails(tmp_path / "nope", test, message="no such model")
    fails(run, tmp_path / "missing", message="no such split folder")
    empty = tmp_path / "empty"
    shutil.copytree(test, empty)
    for f in (empty / "NORMAL").iterdir():
        f.unlink()
    fails(run, empty, message="no images")
    (empty / "COVID").mkdir()
    fails(run, empty, message="classes differ")


@pytest.fixture(scope="module")
def overconfident(run, tmp_path_factory):
    """A copy of the tiny run whose head weights are multiplied by 8: the same ranking, far too confident."""
    import torch

    from xray.train.checkpoint import load_checkpoint, read_sidecar, save_checkpoint

    out = tmp_path_factory.mktemp("overconfident") / "run"
    out.mkdir()
    model, _ = load_checkpoint(run / "best.safetensors")
    with torch.no_grad():
        for p in model.head.parameters():
            p.mul_(8)
    meta = read_sidecar(run / "best.safetensors")
    meta["image_spec"] = meta["image_spec"].to_dict()
    for key in ("weights_sha256", "format_version"):
        meta.pop(key, None)
    save_checkpoint(out / "best.safetensors", model, meta)
    return out


def test_calibration_lowers_ece_and_reaches_the_edge(overconfident, run, tmp_path):
    from conftest import QUICK, xray_export, xray_infer

    from xray.train.checkpoint import read_sidecar

    data = run.parent / "data"
    proc = xray_eval(overconfident, data / "test", "--calibrate", "--output-dir", tmp_path / "cal", "--no-embeddings")
    m = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    c = m["calibration"]
    assert c["temperature"] > 1.5, "an over-confident model needs T > 1"
    assert c["val"]["after"]["nll"] < c["val"]["before"]["nll"]
    assert c["val"]["after"]["ece"] < c["val"]["before"]["ece"]
    assert c["eval"]["after"]["ece"] < c["eval"]["before"]["ece"]
    assert "Calibration (temperature scaling)" in proc.stdout
    assert read_sidecar(overconfident)["temperature"] == pytest.approx(c["temperature"])

    # the same figures without --calibrate: the stored temperature is applied
    xray_eval(overconfident, data / "test", "--output-dir", tmp_path / "again", "--no-embeddings")
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["temperature"] == pytest.approx(c["temperature"]) and again["ece"] == pytest.approx(m["ece"])

    # xray-export bakes T into the graph: xray-infer's probabilities are the calibrated ones
    xray_export(overconfident, *QUICK, "--data-dir", data, "--eval-split", "val", "--min-agreement", 0.5,
                "--max-accuracy-drop", 50)
    report = json.loads((overconfident / "export" / "export_report.json").read_text())
    assert report["temperature"] == pytest.approx(c["temperature"]) and report["gate"]["parity_ok"]
    z = np.load(tmp_path / "cal" / "probabilities.npz")
    files = [str(f) for f in z["files"][:6]]
    doc = json.loads(xray_infer("-m", overconfident / "export" / "model.onnx", *files, "-f", "json").stdout)
    got = np.array([[p["probabilities"][k] for k in m["classes"]] for p in doc["predictions"]])
    assert np.abs(got - z["probs"][:6]).max() <= 1e-4

    # ... and the int8 model's too: it is quantized from the same calibrated graph
    export = overconfident / "export"
    int8 = next(p for p in (export / "model.int8.onnx", export / "model.int8.rejected.onnx") if p.is_file())
    doc = json.loads(xray_infer("-m", int8, *files, "-f", "json").stdout)
    got = np.array([[p["probabilities"][k] for k in m["classes"]] for p in doc["predictions"]])
    calibrated = z["probs"][:6]
    logits = np.log(np.clip(calibrated, 1e-12, None)) * c["temperature"]  # undo T: the over-confident model's
    uncalibrated = np.exp(logits - logits.max(axis=1, keepdims=True))
    uncalibrated /= uncalibrated.sum(axis=1, keepdims=True)
    assert np.abs(got - calibrated).mean() < 0.5 * np.abs(uncalibrated - calibrated).mean(), (got, calibrated)

    # xray-eval on the exported graph: its baked T is named, with NLL / ECE before and after, in the card too
    xray_eval(export / "model.onnx", data / "test", "--output-dir", tmp_path / "onnx", "--no-embeddings")
    onnx_m = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    assert onnx_m["temperature"] == pytest.approx(c["temperature"], rel=1e-6)
    assert onnx_m["temperature_source"] == "baked into the ONNX graph by xray-export"
    effect = onnx_m["calibration_effect"]
    assert effect["after"]["ece"] == pytest.approx(onnx_m["ece"]) and effect["ece_bins"] == 15
    assert effect["before"]["ece"] == pytest.approx(c["eval"]["before"]["ece"], abs=0.02)
    card = (export / "MODEL_CARD.md").read_text()
    assert "baked into the ONNX graph by xray-export" in card and "expected calibration error" in card


def test_calibrate_needs_the_checkpoint(exported, run):
    proc = xray_eval(exported[0] / "model.onnx", run.parent / "data" / "test", "--calibrate", check=False)
    assert proc.returncode == 2 and "needs the PyTorch checkpoint" in proc.stderr


def _square_images(rng, n, size=64):
    """Class 1: a bright 10 x 10 square somewhere on a noisy background; class 0: background only."""
    x = rng.normal(0, 0.3, (n, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i in np.flatnonzero(y):
        r, c = rng.integers(0, size - 10, 2)
        x[i, 0, r:r + 10, c:c + 10] += 2.0
    return x, y


def test_gradcam_follows_the_discriminative_region():
    """A small CNN trained here to find a bright square: its Grad-CAM peak moves with the square."""
    import torch
    from torch import nn

    from xray.evaluate.gradcam import gradcam
    from xray.train.models import Classifier

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    conv = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]  # noqa: E731
    backbone = nn.Sequential(*conv(1, 8), nn.MaxPool2d(2), *conv(8, 16), nn.MaxPool2d(2), *conv(16, 16),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    model = Classifier(backbone, 16, 2, blocks=[], dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        x, y = _square_images(rng, 32)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _square_images(rng, 200)
    with torch.no_grad():
        assert (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.9, "the toy model did not learn"
    peaks = []
    for r, c in ((6, 8), (46, 44), (8, 46)):
        x = rng.normal(0, 0.3, (1, 1, 64, 64)).astype(np.float32)
        x[0, 0, r:r + 10, c:c + 10] += 2.0
        cam, cls = gradcam(model, torch.from_numpy(x), target=1)
        assert cam.shape == (64, 64) and cls == 1
        assert cam.max() == pytest.approx(1.0) and cam.std() > 0.05, "the map must not be constant"
        pr, pc = np.unravel_index(np.argmax(cam), cam.shape)
        assert abs(pr - (r + 5)) <= 12 and abs(pc - (c + 5)) <= 12, ((pr, pc), (r, c))
        peaks.append((pr, pc))
    assert len(set(peaks)) == 3, "the map moves with the square"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_b0", "resnet18", "resnet50", "cnn_baseline"])
def test_gradcam_works_on_every_registry_cnn(name):
    import torch

    from xray.evaluate.gradcam import gradcam
    from xray.train.models import REGISTRY, build_model

    torch.manual_seed(0)
    model = build_model(name, 3, pretrained=False)
    x = torch.randn(1, REGISTRY[name].spec.channels, 64, 64)
    cam, cls = gradcam(model, x)
    assert cam.shape == (64, 64) and np.isfinite(cam).all() and 0 <= cam.min() <= cam.max() <= 1
    assert 0 <= cls < 3


def test_eval_writes_gradcam_and_embeddings(evaluated, run, tmp_path):
    out = evaluated[0] / "pt"
    assert (out / "embeddings.png").is_file()
    assert not (evaluated[0] / "onnx" / "embeddings.png").exists()  # features need the PyTorch model
    files = sorted((run.parent / "data" / "test" / "TUBERCULOSIS").iterdir())[:2]
    proc = xray_eval(run, "--gradcam", *files, "--output-dir", tmp_path)
    img = Image.open(tmp_path / "gradcam.png")
    assert img.format == "PNG" and img.width >= 300 and "gradcam.png" in proc.stdout


def test_model_card_and_bootstrap(evaluated, run, exported):
    from xray.evaluate.analysis import bootstrap_ci, per_source

    card = (run / "MODEL_CARD.md").read_text()  # written next to the evaluated checkpoint
    for section in ("## Intended use", "not a medical device", "## Training data", "Leakage guard",
                    "no group(s) in more than one split", "95 % bootstrap", "## Known failure modes",
                    "## Quantization", "Every image is synthetic"):
        assert section in card, section
    m, probs, labels, _ = load(evaluated[0] / "pt")
    ci = m["bootstrap_95ci"]
    assert ci["accuracy"][0] <= m["accuracy"] <= ci["accuracy"][1] and ci["accuracy"][1] - ci["accuracy"][0] > 0
    assert (exported[0] / "MODEL_CARD.md").is_file()  # and next to the evaluated ONNX model

    y = np.array([0, 1] * 50)
    narrow = bootstrap_ci(np.tile(y, 10), np.tile(y, 10), ["A", "B"])
    assert narrow["accuracy"] == [1.0, 1.0]
    noisy = bootstrap_ci(y, np.where(np.arange(100) % 5 == 0, 1 - y, y), ["A", "B"])
    assert noisy["accuracy"][0] < 0.8 < noisy["accuracy"][1]
    table = per_source(["a", "b", "c", "d"], [0, 1, 0, 1], [0, 1, 1, 1], {"a": "kaggle", "b": "kaggle", "c": "nih"})
    assert table == {"kaggle": {"images": 2, "correct": 2, "accuracy": 1.0},
                     "nih": {"images": 1, "correct": 0, "accuracy": 0.0}}


def test_manifest_and_split_give_the_folder_numbers(evaluated, exported, run, tmp_path):
    xray_eval(exported[0] / "model.onnx", run.parent / "data" / "manifest.csv", "--split", "test",
              "--output-dir", tmp_path)
    by_manifest, p1, _, f1 = load(tmp_path)
    by_folder, p2, _, f2 = load(evaluated[0] / "onnx")
    assert sorted(f1) == sorted(f2) and by_manifest["accuracy"] == by_folder["accuracy"]
    proc = xray_eval(exported[0] / "model.onnx", run.parent / "data" / "manifest.csv", "--split", "nope", check=False)
    assert proc.returncode == 2 and "no rows for split 'nope'" in proc.stderr
