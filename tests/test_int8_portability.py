"""int8 that is right on every CPU: the CPU class from CPUID, the static weight check, the fused kernels against
onnxruntime's unfused reference natively and under `qemu-x86_64 -cpu Haswell` (AVX2 kernels, which saturate
8-bit weights), and the edge tools' choice / refusal / fallback, also under emulated Haswell and Nehalem."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import INFER, ROOT, run_command
from onnx import numpy_helper

from xray.common.cpu import CPU_CLASSES, SATURATING_CLASSES, Cpu, classify, cpu_flags, detect_cpu, numpy_features
from xray.common.errors import XrayError
from xray.common.imageio import load_image
from xray.common.model_meta import ModelInfo
from xray.common.preprocess import preprocess
from xray.export.emulate import run_emulated
from xray.export.onnx_export import set_metadata
from xray.export.portability import MAX_KERNEL_ERROR_RATIO, kernel_agreement, reference_session, weight_check
from xray.export.quantize import default_settings, quantize
from xray.infer.model import open_model

X86 = platform.machine().lower() in ("x86_64", "amd64")
QEMU = "qemu-x86_64"
ARM64_ROOT = ROOT / ".venv" / "arm64"  # make test builds it: scripts/arm64_root.sh
NON_SATURATING = [c for c in CPU_CLASSES if c not in SATURATING_CLASSES]
SERVE = [sys.executable, "-c", "from xray.serve.cli import main; main(prog_name='xray-serve')"]


def emulated(cpu: str, cmd: list, timeout=300) -> subprocess.CompletedProcess:
    """cmd (a Python command line) under qemu-x86_64 -cpu CPU. numpy's OpenBLAS picks an AVX kernel at load
    under qemu's Nehalem model (an illegal instruction there): OPENBLAS_CORETYPE names the core it must use."""
    env = {**os.environ, "OPENBLAS_CORETYPE": cpu} if cpu == "Nehalem" else None
    return subprocess.run([QEMU, "-cpu", cpu, *map(str, cmd)], capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "TCG doesn't support" not in line and line.strip()]


@pytest.fixture(scope="module")
def qemu():
    assert X86, "the emulated checks need an x86-64 host"
    assert shutil.which(QEMU), "make test installs qemu-user"
    return QEMU


@pytest.fixture(scope="module")
def arm64_root(qemu):
    assert (ARM64_ROOT / "root" / "usr" / "bin" / "python3").exists(), "make test builds it (scripts/arm64_root.sh)"
    return ARM64_ROOT


@pytest.fixture(scope="module")
def int8_pair(tiny_onnx, synthetic_raw, tmp_path_factory):
    """The tiny Lite0 (64 px, sharpened head) quantized two ways, each in an export folder with its fp32 model and
    the metadata xray-export writes: the default (portable) and --int8-full-range. Also held-out inputs."""
    fp32, _, spec, classes = tiny_onnx
    files = sorted(synthetic_raw.rglob("*.png"))
    x = np.stack([preprocess(load_image(f), spec) for f in files]).astype(np.float32)
    calibration, held_out = x[::3][:24], x[1::3][:16]
    base = tmp_path_factory.mktemp("int8_pair")
    folders = {}
    for name, full in (("portable", False), ("full_range", True)):
        folder = base / name
        folder.mkdir()
        settings = default_settings(gptq_images=0, bias_correction_images=8, full_range=full)
        quantize(fp32, folder / "model.int8.onnx", [b[None] for b in calibration], settings)
        covered = weight_check(onnx.load(str(folder / "model.int8.onnx")))["covered"]
        set_metadata(folder / "model.int8.onnx",
                     ModelInfo(classes, spec, "efficientnet_lite0", precision="int8", quantization=settings.to_dict(),
                               int8_cpu_classes={"covered": covered, "verified": []}).to_metadata())
        shutil.copy(fp32, folder / "model.onnx")
        folders[name] = folder
    legacy = base / "legacy"  # an int8 file from before xray.quantization existed
    legacy.mkdir()
    shutil.copy(folders["portable"] / "model.int8.onnx", legacy / "model.int8.onnx")
    set_metadata(legacy / "model.int8.onnx", ModelInfo(classes, spec, "efficientnet_lite0", precision="int8").to_metadata())
    image = base / "film.png"
    shutil.copy(files[1], image)
    return folders | {"legacy": legacy}, held_out, fp32, image


