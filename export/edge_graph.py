"""The module xray-export turns into ONNX: class logits first, then the edge's trust outputs.

    logits     N x classes   the classifier, divided by the fitted temperature (if any)
    ood_score  N             distance of the pooled features from the training distribution (export/ood.py)
    cam        N x classes x h x w   class activation maps: the head's weights as a 1x1 convolution over
                             the last feature map. For a global-average-pool + linear head this is
                             Grad-CAM of that layer (before its ReLU) up to the positive factor 1 / (h w):
                             mean(cam[c]) + bias[c] == the un-tempered logit of class c.

Every registry model is `Classifier(backbone, head)` with a backbone that ends in global average
pooling; `feature_map` runs the backbone up to, not including, that pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_NAMES = ("logits", "ood_score", "cam")


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last spatial feature map (N x K x h x w) of a registry backbone, before its global pooling."""
    if hasattr(backbone, "forward_features"):  # timm models (EfficientNet-Lite0)
        return backbone.forward_features(x)
    if hasattr(backbone, "layer4"):  # torchvision ResNets (fc replaced by Identity)
        b = backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))
    if isinstance(backbone, nn.Sequential) and isinstance(backbone[-2], nn.AdaptiveAvgPool2d):
        return backbone[:-2](x)  # torchvision EfficientNet-B0 and the from-scratch CNN: [..., pool, flatten]
    raise TypeError(f"no feature map rule for backbone {type(backbone).__name__}")


def pooled_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, un-tempered logits) of a Classifier: what the OOD statistics are fitted on."""
    pooled = F.adaptive_avg_pool2d(feature_map(model.backbone, x), 1).flatten(1)
    return pooled, model.head(pooled)


class ClassActivationMaps(nn.Module):
    """The linear head's weights as a 1x1 convolution: a module of its own, so the export scope `/cam/`
    names its node and the int8 model keeps it in float (183 k multiply-adds at 224 px)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().clone()[:, :, None, None])

    def forward(self, fmap):
        return F.conv2d(fmap, self.weight)


class EdgeGraph(nn.Module):
    """classifier + temperature + OOD score + CAM, in one forward pass over one feature map."""

    def __init__(self, model: nn.Module, ood_score: nn.Module, temperature: float | None = None):
        super().__init__()
        self.model = model.eval()
        self.ood_score = ood_score
        self.register_buffer("temperature", torch.tensor(float(temperature or 1.0)))
        self.cam = ClassActivationMaps(model.head[-1])

    def forward(self, x):
        fmap = feature_map(self.model.backbone, x)
        pooled = F.adaptive_avg_pool2d(fmap, 1).flatten(1)
        raw = self.model.head(pooled)
        return raw / self.temperature, self.ood_score(pooled, raw), self.cam(fmap)
