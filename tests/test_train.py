"""The trainer through its real CLI: learning, what each phase may change, 2 ranks, resume, errors."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, backbone_block_of, run_command, run_script
from safetensors.torch import load_file

from xray.common.artifacts import read_csv, sha256_file
from xray.common.image_spec import ImageSpec
from xray.common.imageio import load_image
from xray.common.metrics import classification_metrics
from xray.common.preprocess import preprocess
from xray.train.checkpoint import load_checkpoint, read_sidecar
from xray.train.models import build_model

MAIN = ROOT / "train" / "main.py"
FAST = ["--image-size", "64", "--batch-size", "16", "--workers", "0"]


def train(*args, env=None, check=True, launcher=None):
    return run_command((launcher or [sys.executable]) + [MAIN, *FAST, *args], env=env, check=check)


@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic_raw):
    out = tmp_path_factory.mktemp("data")
    run_script("split_dataset", "--raw", synthetic_raw, "--out", out)
    return out


@pytest.fixture(scope="module")
def lite0_run(data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    proc = train("--data-dir", data, "--output-dir", runs, "--run-name", "lite", "--epochs-a", 3, "--epochs-b", 1,
                 "--lr-a", 3e-3, "--patience", 0)
    return runs / "lite", proc


def n_train_images(run) -> int:
    data = json.loads((run / "config.json").read_text())["data_dir"]
    return sum(1 for p in (Path(data) / "train").rglob("*") if p.is_file())


def backbone_state(state):
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


def test_run_writes_every_artifact_and_learns(lite0_run):
    run, proc = lite0_run
    for name in ("best.safetensors", "best.json", "phaseA_best.safetensors", "phaseB_best.safetensors",
                 "history.csv", "metrics.json", "summary.md", "config.json", "plots/curves.png",
                 "plots/confusion_matrix.png", "last/model.safetensors", "last/trainer_state.json"):
        assert (run / name).is_file(), name
    assert not (run / "last.tmp").exists()
    history = read_csv(run / "history.csv")
    assert [r["phase"] for r in history] == ["A", "A", "A", "B"]
    for r in history:  # throughput is the epoch's images over its seconds, not just some positive number
        assert float(r["images_per_s"]) * float(r["seconds"]) == pytest.approx(n_train_images(run), rel=0.05), r
    best_val = max(float(r["val_macro_f1"]) for r in history)
    assert best_val >= 0.55, f"val macro-F1 {best_val} is not clearly above chance (0.33)"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "weighted_f1", "loss", "per_class", "confusion_matrix", "roc_auc_ovr"):
        assert key in metrics
    assert metrics["world_size"] == 1 and np.sum(metrics["confusion_matrix"]) == metrics["num_samples"]
    assert "| Macro F1 |" in proc.stdout and "Confusion matrix" in proc.stdout
    with open(run / "plots/curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_phase_a_freezes_the_backbone_bit_for_bit(lite0_run):
    run, _ = lite0_run
    imagenet = backbone_state(build_model("efficientnet_lite0", 3, pretrained=True).state_dict())
    phase_a = backbone_state(load_file(str(run / "phaseA_best.safetensors")))
    assert imagenet.keys() == phase_a.keys()
    changed = [k for k in imagenet if not torch.equal(imagenet[k], phase_a[k])]
    assert changed == [], f"phase A changed backbone tensors (BatchNorm stats included): {changed[:3]}"
    head_a = load_file(str(run / "phaseA_best.safetensors"))["head.1.weight"]
    assert head_a.shape == (3, 1280) and head_a.abs().sum() > 0


def test_phase_b_changes_only_unfrozen_blocks_and_head(lite0_run):
    run, _ = lite0_run
    a = load_file(str(run / "phaseA_best.safetensors"))
    b = load_file(str(run / "last" / "model.safetensors"))  # phase B's final weights
    model = build_model("efficientnet_lite0", 3, pretrained=False)
    block_of = backbone_block_of(model)
    unfrozen = set(range(len(model.blocks) - 3, len(model.blocks)))  # Lite0 default: last 3 blocks
    assert set(block_of) == {k for k in a if k.startswith("backbone.")}
    for key, i in block_of.items():
        same = torch.equal(a[key], b[key])
        if i not in unfrozen:
            assert same, f"frozen {key} (block {i}) changed in phase B"
    changed_blocks = {i for k, i in block_of.items() if not torch.equal(a[k], b[k])}
    assert changed_blocks == unfrozen
    # BatchNorm keeps its ImageNet statistics in phase B (no --bn-train): running mean/var of the unfrozen
    # blocks too are bit for bit phase A's, which are ImageNet's (test_phase_a_freezes_the_backbone_bit_for_bit)
    stats = [k for k, i in block_of.items() if i in unfrozen and k.endswith(("running_mean", "running_var"))]
    assert len(stats) >= 20
    moved = [k for k in stats if not torch.equal(a[k], b[k])]
    assert moved == [], f"phase B re-estimated BatchNorm statistics: {moved[:3]}"
    assert not torch.equal(a["head.1.weight"], b["head.1.weight"])


def test_phase_b_starts_from_phase_a_best(data, tmp_path):
    """With a zero phase-B learning rate, phase B's head must still be exactly phase A's best head."""
    train("--data-dir", data, "--output-dir", tmp_path, "--run-name", "r", "--epochs-a", 2, "--epochs-b", 1,
          "--lr-b", 0, "--no-augment")
    a = load_file(str(tmp_path / "r" / "phaseA_best.safetensors"))
    b = load_file(str(tmp_path / "r" / "last" / "model.safetensors"))
    assert torch.equal(a["head.1.weight"], b["head.1.weight"]) and torch.equal(a["head.1.bias"], b["head.1.bias"])


def test_cnn_baseline_from_scratch_learns(tmp_path):
    raw = tmp_path / "raw"
    run_script("make_synthetic", "--out", raw, "--per-class", 60, "--size", 80, "--seed", 3)
    run_script("split_dataset", "--raw", raw, "--out", tmp_path / "data")
    train("--data-dir", tmp_path / "data", "--output-dir", tmp_path, "--run-name", "cnn", "--model", "cnn_baseline",
          "--phases", "B", "--unfreeze-blocks", "all", "--epochs-b", 8, "--lr-b", 3e-3, "--patience", 0)
    best = max(float(r["val_macro_f1"]) for r in read_csv(tmp_path / "cnn" / "history.csv"))
    assert best >= 0.6, f"cnn_baseline val macro-F1 {best}"
    assert read_sidecar(tmp_path / "cnn" / "best.safetensors")["image_spec"].channels == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_eval(run_dir, test_dir):
    model, meta = load_checkpoint(run_dir / "best.safetensors")
    model.eval()
    classes, spec = meta["classes"], meta["image_spec"]
    xs, ys = [], []
    for i, c in enumerate(classes):
        for p in sorted((test_dir / c).iterdir()):
            xs.append(preprocess(load_image(p), spec))
            ys.append(i)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(np.stack(xs))), 1).numpy()
    return classification_metrics(np.array(ys), probs.argmax(1), classes)


# Rank 1 lags 3 s behind after the run name is agreed: a rank that checked "is this run folder free?" for itself
# would then find the config.json rank 0 has just written and quit (seen in CI on a loaded machine).
LAGGING_RANK_1 = """
import os, time
if os.environ.get("RANK") == "1":
    import accelerate.utils as utils
    agree = utils.broadcast_object_list
    def lagging(*args, **kwargs):
        out = agree(*args, **kwargs)
        time.sleep(3)
        return out
    utils.broadcast_object_list = lagging