# ------------------------------------------------------------------------------------------------- CPU classes

HASWELL = {k: True for k in ("SSE42", "AVX", "AVX2", "FMA3", "F16C", "BMI2", "MOVBE")}
ZEN4_FLAGS = set("avx avx2 fma f16c bmi2 movbe gfni vaes vpclmulqdq avx512f avx512bw avx512_vnni".split())
SPR_FLAGS = ZEN4_FLAGS | {"avx_vnni", "amx_int8", "amx_tile"}
ALDER_FLAGS = set("avx avx2 fma f16c bmi2 movbe gfni vaes vpclmulqdq avx_vnni".split())


def numpy_view(flags: set[str]) -> dict[str, bool]:
    """What numpy's table says on a native machine with these /proc/cpuinfo flags."""
    from xray.common.cpu import SHARED_X86_FLAGS

    return {n: f in flags for f, n in SHARED_X86_FLAGS.items()}


def test_cpu_classes_from_cpuid_and_cpuinfo():
    """numpy's CPUID table decides; /proc/cpuinfo adds AVX-VNNI / AMX only when it agrees with numpy on every
    flag both see (under qemu it shows the host's flags)."""
    assert classify(numpy_view(ZEN4_FLAGS), ZEN4_FLAGS, "x86_64") == Cpu("avx512_vnni", "CPUID (numpy)")
    assert classify(numpy_view(SPR_FLAGS), SPR_FLAGS, "x86_64").cls == "amx"
    assert classify(numpy_view(ALDER_FLAGS), ALDER_FLAGS, "x86_64").cls == "avx_vnni"
    assert classify(numpy_view(ZEN4_FLAGS - {"avx512_vnni"}), ZEN4_FLAGS - {"avx512_vnni"}, "AMD64").cls == "avx512"
    plain = set("avx avx2 fma f16c bmi2 movbe".split())
    assert classify(numpy_view(plain), plain, "x86_64").cls == "avx2"
    # emulated Haswell on a Sapphire Rapids or Alder Lake host: cpuinfo shows the host, numpy the emulated CPU
    assert classify(HASWELL, SPR_FLAGS, "x86_64").cls == "avx2"
    assert classify(HASWELL, ALDER_FLAGS, "x86_64").cls == "avx2"
    assert classify({"SSE42": True, "AVX2": False}, ZEN4_FLAGS, "x86_64").cls is None  # Nehalem: no class
    assert classify(HASWELL, set(), "AMD64").cls == "avx2"  # Windows / macOS: no /proc/cpuinfo
    assert classify({"ASIMD": True, "ASIMDDP": True}, set(), "arm64").cls == "arm64_dotprod"  # Apple M1
    assert classify({"ASIMD": True, "ASIMDDP": False}, {"asimd"}, "aarch64").cls == "arm64"  # Cortex-A72
    assert classify({}, {"fp", "asimd", "asimddp"}, "aarch64") == Cpu("arm64_dotprod", "/proc/cpuinfo")
    assert classify({}, set(), "x86_64").cls is None and classify({}, set(), "riscv64").cls is None
    assert Cpu("avx2", "x").int8_dot_product is None and Cpu("amx", "x").int8_dot_product == "AMX"


def test_this_machine_is_classified_from_numpys_table():
    """The private numpy table is where the wrapper looks (fails if numpy moves it), and natively its class is
    the one /proc/cpuinfo's flags give."""
    features = numpy_features()
    assert ("AVX2" in features) if X86 else ("ASIMD" in features)
    cpu = detect_cpu()
    assert cpu.source.startswith("CPUID (numpy)") and cpu.cls in CPU_CLASSES
    flags = cpu_flags()
    if flags:
        assert classify({}, flags, platform.machine()).cls == cpu.cls


