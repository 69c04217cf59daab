"""Grad-CAM (Selvaraju et al. 2017) for the registry CNNs, from the PyTorch checkpoint.

The feature map explained is the last 4-D activation with spatial extent the backbone produces
(found by hooking every leaf module for one forward pass), so one function serves timm EfficientNets,
torchvision ResNets and the from-scratch CNN alike.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def last_feature_module(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    seen = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: seen.append(mod)
                                     if torch.is_tensor(out) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1
                                     else None)
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError("the model has no spatial feature map to explain")
    return seen[-1]


def gradcam(model: torch.nn.Module, x: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, int]:
    """x: 1 x C x H x W. Returns (H x W map in [0, 1], the explained class: `target` or the prediction)."""
    model.eval()
    module = last_feature_module(model, x)
    store = {}
    hook = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
    try:
        with torch.enable_grad():
            logits = model(x)
            cls = int(logits.argmax(1)) if target is None else int(target)
            (grad,) = torch.autograd.grad(logits[0, cls], store["act"])
    finally:
        hook.remove()
    act = store["act"].detach()
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0].numpy()
    top = cam.max()
    return (cam / top if top > 0 else cam).astype(np.float32), cls
