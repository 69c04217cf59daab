"""Trainer options do what they claim: --label-smoothing, --clip-grad, --hflip, --bn-train (and, without it,
phase B's saved BatchNorm statistics are ImageNet's)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, backbone_block_of, run_command
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xray.train import main as train_main
from xray.train.augment import AugmentConfig, augment
from xray.train.loop import train_one_epoch
from xray.train.models import Classifier, build_model, get_model_def


def cfg_from_cli(*args) -> dict:
    """The config train/main.py builds from these command-line options (parsed by its own click command)."""
    ctx = train_main.main.make_context("main.py", [str(a) for a in args])
    return train_main.config_from_options(ctx.params)


def test_label_smoothing_reaches_the_loss():
    """A confident correct prediction costs ~0 with plain cross-entropy; with --label-smoothing 0.3 it costs
    what smoothed targets say: -(0.8 log p_true + 0.1 sum log p_other)."""
    logits = torch.tensor([[12.0, 0.0, 0.0], [0.0, 12.0, 0.0]])
    y = torch.tensor([0, 1])
    plain = train_main.make_criterion(cfg_from_cli(), None)(logits, y).item()
    smoothed = train_main.make_criterion(cfg_from_cli("--label-smoothing", 0.3), None)(logits, y).item()
    logp = torch.log_softmax(logits, 1)
    by_hand = -(0.8 * logp[0, 0] + 0.1 * (logp[0, 1] + logp[0, 2])).item()
    assert plain < 1e-4
    assert smoothed == pytest.approx(by_hand, rel=1e-5) and smoothed > 1.0


class RecordingSGD(torch.optim.SGD):
    """SGD that records the gradient norm it is handed at each step (after any clipping)."""

    def __init__(self, params, **kw):
        self.norms = []
        super().__init__(params, **kw)

    def step(self, closure=None):
        grads = [p.grad.norm() for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))
        return super().step(closure)


def grad_norms(clip: float) -> list[float]:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 8)), 8, 3, blocks=[], dropout=0.0)
    x, y = torch.randn(32, 1, 4, 4) * 10, torch.randint(0, 3, (32,))
    optimizer = RecordingSGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, opt, loader, scheduler = acc.prepare(model, optimizer, DataLoader(TensorDataset(x, y), batch_size=8),
                                                scheduler)
    state = {"step_in_epoch": 0, "global_step": 0}
    train_one_epoch(acc, model, loader, opt, scheduler, nn.CrossEntropyLoss(), mode="full", seed=0,
                    clip_grad=clip, state=state, sums=torch.zeros(3, dtype=torch.float64))
    return optimizer.norms


def test_clip_grad_bounds_every_step():
    clip = cfg_from_cli("--clip-grad", 0.05)["clip_grad"]
    assert clip == 0.05
    unclipped, clipped = grad_norms(cfg_from_cli("--clip-grad", 0)["clip_grad"]), grad_norms(clip)
    assert len(clipped) == len(unclipped) == 4
    assert min(unclipped) > 0.5, "the test's gradients must be well above the clip"
    assert max(clipped) <= 0.05 * (1 + 1e-4), clipped


def test_hflip_mirrors_some_images_and_only_with_the_option():
    """With --hflip half the augmented images are the mirror of what the same draw gives without it; without
    it none is. The train loader is built with the option."""
    arr = np.zeros((80, 80), np.uint8)
    arr[10:70, 5:25] = 255  # a bright bar on the left only: a mirror is unmistakable
    img = Image.fromarray(arr, "L")
    spec = get_model_def("efficientnet_lite0").spec.with_size(64)
    flipped = same = 0
    for seed in range(20):
        plain = np.asarray(augment(img, spec, AugmentConfig(), np.random.default_rng(seed)))
        out = np.asarray(augment(img, spec, AugmentConfig(hflip=True), np.random.default_rng(seed)))
        flipped += np.array_equal(out, plain[:, ::-1])
        same += np.array_equal(out, plain)
        assert plain[:, :32].mean() > plain[:, 32:].mean(), "without --hflip the bar stays on the left"
    assert flipped + same == 20 and 4 <= flipped <= 16, (flipped, same)

    fake_run = SimpleNamespace(cfg=cfg_from_cli("--hflip", "--workers", 0), spec=spec)
    ds, _ = train_main.Run.loader(fake_run, [("x.png", 0)], train=True)
    assert ds.augment_cfg.hflip
    ds, _ = train_main.Run.loader(fake_run, [("x.png", 0)], train=False)
    assert ds.augment_cfg is None  # never on val/test


def bn_stats(state: dict, block_keys: dict, blocks: set) -> dict:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var")) and block_keys.get(k) in blocks}


def test_bn_train_re_estimates_statistics_in_unfrozen_blocks_only(run, tmp_path):
    """--bn-train: phase B moves the running mean/var of the unfrozen blocks' BatchNorms (and of no other)."""
    args = ["--data-dir", run.parent / "data", "--output-dir", tmp_path, "--run-name", "bn", "--image-size", 64,
            "--batch-size", 16, "--workers", 0, "--phases", "B", "--init", run / "best.safetensors",
            "--epochs-b", 1, "--bn-train"]
    run_command([sys.executable, ROOT / "train" / "main.py", *args])
    start, end = load_file(str(run / "best.safetensors")), load_file(str(tmp_path / "bn" / "last" / "model.safetensors"))
    model = build_model("efficientnet_lite0", 3, pretrained=False)
    block_of = backbone_block_of(model)
    unfrozen = set(range(len(model.blocks) - 3, len(model.blocks)))
    moved = bn_stats(end, block_of, unfrozen)
    assert moved and all(not torch.equal(start[k], v) for k, v in moved.items()), "unfrozen BN stats kept"
    frozen = bn_stats(end, block_of, set(range(len(model.blocks))) - unfrozen)
    assert frozen and all(torch.equal(start[k], v) for k, v in frozen.items()), "frozen blocks' BN stats moved"