def test_cpu_class_under_emulated_haswell_and_nehalem(qemu):
    code = "from xray.common.cpu import detect_cpu, cpu_flags; c = detect_cpu(); print(c.cls, 'avx512f' in cpu_flags())"
    for cpu, want in (("Haswell", "avx2"), ("Nehalem", "None")):
        proc = emulated(cpu, [sys.executable, "-c", code])
        assert proc.returncode == 0, error_lines(proc)
        cls, host_flags_seen = proc.stdout.split()
        assert cls == want
        assert host_flags_seen == str("avx512f" in cpu_flags())  # /proc/cpuinfo still shows the host there


# ------------------------------------------------------------------------------------------- export-side checks

def matrix_and_depthwise(model: onnx.ModelProto):
    """(a pointwise / matrix weight initializer, a depthwise one) of a QDQ model."""
    from xray.export.portability import int8_weights

    weights = int8_weights(model)
    inits = {i.name: i for i in model.graph.initializer}
    return (inits[next(w.name for w in weights if not w.depthwise)], inits[next(w.name for w in weights if w.depthwise)])


def test_static_check_portable_weights_fit_every_class_and_full_range_does_not(int8_pair):
    folders = int8_pair[0]
    portable = weight_check(onnx.load(str(folders["portable"] / "model.int8.onnx")))
    full = weight_check(onnx.load(str(folders["full_range"] / "model.int8.onnx")))
    assert portable["covered"] == list(CPU_CLASSES) and portable["u8s8_matrix_max_abs_weight"] <= 64
    assert portable["depthwise_layers"] >= 10 and portable["u8s8_matrix_layers"] >= 30
    assert full["covered"] == NON_SATURATING and full["layers_over_pair_safe"] > 0
    assert full["u8s8_matrix_max_abs_weight"] == 127

    model = onnx.load(str(folders["portable"] / "model.int8.onnx"))
    dw = numpy_helper.to_array(matrix_and_depthwise(model)[1])
    assert np.abs(dw.astype(int)).max() > 64  # depthwise keeps 8 bits: its kernels never saturate
    for which, value, lost in ((0, 100, SATURATING_CLASSES), (1, -128, ("arm64", "arm64_dotprod"))):
        m = onnx.load(str(folders["portable"] / "model.int8.onnx"))
        init = matrix_and_depthwise(m)[which]
        w = numpy_helper.to_array(init).copy()
        w.flat[0] = value
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        assert weight_check(m)["covered"] == [c for c in CPU_CLASSES if c not in lost], (which, value)


def test_covered_model_matches_the_unfused_reference_natively_and_on_emulated_avx2(int8_pair, qemu):
    """The issue's core check, true on any host: the portable model agrees with onnxruntime's unfused reference
    (DequantizeLinear + float ops) natively and under qemu Haswell, with the same numbers on both CPUs; the
    full-range model does not agree under emulated AVX2, and agrees natively exactly when this CPU's kernels
    cannot saturate."""
    folders, x, fp32_path, _ = int8_pair
    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    got = {}
    for name in ("portable", "full_range"):
        path = folders[name] / "model.int8.onnx"
        reference = reference_session(path, 2).run(None, {"input": x})
        native = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
        emulated_out, seen = run_emulated(path, x, "avx2")
        assert seen == "avx2"
        got[name] = (kernel_agreement(native, reference, fp32, None), kernel_agreement(emulated_out, reference, fp32, None),
                     native, emulated_out)
    native, emul, native_out, emul_out = got["portable"]
    assert native["agrees"] and emul["agrees"], got["portable"][:2]
    assert np.abs(native_out[0] - emul_out[0]).max() < 1e-4  # exact integer kernels: the same answers on both CPUs
    native, emul, _, _ = got["full_range"]
    assert not emul["agrees"] and emul["kernel_error_ratio"] > 3 * MAX_KERNEL_ERROR_RATIO, emul
    assert native["agrees"] == (detect_cpu().cls not in SATURATING_CLASSES), native


