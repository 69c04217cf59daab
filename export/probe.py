"""Read an ONNX graph's insides: node attributes, and intermediate tensors as extra session outputs.

Shared by GPTQ (layer inputs for the Hessians) and the bias correction (per-channel output means).
"""
from __future__ import annotations

import onnx
import onnxruntime as ort
from onnx import helper


def attribute(node: onnx.NodeProto, name: str, default):
    """The node's attribute value, or default when it is not set."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def probe_session(model: onnx.ModelProto, tensors: list[str], optimize: bool = True) -> ort.InferenceSession:
    """A session over a copy of model whose outputs also include the named intermediate tensors.
    optimize=False runs a QDQ model as its float simulation (no fusion into int8 kernels)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors if t not in have)
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
