"""Replace timm's dynamic TF-"same" padding with fixed padding for one input size.

timm's Conv2dSame computes its padding from the input shape at run time; exported with a dynamic
batch that becomes a Shape/Gather/Ceil subgraph the int8 quantizer rejects ("Graph is not a DAG").
For the model's fixed H x W the padding is a constant, so ZeroPad2d + Conv2d(padding=0) is exact.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def freeze_same_padding(model: nn.Module, channels: int, input_size: int) -> int:
    """In place; returns how many layers were replaced."""
    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:
        return 0
    targets = {name: m for name, m in model.named_modules() if isinstance(m, Conv2dSame)}
    if not targets:
        return 0
    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: sizes.__setitem__(name, inp[0].shape[-2:]))
             for name, m in targets.items()]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, channels, input_size, input_size))
    for h in hooks:
        h.remove()
    model.train(was_training)
    for name, m in targets.items():
        (h, w), (kh, kw) = sizes[name], m.weight.shape[-2:]
        ph = _same_pad(h, kh, m.stride[0], m.dilation[0])
        pw = _same_pad(w, kw, m.stride[1], m.dilation[1])
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups,
                         m.bias is not None)
        conv.weight, conv.bias = m.weight, m.bias
        fixed = nn.Sequential(nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), conv)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fixed)
    return len(targets)