def test_arm_kernels_agree_with_the_reference_with_and_without_dot_product(int8_pair, arm64_root):
    """onnxruntime's aarch64 wheel under qemu-aarch64: NEON multiply-add kernels (cortex-a72, no dot product) and
    udot kernels (neoverse-n1) give the unfused reference's answers for 7-bit and 8-bit weights alike (Arm's
    kernels cannot saturate), and the CPU class is read right on both."""
    folders, x, fp32_path, _ = int8_pair
    x = x[:8]
    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for name in ("portable", "full_range"):
        path = folders[name] / "model.int8.onnx"
        reference = reference_session(path, 2).run(None, {"input": x})
        for cls in ("arm64", "arm64_dotprod"):
            out, seen = run_emulated(path, x, cls, arm64_root=arm64_root)
            a = kernel_agreement(out, reference, fp32, None)
            assert seen == cls and a["agrees"], (name, cls, seen, a)


# ------------------------------------------------------------------------------------------ the edge's choice

def test_choice_refusal_fallback_and_force(int8_pair):
    folders = int8_pair[0]
    avx2, vnni, unknown = Cpu("avx2", "test"), Cpu("avx512_vnni", "test"), Cpu(None, "test")
    full_file = str(folders["full_range"] / "model.int8.onnx")
    with pytest.raises(XrayError, match=r"not covered on this CPU \(avx2 \(test\); covered: avx512_vnni.*--force-int8"):
        open_model(full_file, cpu=avx2)
    with pytest.raises(XrayError, match="--force-int8"):
        open_model(str(folders["full_range"]), "int8", cpu=avx2)
    model, choice = open_model(str(folders["full_range"]), cpu=avx2)  # auto: fp32 is the faster one here anyway
    assert model.path.name == "model.onnx" and not choice.forced
    model, choice = open_model(full_file, force_int8=True, cpu=avx2)
    assert model.info.precision == "int8" and choice.forced and "--force-int8" in choice.reason
    model, choice = open_model(full_file, cpu=vnni)
    assert model.info.precision == "int8" and model.portability_note() is None
    model, _ = open_model(str(folders["portable"] / "model.int8.onnx"), cpu=avx2)  # portable: right everywhere
    assert model.info.quantization["reduce_range"] is True
    with pytest.raises(XrayError, match="unclassified"):  # x86 without AVX2 is in no class
        open_model(str(folders["portable"] / "model.int8.onnx"), cpu=unknown)

    # a folder whose int8 model does not cover this dot-product CPU: the automatic choice falls back to fp32
    narrow = folders["full_range"].parent / "narrow"
    shutil.copytree(folders["full_range"], narrow)
    meta = ModelInfo.from_metadata(ort.InferenceSession(full_file).get_modelmeta().custom_metadata_map)
    meta.int8_cpu_classes = {"covered": ["avx512_vnni"], "verified": []}
    set_metadata(narrow / "model.int8.onnx", meta.to_metadata())
    model, choice = open_model(str(narrow), cpu=Cpu("amx", "test"))
    assert model.path.name == "model.onnx" and choice.reason.startswith("fp32: this int8 model is not covered")

    legacy = str(folders["legacy"] / "model.int8.onnx")
    for cpu in (avx2, Cpu("avx512", "t"), Cpu("arm64", "t"), unknown):
        with pytest.raises(XrayError, match="exported before int8 portability was checked.*re-export"):
            open_model(legacy, cpu=cpu)
    for cls in ("avx512_vnni", "avx_vnni", "amx", "arm64_dotprod"):
        model, _ = open_model(legacy, cpu=Cpu(cls, "t"))
        assert "re-export" in model.portability_note()


