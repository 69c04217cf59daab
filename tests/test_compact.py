"""Short names in the int8 graph: smaller file, same outputs, same weights, graph inputs/outputs untouched."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from onnxruntime.quantization import QuantFormat, quantize_static

from xray.export.compact import compact_names, short_name
from xray.export.onnx_export import export_onnx
from xray.export.quantize import ArrayReader
from xray.train.models import REGISTRY, build_model


def test_short_name_drops_repeated_scopes_and_quantizer_suffixes():
    assert short_name("/backbone/backbone.0/backbone.0.2/backbone.0.2.1/block/block.3/block.3.0/"
                      "Conv_output_0_DequantizeLinear_Output") == "/backbone.0.2.1/block.3.0/Conv_dq"
    assert short_name("/backbone/blocks/blocks.1/blocks.1.0/conv_dw/Conv_output_0_QuantizeLinear") == \
        "/backbone/blocks.1.0/conv_dw/Conv_Q"
    assert short_name("onnx::Conv_627_quantized") == "onnx::Conv_627_quantized"
    assert short_name("input") == "input"


def _run(model: onnx.ModelProto, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_compacted_int8_model_is_smaller_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    spec = REGISTRY["efficientnet_b0"].spec.with_size(64)
    export_onnx(build_model("efficientnet_b0", 3, pretrained=False).eval(), spec, tmp_path / "fp32.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), ArrayReader([x[:4]], "input"),
                    quant_format=QuantFormat.QDQ, per_channel=True)
    original = onnx.load(str(tmp_path / "int8.onnx"))
    compact = compact_names(onnx.load(str(tmp_path / "int8.onnx")))

    onnx.checker.check_model(compact, full_check=True)
    assert compact.ByteSize() < 0.97 * original.ByteSize(), (compact.ByteSize(), original.ByteSize())
    assert [v.name for v in compact.graph.input] == ["input"] and [v.name for v in compact.graph.output] == ["logits"]
    assert sorted(t.raw_data for t in compact.graph.initializer) == sorted(t.raw_data for t in original.graph.initializer)
    assert max(len(s) for n in compact.graph.node for s in n.output) < max(len(s) for n in original.graph.node for s in n.output)
    np.testing.assert_array_equal(_run(compact, x), _run(original, x))


def test_names_whose_short_forms_clash_keep_their_originals():
    relu = lambda i, o: helper.make_node("Relu", [i], [o], name=o)  # noqa: E731
    graph = helper.make_graph(
        [relu("input", "/a/a.1/Relu_output_0"), relu("/a/a.1/Relu_output_0", "/a.1/Relu_output_0"),
         relu("/a.1/Relu_output_0", "/b/b.2/Relu_output_0"), relu("/b/b.2/Relu_output_0", "output")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2])])
    model = compact_names(helper.make_model(graph))
    outputs = [n.output[0] for n in model.graph.node]
    assert outputs == ["/a/a.1/Relu_output_0", "/a.1/Relu_output_0", "/b.2/Relu", "output"]
    x = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_array_equal(_run(model, x), [0.0, 2.0])
