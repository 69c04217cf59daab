"""PyTorch checkpoint -> fp32 ONNX: dynamic batch, fixed H x W, constant folded, checker-clean."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch

from xray.common.artifacts import atomic_path
from xray.common.image_spec import ImageSpec

from .static_pad import freeze_same_padding

OPSET = 17
INPUT_NAME = "input"


def export_onnx(model: torch.nn.Module, spec: ImageSpec, path: Path, opset: int = OPSET,
                output_names=("logits",)) -> None:
    """The TorchScript-based exporter (no onnxscript needed; graphs the quantizer accepts). Exports a
    copy: the caller's model stays the untouched PyTorch reference the parity gate compares against.
    output_names: one per model output (an EdgeGraph has three: export/edge_graph.py)."""
    model = copy.deepcopy(model).eval()
    freeze_same_padding(model, spec.channels, spec.input_size)
    example = torch.zeros(1, spec.channels, spec.input_size, spec.input_size)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=list(output_names),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *output_names)},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
        onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the model's metadata_props (atomically)."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        proto.metadata_props.add(key=key, value=value)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
