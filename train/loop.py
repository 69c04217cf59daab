"""One epoch of training and one pass of evaluation, readable top to bottom.

Distributed details stay in accelerate: `accumulate` for gradient accumulation, `gather_for_metrics`
so every val/test image is counted exactly once whatever the world size.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from xray.common.metrics import classification_metrics, log_loss

# Test hook: raise after this many optimizer steps, to exercise --resume (tests set it; users never do).
_FAIL_AFTER_STEPS = int(os.environ.get("XRAY_TEST_FAIL_AFTER_STEPS", "0") or 0)


class SimulatedCrash(RuntimeError):
    pass


def train_one_epoch(accelerator, model, loader, optimizer, scheduler, criterion, *, mode, seed,
                    clip_grad, state, sums, on_step=None, progress=None):
    """Train for one epoch (or what is left of it after a resume); returns the epoch's (mean loss,
    accuracy, images) over all ranks. `sums` (loss sum, correct, seen on this rank) is updated in place
    so a mid-epoch checkpoint can carry it over. `mode` goes to Classifier.forward."""
    for x, y in loader:
        # dropout masks depend on (seed, step, rank) only, so a resumed run repeats them exactly
        torch.manual_seed(seed * 1_000_003 + state["global_step"] * 101 + accelerator.process_index)
        with accelerator.accumulate(model):
            logits = model(x, mode=mode)
            loss = criterion(logits, y)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip_grad:
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        n = y.shape[0]
        sums += torch.stack([loss.detach().double().cpu() * n, (logits.detach().argmax(1) == y).sum().double().cpu(),
                             torch.tensor(float(n), dtype=torch.float64)])
        state["step_in_epoch"] += 1
        if accelerator.sync_gradients:
            state["global_step"] += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if on_step is not None:
            on_step()
        if _FAIL_AFTER_STEPS and state["global_step"] >= _FAIL_AFTER_STEPS:
            raise SimulatedCrash(f"simulated crash after {state['global_step']} steps (XRAY_TEST_FAIL_AFTER_STEPS)")
    totals = accelerator.reduce(sums.clone().to(accelerator.device), "sum").cpu()
    seen_all = max(float(totals[2]), 1.0)
    return float(totals[0]) / seen_all, float(totals[1]) / seen_all, int(totals[2])


@torch.no_grad()
def extract_features(accelerator, backbone, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of a whole (unshuffled, sharded) split, gathered in order on every rank."""
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        f, y = accelerator.gather_for_metrics((backbone(x), y))
        feats.append(f.cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(accelerator, model, loader, class_names, progress=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics over the whole split (each image once), plus all probabilities and labels (main process)."""
    model.eval()
    all_logits, all_labels = [], []
    for x, y in loader:
        logits = model(x)
        logits, y = accelerator.gather_for_metrics((logits, y))
        all_logits.append(logits.float().cpu())
        all_labels.append(y.cpu())
        if progress is not None:
            progress.update(1)
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels).numpy()
    probs = F.softmax(logits, dim=1).numpy()
    metrics = classification_metrics(labels, probs.argmax(1), class_names)
    metrics["loss"] = log_loss(labels, probs)
    return metrics, probs, labels


class Throughput:
    """images/s over a timed block."""

    def __init__(self):
        self.start = time.perf_counter()

    def rate(self, images: int) -> tuple[float, float]:
        seconds = time.perf_counter() - self.start
        return seconds, images / seconds if seconds > 0 else 0.0