def test_cli_choice_refusal_and_force_under_emulated_haswell(int8_pair, qemu):
    """xray-infer run on an emulated AVX2 CPU (no VNNI) and an emulated Nehalem (no AVX2), where /proc/cpuinfo
    still shows this host's flags: a full-range or legacy int8 file is refused with one line naming
    --force-int8, the folder gives fp32, --force-int8 runs it with a warning; the portable file gives the
    same numbers as natively."""
    folders, _, _, image = int8_pair
    full = folders["full_range"]

    def infer(cpu, *args):
        return emulated(cpu, INFER + [*map(str, args), image, "-f", "json", "-q"])

    for model in (full / "model.int8.onnx", folders["legacy"] / "model.int8.onnx"):
        proc = infer("Haswell", "-m", model)
        assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
        assert error_lines(proc)[0].startswith("error: ") and "--force-int8" in proc.stderr
    proc = infer("Haswell", "-m", full, "--precision", "int8")
    assert proc.returncode == 2 and "--force-int8" in proc.stderr
    proc = infer("Haswell", "-m", full)
    assert proc.returncode == 0 and json.loads(proc.stdout)["model"]["precision"] == "fp32"
    proc = infer("Haswell", "-m", full / "model.int8.onnx", "--force-int8")
    assert proc.returncode == 0 and "warning: model" in proc.stderr and "--force-int8" in proc.stderr

    portable = folders["portable"] / "model.int8.onnx"
    native = run_command(INFER + ["-m", portable, image, "-f", "json", "-q"])
    proc = infer("Haswell", "-m", portable)
    assert proc.returncode == 0, error_lines(proc)
    got, want = json.loads(proc.stdout)["predictions"][0], json.loads(native.stdout)["predictions"][0]
    assert got["prediction"] == want["prediction"]
    assert max(abs(got["probabilities"][c] - want["probabilities"][c]) for c in want["probabilities"]) < 1e-5

    proc = infer("Nehalem", "-m", portable)
    assert proc.returncode == 2 and "unclassified" in proc.stderr
    proc = infer("Nehalem", "-m", folders["portable"])
    assert proc.returncode == 0 and json.loads(proc.stdout)["model"]["precision"] == "fp32"


def test_serve_refuses_an_uncovered_int8_file_under_emulated_haswell(int8_pair, qemu):
    proc = emulated("Haswell", SERVE + ["-m", int8_pair[0]["full_range"] / "model.int8.onnx", "--port", "0"])
    assert proc.returncode == 2 and "--force-int8" in proc.stderr and "Traceback" not in proc.stderr


def test_gate_part_rejects_a_model_that_does_not_fit_what_it_claims(int8_pair, synthetic_raw, tiny_onnx, qemu):
    """verify_portability, as the export gate calls it: a portable claim with 8-bit matrix weights fails on the
    static check; the portable model passes, verified here and (on a non-AVX2 host) under emulated AVX2."""
    from xray.export.portability import verify_portability

    folders, _, fp32_path, _ = int8_pair
    spec = tiny_onnx[2]
    paths = [str(p) for p in sorted(synthetic_raw.rglob("*.png"))[2::9][:8]]
    x = np.stack([preprocess(load_image(p), spec) for p in paths]).astype(np.float32)
    host = detect_cpu()
    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    results = {}
    for name in ("portable", "full_range"):
        path = folders[name] / "model.int8.onnx"
        outputs = {"onnx_fp32": fp32, "onnx_int8_unfused": reference_session(path, 2).run(None, {"input": x}),
                   "onnx_int8": ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})}
        results[name] = verify_portability(path, outputs, 0.0, weight_check(onnx.load(str(path))), host, paths, spec,
                                           emulated_images=4, portable=True)
    good, bad = results["portable"], results["full_range"]
    assert good["ok"] and not good["problems"] and host.cls in good["verified"] and "avx2" in good["verified"]
    if host.cls != "avx2":
        assert good["emulated"]["avx2"]["run"] and good["emulated"]["avx2"]["images"] == 4
    assert not bad["ok"] and "do not fit every CPU class" in bad["problems"][0]
    assert bad["emulated"]["avx2"] == {"run": False, "why": "not covered"}


def test_eval_refuses_an_int8_model_this_cpu_is_not_covered_for(int8_pair, monkeypatch):
    import xray.common.cpu as cpu
    from xray.evaluate.backends import load_model

    monkeypatch.setattr(cpu, "_DETECTED", Cpu("avx2", "test"))
    with pytest.raises(XrayError, match="not covered on this CPU.*evaluate it on a CPU it covers"):
        load_model(int8_pair[0]["full_range"] / "model.int8.onnx")
    assert load_model(int8_pair[0]["portable"] / "model.int8.onnx").kind == "onnx"
