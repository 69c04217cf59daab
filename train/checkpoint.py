"""Checkpoints: weights in `.safetensors` + a `.json` sidecar (no pickle for anything a user receives).

Sidecar: model name, classes, image spec, phase, epoch, val metrics, the full training config.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from xray.common.artifacts import atomic_path, sha256_file, write_json_atomic
from xray.common.errors import XrayError
from xray.common.image_spec import ImageSpec

from .models import Classifier, build_model

SIDECAR_VERSION = 1


def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(path: str | Path, model: Classifier, meta: dict) -> None:
    """Write weights then sidecar, each atomically; the sidecar records the weights' sha256."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"model_name": meta["model_name"]})
    write_json_atomic(sidecar_path(path), {**meta, "format_version": SIDECAR_VERSION,
                                           "weights_sha256": sha256_file(path)})


def read_sidecar(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    side = sidecar_path(path)
    if not path.is_file():
        raise XrayError(f"{path}: no such checkpoint")
    if not side.is_file():
        raise XrayError(f"{path}: its sidecar {side.name} is missing")
    try:
        meta = json.loads(side.read_text())
        meta["image_spec"] = ImageSpec.from_dict(meta["image_spec"])
        meta["classes"] = list(meta["classes"])
        meta["model_name"] = str(meta["model_name"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise XrayError(f"{side}: not a valid checkpoint sidecar ({type(e).__name__}: {e})") from None
    return meta


def set_temperature(path: str | Path, temperature: float | None) -> None:
    """Record (or with None, remove) a fitted softmax temperature in the sidecar; the weights are untouched."""
    side = sidecar_path(Path(path) / "best.safetensors" if Path(path).is_dir() else path)
    meta = json.loads(side.read_text())
    meta.pop("temperature", None)
    if temperature is not None:
        meta["temperature"] = float(temperature)
    write_json_atomic(side, meta)


def load_checkpoint(path: str | Path) -> tuple[Classifier, dict]:
    """Rebuild the model from its sidecar and load the weights (strict)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    meta = read_sidecar(path)
    model = build_model(meta["model_name"], len(meta["classes"]), pretrained=False)
    load_weights_into(model, path, meta)
    return model, meta


def load_weights_into(model: Classifier, path: str | Path, meta: dict | None = None) -> None:
    try:
        state = load_file(str(path))
    except Exception as e:
        raise XrayError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    own = model.state_dict()
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if bad or set(state) - set(own):
        what = f"model {meta['model_name']}, {len(meta['classes'])} classes" if meta else "this model"
        raise XrayError(f"{path}: weights do not fit {what} (e.g. {(bad or sorted(set(state) - set(own)))[0]})")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
