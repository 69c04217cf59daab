"""Datasets over ImageFolder-style splits (data/<split>/<CLASS>/*), decoded by `common`.

The eval path is exactly `preprocess(load_image(path), spec)`, the function export and xray-infer use.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from xray.common.classes import check_classes
from xray.common.errors import XrayError
from xray.common.image_spec import ImageSpec
from xray.common.imageio import is_supported, load_image
from xray.common.preprocess import preprocess

from .augment import AugmentConfig, augment


def scan_split(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) for root/<CLASS>/*. With `classes` given, the split must have exactly them."""
    if not root.is_dir():
        raise XrayError(f"{root}: no such split folder (run scripts/split_dataset.py)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = check_classes(found)
    missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
    if missing or extra:
        raise XrayError(f"{root}: classes differ from the training classes {classes}"
                        + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    samples = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.is_file() and is_supported(p))
        if not files:
            raise XrayError(f"{root / cls}: no images (every class needs images in every split)")
        samples += [(str(p), label) for p in files]
    return classes, samples


class XrayDataset(Dataset):
    """Samples -> (float tensor C x S x S, label). With `augment_cfg`, train-time augmentation whose
    randomness is a function of (seed, epoch, index) only."""

    def __init__(self, samples, spec: ImageSpec, augment_cfg: AugmentConfig | None = None, seed: int = 0):
        self.samples = samples
        self.spec = spec
        self.augment_cfg = augment_cfg
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = load_image(path, draft_size=self.spec.resize_size)
        if self.augment_cfg is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            img = augment(img, self.spec, self.augment_cfg, rng)
        return torch.from_numpy(preprocess(img, self.spec)), label


def class_weights(samples, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, normalised so a balanced set gets weight 1 per class."""
    counts = np.bincount([label for _, label in samples], minlength=num_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


def oversample(samples, hard_csv: str | Path, factor: int) -> tuple[list[tuple[str, int]], int, int]:
    """Repeat the train images listed in `hard_csv` (xray-eval's hard_examples.csv, column `path`) so each
    appears `factor` times per epoch. Listed files outside this train split are ignored and counted:
    hard examples mined on val/test would leak them into training.
    Returns (samples, listed images found in train, listed images ignored)."""
    from xray.common.artifacts import read_csv

    path = Path(hard_csv)
    if not path.is_file():
        raise XrayError(f"--oversample {path}: no such file")
    try:
        listed = {str(Path(r["path"]).resolve()) for r in read_csv(path)}
    except KeyError:
        raise XrayError(f"--oversample {path}: no 'path' column (use xray-eval's hard_examples.csv)") from None
    hard = [s for s in samples if str(Path(s[0]).resolve()) in listed]
    return samples + hard * (factor - 1), len(hard), len(listed) - len(hard)
