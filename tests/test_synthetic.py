"""The synthetic generator: deterministic, Kermany-named, every format, learnable but not trivial."""
from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import run_script

import make_synthetic
from xray.common.artifacts import read_csv, sha256_file
from xray.common.imageio import load_image


def test_layout_names_and_formats(synthetic_raw):
    files = sorted(p for p in synthetic_raw.rglob("*") if p.is_file() and p.name != "sources.csv")
    assert {p.parent.name for p in files} == {"NORMAL", "PNEUMONIA", "TUBERCULOSIS"}
    assert len(files) == 90
    names = [p.name for p in files]
    assert all(re.fullmatch(r"person\d{4}_(normal|bacteria|virus|tb)_\d{4}\.(jpeg|png)", n) for n in names)
    patients = {n.split("_")[0] for n in names}
    assert len(patients) < len(names), "several images per patient exercise the leakage guard"
    modes = set()
    from PIL import Image
    for p in files:
        with Image.open(p) as im:
            modes.add((im.format, im.mode))
    assert {("JPEG", "L"), ("PNG", "L"), ("PNG", "I;16")} <= modes
    for p in files[:10]:
        assert load_image(p).mode == "L"
    rows = read_csv(synthetic_raw / "sources.csv")
    assert len(rows) == 90 and {r["source"] for r in rows} == {"synthetic"}
    assert rows[0]["sha256"] == sha256_file(synthetic_raw / rows[0]["path"])


def test_same_seed_same_bytes_other_seed_differs(tmp_path, synthetic_raw):
    run_script("make_synthetic", "--out", tmp_path / "a", "--per-class", 30, "--size", 96, "--seed", 1)
    run_script("make_synthetic", "--out", tmp_path / "b", "--per-class", 3, "--size", 96, "--seed", 2)
    a = {p.relative_to(tmp_path / "a"): sha256_file(p) for p in (tmp_path / "a").rglob("*.*")}
    ref = {p.relative_to(synthetic_raw): sha256_file(p) for p in synthetic_raw.rglob("*.*")}
    assert a == ref
    first = sorted((tmp_path / "b" / "NORMAL").iterdir())[0]
    assert sha256_file(first) != sha256_file(synthetic_raw / "NORMAL" / first.name)


def test_any_class_list_and_imbalance(tmp_path):
    run_script("make_synthetic", "--out", tmp_path, "--classes", "normal,covid-19",
               "--per-class", "NORMAL=4,COVID_19=7", "--size", 64)
    assert len(list((tmp_path / "NORMAL").iterdir())) == 4
    assert len(list((tmp_path / "COVID_19").iterdir())) == 7
    findings = make_synthetic.finding_for(["COVID_19", "NORMAL"])
    assert findings["NORMAL"] == "clear" and findings["COVID_19"] != "clear"


@pytest.mark.parametrize("args, message", [
    (["--classes", "NORMAL"], "at least two classes"),
    (["--per-class", "abc"], "--per-class"),
    (["--formats", "gif"], "--formats"),
    (["--classes", "A,B,C,D,E,F,G"], "distinct findings"),
])
def test_bad_options_fail_with_one_line(tmp_path, args, message):
    proc = run_script("make_synthetic", "--out", tmp_path, *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_findings_are_where_the_class_says():
    """Averaged over renders of one patient, each finding brightens its own lung zone most."""
    anat = make_synthetic.Anatomy.sample(np.random.default_rng(0), 128)

    def mean_render(finding):
        return np.mean([make_synthetic.render(finding, anat, np.random.default_rng(s)) for s in range(12)], axis=0)

    normal = mean_render("clear")
    h = normal.shape[0]
    for finding, zone in (("lower_patchy", "lower"), ("upper_nodules", "upper")):
        diff = mean_render(finding) - normal
        upper, lower = diff[int(0.2 * h):int(0.45 * h)].mean(), diff[int(0.5 * h):int(0.8 * h)].mean()
        assert (lower > upper) if zone == "lower" else (upper > lower), (finding, upper, lower)


@pytest.mark.slow
def test_learnable_but_not_trivial(tmp_path):
    """Frozen ImageNet Lite0 features + logistic regression (a phase-A-like linear probe) reach
    >= 0.9 macro-F1 on a held-out, patient-grouped split; constant and global-intensity predictors do not."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from xray.common.image_spec import ImageSpec
    from xray.common.metrics import classification_metrics
    from xray.common.preprocess import preprocess
    from xray.train.pretrained import efficientnet_lite0_imagenet

    raw = tmp_path / "raw"
    run_script("make_synthetic", "--out", raw, "--per-class", 100, "--size", 128, "--seed", 0)
    run_script("split_dataset", "--raw", raw, "--out", tmp_path, "--val", 0.1, "--test", 0.3, "--seed", 0)
    classes = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    spec = ImageSpec(input_size=128, resize_size=128)
    model = efficientnet_lite0_imagenet().eval()
    model.reset_classifier(0)

    def load(split):
        items = [(p, i) for i, c in enumerate(classes) for p in sorted((tmp_path / split / c).iterdir())]
        images = [load_image(p) for p, _ in items]
        x = torch.from_numpy(np.stack([preprocess(im, spec) for im in images]))
        with torch.no_grad():
            feats = model(x).numpy()
        stats = np.array([[np.asarray(im).mean(), np.asarray(im).std()] for im in images])
        return feats, stats, np.array([i for _, i in items])

    f_tr, s_tr, y_tr = load("train")
    f_te, s_te, y_te = load("test")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(f_tr, y_tr)
    f1 = classification_metrics(y_te, probe.predict(f_te), classes)["macro_f1"]
    assert f1 >= 0.9, f"linear probe macro-F1 {f1:.3f}"
    majority = np.bincount(y_tr).argmax()
    constant = np.full_like(y_te, majority)
    f1_constant = classification_metrics(y_te, constant, classes)["macro_f1"]
    share = np.mean(y_te == majority)  # the constant class's precision (recall 1); the other classes score 0
    assert f1_constant == pytest.approx(2 * share / (1 + share) / len(classes), abs=1e-12)
    assert abs(share - 1 / len(classes)) < 0.05, f"unbalanced test split: {np.bincount(y_te)}"
    glob_stats = LogisticRegression(max_iter=5000).fit(s_tr, y_tr)
    f1_stats = classification_metrics(y_te, glob_stats.predict(s_te), classes)["macro_f1"]
    assert f1_stats < 0.6, f"global brightness/contrast alone separate the classes ({f1_stats:.3f})"
