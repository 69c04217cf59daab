"""The model registry: every model is `Classifier(backbone, head)` plus its ordered backbone blocks.

A uniform shape keeps the rest simple: phase A runs `backbone` without autograd and trains `head`;
phase B unfreezes the last N `blocks`; export sees one nn.Module; state-dict keys are always
`backbone.*` / `head.*`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from xray.common.errors import XrayError
from xray.common.image_spec import IMAGENET_MEAN, IMAGENET_STD, ImageSpec


class Classifier(nn.Module):
    """backbone: image -> pooled feature vector; head: features -> logits."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, blocks: list, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
        self.num_features = num_features
        self._blocks = blocks  # plain list of module lists: not registered twice

    @property
    def blocks(self) -> list[list[nn.Module]]:
        return self._blocks

    def forward(self, x, mode: str = "full"):
        """mode "frozen" (phase A): no autograd graph through the backbone, so its backward pass is
        never paid for; "features": x already holds backbone features (phase A, --cache-features)."""
        if mode == "features":
            return self.head(x)
        if mode == "frozen":
            with torch.no_grad():
                features = self.backbone(x)
            return self.head(features)
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class ModelDef:
    name: str
    build: Callable[[bool], tuple[nn.Module, int, list]]  # pretrained -> (backbone, num_features, blocks)
    spec: ImageSpec
    unfreeze_blocks: int  # phase-B default
    pretrained_available: bool = True


def _torchvision_weights(enum_name: str, pretrained: bool):
    if not pretrained:
        return None
    import torchvision.models as tvm

    return getattr(tvm, enum_name).IMAGENET1K_V1


def _load_torchvision(fn_name: str, enum_name: str, pretrained: bool):
    import torchvision.models as tvm

    weights = _torchvision_weights(enum_name, pretrained)
    try:
        return getattr(tvm, fn_name)(weights=weights)
    except Exception as e:  # URLError, socket errors, HTTP errors: all mean "could not fetch"
        raise XrayError(f"cannot get ImageNet weights for {fn_name} ({type(e).__name__}: offline and not in the torch "
                        "hub cache); pass --weights PATH (a local state dict), use --no-pretrained, or use "
                        "efficientnet_lite0, whose weights ship offline") from None


def _efficientnet_b0(pretrained):
    m = _load_torchvision("efficientnet_b0", "EfficientNet_B0_Weights", pretrained)
    backbone = nn.Sequential(m.features, m.avgpool, nn.Flatten(1))
    return backbone, 1280, [[b] for b in m.features]


def _efficientnet_lite0(pretrained):
    from .pretrained import efficientnet_lite0_imagenet

    if pretrained:
        m = efficientnet_lite0_imagenet()
    else:
        import timm

        m = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    m.reset_classifier(0)
    blocks = [[m.conv_stem, m.bn1]] + [[b] for b in m.blocks] + [[m.conv_head, m.bn2]]
    return m, m.num_features, blocks


def _resnet(depth):
    def build(pretrained):
        m = _load_torchvision(f"resnet{depth}", f"ResNet{depth}_Weights", pretrained)
        n = m.fc.in_features
        m.fc = nn.Identity()
        blocks = [[m.conv1, m.bn1], [m.layer1], [m.layer2], [m.layer3], [m.layer4]]
        return m, n, blocks

    return build


def _conv_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


def _cnn_baseline(pretrained):
    """Seed 004's from-scratch CNN, kept modest (about 1.2 M parameters) and on one gray channel."""
    stages = [_conv_block(1, 32), _conv_block(32, 64), _conv_block(64, 128), _conv_block(128, 192)]
    backbone = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return backbone, 192, [[s] for s in stages]


_IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
REGISTRY: dict[str, ModelDef] = {
    d.name: d
    for d in (
        ModelDef("efficientnet_b0", _efficientnet_b0, ImageSpec(224, 224, "squash", "bicubic", 3, **_IMAGENET), 3),
        ModelDef("efficientnet_lite0", _efficientnet_lite0,
                 ImageSpec(224, 224, "squash", "bicubic", 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), 3),
        ModelDef("resnet18", _resnet(18), ImageSpec(224, 224, "squash", "bilinear", 3, **_IMAGENET), 1),
        ModelDef("resnet50", _resnet(50), ImageSpec(224, 224, "squash", "bilinear", 3, **_IMAGENET), 1),
        ModelDef("cnn_baseline", _cnn_baseline, ImageSpec(224, 224, "squash", "bilinear", 1, (0.5,), (0.25,)), 4,
                 pretrained_available=False),
    )
}


def get_model_def(name: str) -> ModelDef:
    if name not in REGISTRY:
        raise XrayError(f"unknown model {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build_model(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None) -> Classifier:
    """A Classifier for `num_classes`; ImageNet weights from torchvision/timm, or `weights` (a local
    state dict of the ImageNet model, loaded with weights_only=True; its own head is ignored)."""
    d = get_model_def(name)
    backbone, n_feat, blocks = d.build(pretrained and d.pretrained_available and weights is None)
    if weights:
        _load_backbone_weights(backbone, weights)
    return Classifier(backbone, n_feat, num_classes, blocks)


def _load_backbone_weights(backbone: nn.Module, path: str):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise XrayError(f"--weights {path}: no such file") from None
    except Exception as e:
        raise XrayError(f"--weights {path}: not a loadable state dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in matched]
    if missing:
        raise XrayError(f"--weights {path}: {len(missing)} backbone tensors missing or mis-shaped "
                        f"(e.g. {missing[0]}); is it a state dict of this architecture?")
    backbone.load_state_dict(matched, strict=True)


def backbone_parameters_in_blocks(model: Classifier):
    """Every backbone parameter, each with the index of the block that owns it."""
    owner = {}
    for i, block in enumerate(model.blocks):
        for m in block:
            for p in m.parameters():
                owner[id(p)] = i
    return [(n, p, owner.get(id(p))) for n, p in model.backbone.named_parameters()]
