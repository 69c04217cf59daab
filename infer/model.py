"""Find the ONNX model, open it with onnxruntime, and check it describes itself (xray metadata).

Which model (first match wins):
  1. --model PATH (a model file, or an export folder)
  2. $XRAY_MODEL (the same)
  3. the newest runs/*/export/ folder (by its model file's modification time) below the current directory.
In an export folder holding both verified models (model.int8.onnx and model.onnx; an int8 model that
failed export's accuracy gate is model.int8.rejected.onnx and never picked), the one that is faster on
this CPU: int8 where the CPU has an int8 dot-product instruction (VNNI, AMX, Arm dot product), else fp32
(measured here: int8 Lite0 at 0.89x fp32 on AVX2, 1.5-1.9x with VNNI). --precision overrides.

An int8 model is only run on a CPU class its metadata covers (xray.common.int8_classes): from a folder
chosen automatically the tools fall back to fp32 with a note; a file, or --precision int8, is refused
unless --force-int8.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from xray.common.cpu import Cpu, detect_cpu
from xray.common.errors import XrayError
from xray.common.int8_classes import Int8Classes
from xray.common.metrics import softmax
from xray.common.model_meta import ModelInfo

from .registry import fetch_registered, is_registry_uri

ENV_VAR = "XRAY_MODEL"
DEFAULT_GLOB = "runs/*/export"
PREFERENCE = ("model.int8.onnx", "model.onnx")


PRECISIONS = ("auto", "int8", "fp32")
FILES = {"int8": "model.int8.onnx", "fp32": "model.onnx"}


@dataclass
class ModelChoice:
    path: Path
    reason: str | None = None  # why this file, when a folder offered both precisions
    auto: bool = False  # picked by this CPU from a folder holding both models (so fp32 is a fallback)
    forced: bool = False  # an int8 model run with --force-int8 on a CPU its export does not cover


def resolve_model_path(option: str | None, cwd: Path | None = None, precision: str = "auto",
                       cpu: Cpu | None = None) -> Path:
    return choose_model(option, cwd, precision, cpu).path


def choose_model(option: str | None, cwd: Path | None = None, precision: str = "auto",
                 cpu: Cpu | None = None) -> ModelChoice:
    """The model to run (see the module docstring). cpu: this CPU's class (tests pass their own)."""
    given = option or os.environ.get(ENV_VAR)
    if is_registry_uri(given):  # an export folder registered in MLflow (xray-export --register NAME)
        given = str(fetch_registered(given))
    if given:
        return choose_in_folder(Path(given), precision, cpu) if Path(given).is_dir() else ModelChoice(Path(given))
    best = None
    for folder in Path(cwd or ".").glob(DEFAULT_GLOB):
        newest = max((folder / n for n in PREFERENCE if (folder / n).is_file()), key=_mtime, default=None)
        if newest and (best is None or _mtime(newest) > _mtime(best)):
            best = newest
    if best is None:
        raise XrayError(f"no model: pass --model PATH, set ${ENV_VAR}, or run xray-export "
                        f"(looked for {DEFAULT_GLOB}/{{{','.join(PREFERENCE)}}})")
    return choose_in_folder(best.parent, precision, cpu)


def _mtime(p: Path) -> float:
    return p.stat().st_mtime


def choose_in_folder(folder: Path, precision: str = "auto", cpu: Cpu | None = None) -> ModelChoice:
    """An export folder -> its int8 or fp32 model, by --precision or, for auto, by this CPU."""
    have = {p: folder / f for p, f in FILES.items() if (folder / f).is_file()}
    if not have:
        raise XrayError(f"{folder}: no model.int8.onnx or model.onnx in this folder (an export folder from xray-export)")
    if precision != "auto":
        if precision not in have:
            raise XrayError(f"{folder}: no {FILES[precision]} (--precision {precision}); "
                            f"it holds {', '.join(sorted(p.name for p in have.values()))}")
        return ModelChoice(have[precision], f"{precision}: asked for with --precision")
    if len(have) == 1:
        return ModelChoice(next(iter(have.values())))
    dot = (cpu or detect_cpu()).int8_dot_product
    if dot:
        return ModelChoice(have["int8"], f"int8: this CPU has {dot}, where int8 runs faster than fp32", auto=True)
    return ModelChoice(have["fp32"], "fp32: this CPU has no int8 dot-product instruction (VNNI/AMX), where int8 is "
                                     "no faster than fp32", auto=True)


