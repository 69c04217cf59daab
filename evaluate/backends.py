"""Class probabilities over a list of files from a PyTorch checkpoint or an exported ONNX model.

Both go through xray.infer.predict.prepare (the one decode + preprocess), so a difference between
backends is the model's, never the input pipeline's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray.common.errors import XrayError
from xray.common.image_spec import ImageSpec
from xray.infer.predict import prepare


@dataclass
class LoadedModel:
    kind: str  # "pytorch" | "onnx"
    path: Path
    name: str
    classes: list[str]
    spec: ImageSpec
    predict_logits: object  # float32 N x C x H x W -> N x classes logits
    temperature: float = 1.0  # a checkpoint's fitted temperature (an ONNX model has it in its graph)
    torch_model: object = None  # the Classifier, for Grad-CAM and embeddings (PyTorch checkpoints only)
    baked_temperature: float = 1.0  # an ONNX model's: its logits are already divided by it (xray-export)

    @property
    def effective_temperature(self) -> float:
        """The temperature behind this model's probabilities, wherever it is applied."""
        return self.baked_temperature if self.kind == "onnx" else self.temperature

    def raw_logits(self, logits):
        """predict_logits' output without any temperature (an ONNX graph's logits times its baked T)."""
        return logits * self.baked_temperature if self.kind == "onnx" else logits


def load_model(path: str | Path, threads: int = 0) -> LoadedModel:
    p = Path(path)
    if p.suffix == ".onnx":
        from xray.common.cpu import detect_cpu
        from xray.infer.model import EdgeModel

        edge = EdgeModel(p, threads)
        if problem := edge.int8_problem(detect_cpu()):  # its figures here would not be the model's
            raise XrayError(f"{p}: {problem}; evaluate it on a CPU it covers, or evaluate model.onnx")
        run = lambda x: edge.session.run(None, {edge.input_name: x})[0]  # noqa: E731
        return LoadedModel("onnx", p, edge.info.model_name, edge.info.classes, edge.info.spec, run,
                           baked_temperature=float(edge.info.verification.get("temperature") or 1.0))
    if p.is_dir() and not (p / "best.safetensors").is_file():
        raise XrayError(f"{p}: no best.safetensors in this folder (give a run folder, a .safetensors or a .onnx)")
    if not p.exists():
        raise XrayError(f"{p}: no such model (give a run folder, a .safetensors checkpoint or a .onnx model)")
    try:
        import torch

        from xray.train.checkpoint import load_checkpoint
    except ImportError:
        raise XrayError("evaluating a PyTorch checkpoint needs the training extra: pip install 'xray-edge[train]' "
                        "(or evaluate the exported .onnx)") from None
    model, meta = load_checkpoint(p)
    model.eval()
    if threads:
        torch.set_num_threads(threads)

    def run(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    ckpt = p / "best.safetensors" if p.is_dir() else p
    return LoadedModel("pytorch", ckpt, meta["model_name"], meta["classes"], meta["image_spec"], run,
                       float(meta.get("temperature") or 1.0), model)


def predict_logits(model: LoadedModel, files: list[str], batch_size: int = 32, progress=None) -> np.ndarray:
    """N x classes float64 logits (before any temperature), in file order."""
    out = []
    for i in range(0, len(files), batch_size):
        x = np.stack([prepare(f, model.spec) for f in files[i:i + batch_size]])
        out.append(np.asarray(model.predict_logits(x), dtype=np.float64))
        if progress is not None:
            progress.update(len(x))
    return np.concatenate(out)
