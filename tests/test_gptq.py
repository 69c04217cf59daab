"""GPTQ weight rounding (export/gptq.py) on small hand-made layers: im2col, the identity case, the gain."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from xray.export.gptq import Layer, output_error, patches, round_depthwise, round_rows


@pytest.mark.parametrize("kernel,stride,pads", [((3, 3), (2, 2), [0, 0, 1, 1]), ((5, 5), (1, 1), [2, 2, 2, 2])])
def test_patches_match_torch_unfold(kernel, stride, pads):
    x = np.random.default_rng(0).standard_normal((2, 3, 11, 11)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), strides=list(stride), pads=pads)
    got = patches(x, node, kernel)  # N C Ho Wo k
    padded = torch.nn.functional.pad(torch.from_numpy(x), (pads[1], pads[3], pads[0], pads[2]))
    ref = torch.nn.functional.unfold(padded, kernel, stride=stride)  # N (C k) L
    n, c, ho, wo, k = got.shape
    assert np.allclose(got.reshape(n, c, ho * wo, k).transpose(0, 1, 3, 2).reshape(n, c * k, ho * wo), ref.numpy())


def test_identity_hessian_is_round_to_nearest():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 10))
    scale = np.abs(w).max(axis=1) / 63
    nearest = np.clip(np.round(w / scale[:, None]), -63, 63)
    assert np.array_equal(round_rows(w, np.eye(10), scale, -63, 63), nearest)
    assert np.array_equal(round_depthwise(w, np.stack([np.eye(10)] * 6), scale, -63, 63), nearest)


def correlated_inputs(rng, n, k):
    """Inputs with strongly correlated features, as neighbouring pixels and channels are."""
    base = rng.standard_normal((n, 3))
    return base @ rng.standard_normal((3, k)) + 0.1 * rng.standard_normal((n, k)) + 1.0


def test_gptq_lowers_the_layer_output_error_within_the_same_integer_range():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 24))
    x = correlated_inputs(rng, 500, 24)
    scale = np.abs(w).max(axis=1) / 63
    layer = Layer(node=None, weight=w, kind="gemm", dequantize=None, hessian=x.T @ x)
    nearest = np.clip(np.round(w / scale[:, None]), -63, 63)
    q = round_rows(w, layer.hessian, scale, -63, 63)
    assert q.min() >= -63 and q.max() <= 63 and np.array_equal(q, np.round(q))
    direct = lambda ints: float(((x @ (w - ints * scale[:, None]).T) ** 2).sum())
    assert output_error(layer, w, q, scale) == pytest.approx(direct(q))
    assert direct(q) < 0.5 * direct(nearest)


def test_gptq_depthwise_uses_each_channels_own_inputs():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 9))
    xs = [correlated_inputs(rng, 300, 9) for _ in range(32)]
    h = np.stack([x.T @ x for x in xs])
    scale = np.abs(w).max(axis=1) / 127
    q = round_depthwise(w, h, scale, -127, 127)
    nearest = np.clip(np.round(w / scale[:, None]), -127, 127)
    total = lambda ints: sum(float(((x @ (w[c] - ints[c] * scale[c])) ** 2).sum()) for c, x in enumerate(xs))
    assert total(q) < 0.7 * total(nearest)
    shuffled = round_depthwise(w, h[::-1], scale, -127, 127)  # each channel with another channel's inputs
    assert total(q) < total(shuffled)


def test_block_updates_give_the_same_integers_as_column_by_column():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 50))
    x = correlated_inputs(rng, 400, 50)
    scale = np.abs(w).max(axis=1) / 63
    one_block = round_rows(w, x.T @ x, scale, -63, 63, block=50)
    assert np.array_equal(round_rows(w, x.T @ x, scale, -63, 63, block=7), one_block)
    assert np.array_equal(round_rows(w, x.T @ x, scale, -63, 63, block=1), one_block)