"""


def test_two_ranks_form_a_group_and_count_each_test_image_once(data, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(LAGGING_RANK_1)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))}
    proc = train("--data-dir", data, "--output-dir", tmp_path, "--run-name", "ddp", "--epochs-a", 1, "--epochs-b", 1,
                 "--report-to", "mlflow", launcher=launcher, env=env)
    assert "2 process(es)" in proc.stdout
    from mlflow import MlflowClient  # only the main process tracks: one run, each epoch logged once

    client = MlflowClient(tracking_uri=json.loads((tmp_path / "ddp" / "mlflow.json").read_text())["tracking_uri"])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(client.get_metric_history(run.info.run_id, "A/val_macro_f1")) == 1
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    reference = single_process_eval(tmp_path / "ddp", data / "test")
    assert metrics["num_samples"] == reference["num_samples"] == sum(1 for _ in (data / "test").rglob("*.*"))
    assert metrics["confusion_matrix"] == reference["confusion_matrix"]
    assert metrics["accuracy"] == pytest.approx(reference["accuracy"])


RESUMABLE = ["--epochs-a", 2, "--epochs-b", 2, "--patience", 0, "--checkpoint-every", 2]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("whole")
    train("--data-dir", data, "--output-dir", runs, "--run-name", "whole", *RESUMABLE)
    return runs / "whole"


@pytest.mark.parametrize("crash_step", [6, 13])  # 4 steps per epoch: mid phase A epoch 2; mid phase B epoch 2
def test_resume_after_a_crash_ends_like_an_uninterrupted_run(data, tmp_path, uninterrupted, crash_step):
    crashed = train("--data-dir", data, "--output-dir", tmp_path, "--run-name", "cut", *RESUMABLE,
                    env={"XRAY_TEST_FAIL_AFTER_STEPS": str(crash_step)}, check=False)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    assert not (tmp_path / "cut" / "metrics.json").exists()
    train("--resume", tmp_path / "cut")
    whole = json.loads((uninterrupted / "metrics.json").read_text())
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "confusion_matrix", "loss"):
        assert cut[key] == whole[key], key
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]
    assert strip(read_csv(tmp_path / "cut" / "history.csv")) == strip(read_csv(uninterrupted / "history.csv"))


def test_checkpoint_round_trip(lite0_run):
    run, _ = lite0_run
    meta = read_sidecar(run / "best.safetensors")
    assert meta["weights_sha256"] == sha256_file(run / "best.safetensors")
    assert meta["classes"] == ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    assert meta["image_spec"] == ImageSpec.from_dict(json.loads((run / "best.json").read_text())["image_spec"])
    assert meta["image_spec"].input_size == 64 and meta["config"]["model"] == "efficientnet_lite0"
    model, _ = load_checkpoint(run)
    saved = load_file(str(run / "best.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_bad_input_is_one_clear_line(data, tmp_path, lite0_run):
    def fails(*args, message):
        proc = train(*args, check=False)
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]

    out = ["--output-dir", tmp_path]
    fails("--data-dir", tmp_path / "nope", *out, message="no such split folder")
    broken = tmp_path / "broken"
    for split in ("train", "val", "test"):
        for c in ("NORMAL", "PNEUMONIA", "TUBERCULOSIS"):
            if split == "val" and c == "PNEUMONIA":
                continue
            (broken / split / c).mkdir(parents=True)
            src = next((data / "train" / c).iterdir())
            (broken / split / c / src.name).write_bytes(src.read_bytes())
    fails("--data-dir", broken, *out, message="missing ['PNEUMONIA']")
    fails("--data-dir", data, *out, "--model", "vgg", message="vgg")
    fails("--data-dir", data, *out, "--model", "cnn_baseline", message="--phases B")
    fails("--data-dir", data, *out, "--weights", tmp_path / "none.pth", message="no such file")
    fails("--data-dir", data, *out, "--phases", "C", message="--phases")
    fails("--data-dir", data, *out, "--unfreeze-blocks", "many", message="--unfreeze-blocks")
    fails("--data-dir", data, *out, "--resume", tmp_path / "nothing", message="not a run folder")
    run, _ = lite0_run
    fails("--data-dir", data, "--output-dir", run.parent, "--run-name", run.name, message="already holds a run")
    fails("--data-dir", data, *out, "--model", "resnet18", "--phases", "B", "--init", run / "best.safetensors",
          "--run-name", "x", message="checkpoint is efficientnet_lite0")


def test_cached_features_train_the_same_head(data, tmp_path):
    """Phase A on stored backbone features gives the same epochs as phase A through the backbone."""
    args = ["--data-dir", data, "--output-dir", tmp_path, "--phases", "A", "--epochs-a", 2, "--no-augment",
            "--patience", 0]
    train(*args, "--run-name", "plain")
    proc = train(*args, "--run-name", "cached", "--cache-features")
    assert "cached (" in proc.stdout
    keys = ("train_loss", "train_accuracy", "val_loss", "val_macro_f1")
    plain, cached = read_csv(tmp_path / "plain" / "history.csv"), read_csv(tmp_path / "cached" / "history.csv")
    for a, b in zip(plain, cached):
        for k in keys:
            assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-5), k
    bad = train("--data-dir", data, "--output-dir", tmp_path, "--run-name", "x", "--cache-features", check=False)
    assert bad.returncode == 2 and "--cache-features needs --no-augment" in bad.stderr


def test_tensorboard_tracker_logs_each_epoch(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train("--data-dir", data, "--output-dir", tmp_path, "--run-name", "tb", "--phases", "A", "--epochs-a", 2,
          "--report-to", "tensorboard")
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "A/val_macro_f1" in scalars and "A/train_loss" in scalars
    history = read_csv(tmp_path / "tb" / "history.csv")
    logged = [e.value for e in events.Scalars("A/val_macro_f1")]
    assert logged == pytest.approx([float(r["val_macro_f1"]) for r in history], abs=1e-6)


def test_early_stopping_and_gradient_accumulation(data, tmp_path):
    """lr 0 never improves val after epoch 1, so patience 1 stops phase A after epoch 2 of 5; with
    --grad-accum 2 an epoch of 4 batches is 2 optimizer steps."""
    proc = train("--data-dir", data, "--output-dir", tmp_path, "--run-name", "es", "--phases", "A", "--epochs-a", 5,
                 "--lr-a", 0, "--patience", 1, "--grad-accum", 2)
    assert "early stop" in proc.stdout
    assert [r["epoch"] for r in read_csv(tmp_path / "es" / "history.csv")] == ["1", "2"]
    state = json.loads((tmp_path / "es" / "last" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 * 2


def test_oversample_hard_examples(data, tmp_path):
    """--oversample repeats listed train images; files from val/test are refused as leakage, not used."""
    from xray.train.data import oversample, scan_split

    _, train_samples = scan_split(data / "train")
    _, test_samples = scan_split(data / "test", sorted(p.name for p in (data / "train").iterdir() if p.is_dir()))
    hard = tmp_path / "hard_examples.csv"
    rows = [train_samples[0][0], train_samples[5][0], test_samples[0][0]]
    hard.write_text("path,true,predicted\n" + "".join(f"{p},X,Y\n" for p in rows))
    out, found, ignored = oversample(train_samples, hard, 3)
    assert (found, ignored) == (2, 1) and len(out) == len(train_samples) + 4
    assert out.count(train_samples[0]) == 3 and test_samples[0] not in out

    proc = train("--data-dir", data, "--output-dir", tmp_path, "--run-name", "hard", "--phases", "A", "--epochs-a", 1,
                 "--oversample", hard, "--oversample-factor", 3)
    assert "oversample: 2 hard train images x3; 1 listed files are not in the train split" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "hard" / "config.json").read_text())["oversample_factor"] == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.png\n")
    proc = train("--data-dir", data, "--output-dir", tmp_path, "--run-name", "bad", "--oversample", bad, check=False)
    assert proc.returncode == 2 and "no 'path' column" in proc.stderr and "Traceback" not in proc.stderr