def open_model(option: str | None, precision: str = "auto", threads: int = 0, force_int8: bool = False,
               cpu: Cpu | None = None, cwd: Path | None = None) -> tuple["EdgeModel", ModelChoice]:
    """choose_model, open it, and make sure an int8 model is covered on this CPU: (model, why this one).
    Not covered: an automatic choice from a folder falls back to its fp32 model; otherwise an error that
    names --force-int8 (which runs it anyway, with a warning in the reason)."""
    cpu = cpu or detect_cpu()
    choice = choose_model(option, cwd, precision, cpu)
    model = EdgeModel(choice.path, threads)
    problem = model.int8_problem(cpu)
    if problem is None:
        return model, choice
    if force_int8:
        return model, ModelChoice(choice.path, f"int8 forced with --force-int8, although {problem}", forced=True)
    fp32 = choice.path.with_name(FILES["fp32"])
    if choice.auto and fp32.is_file():
        return EdgeModel(fp32, threads), ModelChoice(fp32, f"fp32: {problem}", auto=True)
    raise XrayError(f"{choice.path}: {problem}. Run the fp32 model.onnx, or pass --force-int8 to run it anyway")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Outputs:
    """One batch through the model: probabilities (rows sum to 1), and where the model has them the
    out-of-distribution score and flag (score above the model's threshold) and the class activation maps."""

    probs: np.ndarray
    ood_score: np.ndarray | None = None
    ood: np.ndarray | None = None
    cam: np.ndarray | None = None


class EdgeModel:
    """An xray-edge ONNX model: `predict(batch)` -> Outputs. Models exported before the trust outputs
    existed have only logits: `has_guard` / `has_cam` are then False and those fields stay None."""

    def __init__(self, path: Path, threads: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise XrayError(f"{self.path}: model file not found" if not self.path.exists()
                            else f"{self.path}: model path is not a file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or cpu_count()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # onnxruntime's own warnings are not the user's business
        # decoding threads run beside inference: spinning intra-op threads would steal their cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for protobuf/graph problems
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise XrayError(f"{self.path}: not a usable ONNX model ({first_line[:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(meta, source=str(self.path))
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        self.has_guard = "ood_score" in names and "threshold" in self.info.ood
        self.has_cam = "cam" in names
        self._outputs = [names[0]] + (["ood_score"] if self.has_guard else [])
        self._check_shapes()

    def _check_shapes(self):
        spec, n = self.info.spec, len(self.info.classes)
        want_in = [None, spec.channels, spec.input_size, spec.input_size]
        got_in = self.session.get_inputs()[0].shape
        got_out = self.session.get_outputs()[0].shape
        if len(got_in) != 4 or any(isinstance(g, int) and w is not None and g != w for g, w in zip(got_in, want_in)):
            raise XrayError(f"{self.path}: model input shape {got_in} disagrees with its metadata "
                            f"(N x {spec.channels} x {spec.input_size} x {spec.input_size})")
        if len(got_out) != 2 or (isinstance(got_out[1], int) and got_out[1] != n):
            raise XrayError(f"{self.path}: model output shape {got_out} disagrees with its {n} classes")

    def runtime_warning(self) -> str | None:
        """int8 results depend on onnxruntime's kernels: say so when this onnxruntime is not the one the
        export verified the model with (major.minor differ)."""
        verified = str(self.info.verification.get("onnxruntime", ""))
        if self.info.precision != "int8" or not verified or verified.split(".")[:2] == ort.__version__.split(".")[:2]:
            return None
        return (f"{self.path.name} was verified with onnxruntime {verified}, this is {ort.__version__}: int8 results "
                "may differ slightly; check them with xray-infer --eval on labelled images")

    def int8_classes(self) -> Int8Classes | None:
        """Where this int8 model is right (None for an fp32 model)."""
        if self.info.precision != "int8":
            return None
        return Int8Classes.of(self.info.quantization, self.info.int8_cpu_classes)

    def int8_problem(self, cpu: Cpu) -> str | None:
        """Why this int8 model must not run on `cpu` (None: fp32, or covered there)."""
        classes = self.int8_classes()
        return classes.problem(cpu) if classes else None

    def portability_note(self) -> str | None:
        """One line for an int8 model exported before int8 portability was checked."""
        classes = self.int8_classes()
        return classes.note() if classes else None

    def guard_note(self) -> str | None:
        """One line for models without the out-of-distribution guard."""
        if self.has_guard:
            return None
        return (f"{self.path.name} has no out-of-distribution guard (exported before it existed): every image gets "
                "a diagnosis; re-export it with xray-export to get ood / ood_score")

    def predict(self, batch: np.ndarray, cam: bool = False) -> Outputs:
        """cam=True also returns the class activation maps (N x classes x h x w) when the model has them."""
        names = self._outputs + (["cam"] if cam and self.has_cam else [])
        got = dict(zip(names, self.session.run(names, {self.input_name: batch})))
        out = Outputs(softmax(got[names[0]]), cam=got.get("cam"))
        if self.has_guard:
            out.ood_score = got["ood_score"].astype(np.float64)
            out.ood = out.ood_score > float(self.info.ood["threshold"])
        return out
