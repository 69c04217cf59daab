"""What the PyTorch model looked at and how it arranges images: Grad-CAM sheets and the embedding projection."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xray.common.imageio import load_image
from xray.common.preprocess import resize_and_crop
from xray.infer.predict import prepare

from . import plots
from .gradcam import gradcam


def gradcam_entries(loaded, items):
    """items: [(path, caption prefix)] -> sheet entries (model-view image, map, caption with the prediction)."""
    import torch

    entries = []
    for path, prefix in items:
        x = torch.from_numpy(prepare(path, loaded.spec))[None]
        cam, cls = gradcam(loaded.torch_model, x)
        view = np.asarray(resize_and_crop(load_image(path, draft_size=loaded.spec.resize_size), loaded.spec))
        entries.append((view, cam, f"{prefix}Grad-CAM: {loaded.classes[cls]}\n{Path(path).name[:24]}"))
    return entries


def gradcam_files(loaded, files, out: Path) -> Path:
    path = out / "gradcam.png"
    plots.gradcam_sheet(gradcam_entries(loaded, [(f, "") for f in files]), path)
    return path


def failures_gradcam(loaded, fails: dict, out: Path) -> Path | None:
    items = [(f["path"], f"{t} → {q} p={f['probability']:.2f}\n") for (t, q), fs in fails.items() for f in fs]
    if not items:
        return None
    path = out / "failures_gradcam.png"
    plots.gradcam_sheet(gradcam_entries(loaded, items), path)
    return path


def embeddings(loaded, files, labels, probs, out: Path, batch_size: int = 32) -> Path:
    """t-SNE of the backbone's pooled features (the head's input)."""
    import torch
    from sklearn.manifold import TSNE

    feats = []
    with torch.no_grad():
        for i in range(0, len(files), batch_size):
            x = torch.from_numpy(np.stack([prepare(f, loaded.spec) for f in files[i:i + batch_size]]))
            feats.append(loaded.torch_model.backbone(x).flatten(1).numpy())
    feats = np.concatenate(feats)
    perplexity = float(min(30.0, max(2.0, (len(files) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(feats)
    path = out / "embeddings.png"
    plots.embedding_projection(points, labels, probs.argmax(axis=1) != labels, loaded.classes, path, "t-SNE")
    return path
