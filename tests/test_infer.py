"""xray-infer through its real CLI: parity with PyTorch, formats, --eval, model resolution, bad input."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import INFER, ROOT, run_command, xray_infer
from make_synthetic import Anatomy, render
from PIL import Image

from xray.common.image_spec import ImageSpec
from xray.infer.inputs import collect_inputs, folder_label
from xray.infer.model import resolve_model_path
from xray.infer.predict import prepare

MODES = ("jpeg", "png8", "png16", "rgb", "rgba", "palette", "cmyk", "exif", "tiff16")


def radiograph(height=1200, seed=0) -> np.ndarray:
    """A chest-like float image in [0, 1] at a real radiograph size."""
    rng = np.random.default_rng(seed)
    anat = Anatomy.sample(rng, height)
    return render(("clear", "lower_patchy", "upper_nodules")[seed % 3], anat, rng)


def save_mode(a: np.ndarray, mode: str, path: Path) -> Path:
    """Write `a` in one of the file flavours radiographs arrive in."""
    g8 = np.rint(a * 255).astype(np.uint8)
    gray = Image.fromarray(g8, "L")
    if mode == "jpeg":
        gray.save(path.with_suffix(".jpeg"), quality=90)
        return path.with_suffix(".jpeg")
    if mode == "png8":
        gray.save(path.with_suffix(".png"))
    elif mode == "png16":
        Image.fromarray(np.rint(a * 40000 + 1000).astype(np.uint16)).save(path.with_suffix(".png"))
    elif mode == "rgb":
        Image.merge("RGB", (gray, gray, gray)).save(path.with_suffix(".png"))
    elif mode == "rgba":
        Image.merge("RGBA", (gray, gray, gray, Image.new("L", gray.size, 255))).save(path.with_suffix(".png"))
    elif mode == "palette":
        gray.convert("P").save(path.with_suffix(".png"))
    elif mode == "cmyk":
        Image.merge("RGB", (gray, gray, gray)).convert("CMYK").save(path.with_suffix(".jpeg"), quality=92)
        return path.with_suffix(".jpeg")
    elif mode == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # stored rotated: viewers (and we) turn it upright
        gray.transpose(Image.Transpose.ROTATE_90).save(path.with_suffix(".jpeg"), quality=90, exif=exif)
        return path.with_suffix(".jpeg")
    elif mode == "tiff16":
        Image.fromarray(np.rint(a * 60000).astype(np.uint16)).save(path.with_suffix(".tiff"))
        return path.with_suffix(".tiff")
    return path.with_suffix(".png")


@pytest.fixture(scope="module")
def mode_files(tmp_path_factory):
    """One real-sized generated radiograph per file flavour (different images, so predictions differ)."""
    root = tmp_path_factory.mktemp("modes")
    return {m: save_mode(radiograph(1000 + 37 * i, seed=i), m, root / f"cxr_{m}") for i, m in enumerate(MODES)}


@pytest.fixture(scope="module")
def dicom_file():
    import pydicom  # noqa: F401  (the [dicom] extra, a dev dependency: missing is a failure, not a skip)
    from test_common_imageio import _find_rg1

    path = _find_rg1()
    assert path is not None, "RG1_UNCR.dcm (pydicom-data, a dev dependency) is not installed"
    return path


def torch_probs(model, spec, paths) -> np.ndarray:
    """PyTorch softmax through the training eval transform (XrayDataset without augmentation)."""
    from xray.train.data import XrayDataset

    ds = XrayDataset([(str(p), 0) for p in paths], spec)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        return torch.softmax(model.eval()(x).double(), dim=1).numpy()


def predictions(proc) -> dict:
    return {r["file"]: r for r in json.loads(proc.stdout)["predictions"]}


# --------------------------------------------------------------------------------------------- parity


def test_probabilities_equal_pytorch_softmax(tiny_onnx, mode_files, dicom_file):
    path, model, spec, classes = tiny_onnx
    files = [*map(str, mode_files.values()), str(dicom_file)]
    proc = xray_infer("--model", path, *files, "--format", "json", "--batch-size", 4)
    got = predictions(proc)
    assert list(got) == files, "one prediction per file, in input order"
    ref = torch_probs(model, spec, files)
    ours = np.array([[got[f]["probabilities"][c] for c in classes] for f in files])
    assert np.abs(ours - ref).max() <= 1e-4
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-9)
    assert ours.max(axis=1).min() < 0.99 and ours.std(axis=0).max() > 0.01, "a degenerate model proves nothing"
    for f, row in zip(files, ref):
        assert got[f]["prediction"] == classes[int(np.argmax(row))]


@pytest.mark.parametrize("spec", [ImageSpec(64, 64, "squash", "bicubic", 3, (0.5,) * 3, (0.5,) * 3),
                                  ImageSpec(96, 110, "shorter_side", "bilinear", 1, (0.5,), (0.25,))],
                         ids=["squash-bicubic-3ch", "shorter-bilinear-1ch"])
def test_preprocessing_equals_training_eval_transform(spec, mode_files):
    """Array level, every flavour: xray-infer's decode+preprocess == the trainer's eval transform ==
    torchvision's Resize/CenterCrop/ToTensor/Normalize on the decoded image (tolerance 1e-5)."""
    from torchvision import transforms

    from xray.common.imageio import load_image
    from xray.train.data import XrayDataset

    interp = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}
    size = (spec.resize_size,) * 2 if spec.resize_mode == "squash" else spec.resize_size
    tv = transforms.Compose([transforms.Resize(size, interpolation=interp[spec.interpolation]),
                             transforms.CenterCrop(spec.input_size),
                             transforms.Grayscale(num_output_channels=spec.channels), transforms.ToTensor(),
                             transforms.Normalize(spec.mean, spec.std)])
    for mode, path in mode_files.items():
        ours = prepare(str(path), spec)
        assert ours.shape == (spec.channels, spec.input_size, spec.input_size), mode
        train = XrayDataset([(str(path), 0)], spec)[0][0].numpy()
        ref = tv(load_image(path, draft_size=spec.resize_size)).numpy()
        assert np.abs(ours - train).max() <= 1e-5, mode
        assert np.abs(ours - ref).max() <= 1e-5, mode


def test_file_flavours_decode_to_the_same_picture(mode_files, tmp_path):
    """The same radiograph saved as every flavour gives (nearly) the same model input."""
    a = radiograph(900, seed=5)
    spec = ImageSpec(64, 64, "squash", "bilinear", 1, (0.5,), (0.25,))
    ref = prepare(str(save_mode(a, "png8", tmp_path / "ref")), spec)
    for mode in MODES:
        x = prepare(str(save_mode(a, mode, tmp_path / f"same_{mode}")), spec)
        assert np.abs(x - ref).mean() < 0.05, mode  # jpeg / 16-bit stretch differ by a few gray levels


# --------------------------------------------------------------------------------------------- formats


def test_formats_agree(tiny_onnx, mode_files, tmp_path):
    path, _, _, classes = tiny_onnx
    files = [str(mode_files[m]) for m in ("jpeg", "png8", "png16")]
    js = predictions(xray_infer("-m", path, *files, "-f", "json"))
    lines = [json.loads(line) for line in xray_infer("-m", path, *files, "-f", "jsonl").stdout.splitlines()]
    rows = list(csv.DictReader(io.StringIO(xray_infer("-m", path, *files, "-f", "csv").stdout)))
    table = xray_infer("-m", path, *files).stdout.splitlines()
    assert [r["file"] for r in lines] == [r["file"] for r in rows] == files
    assert table[0].split()[:3] == ["file", "prediction", "prob"] and table[0].split()[3:] == classes
    for f, line, row, text in zip(files, lines, rows, table[1:]):
        assert line == js[f]
        assert row["prediction"] == line["prediction"] and row["error"] == ""
        assert abs(float(row["probability"]) - line["probability"]) < 1e-6
        for c in classes:
            assert abs(float(row[f"p_{c}"]) - line["probabilities"][c]) < 1e-6
        cells = text.split()
        assert cells[0] == f and cells[1] == line["prediction"]
        assert [float(v) for v in cells[3:]] == pytest.approx([line["probabilities"][c] for c in classes], abs=1e-4)


def test_top_k_and_output_file(tiny_onnx, mode_files, tmp_path):
    path, _, _, classes = tiny_onnx
    f = str(mode_files["jpeg"])
    out = tmp_path / "preds.json"
    proc = xray_infer("-m", path, f, "-f", "json", "--top-k", 2, "-o", out)
    assert proc.stdout == "" and out.is_file()
    rec = json.loads(out.read_text())["predictions"][0]
    top = rec["top_k"]
    assert len(top) == 2 and top[0]["class"] == rec["prediction"] and top[0]["probability"] >= top[1]["probability"]
    assert sorted(rec["probabilities"].values(), reverse=True)[:2] == [t["probability"] for t in top]
    rows = list(csv.reader(io.StringIO(xray_infer("-m", path, f, "-f", "csv", "--top-k", 5).stdout)))
    assert rows[0] == ["file", "prediction", "probability", "top1_class", "top1_probability", "top2_class",
                       "top2_probability", "top3_class", "top3_probability", "error"]  # k capped at 3 classes
    table = xray_infer("-m", path, f, "--top-k", 1).stdout.splitlines()
    assert table[0].split() == ["file", "prediction", "prob", "top-1"] and rec["prediction"] in table[1]


def test_output_file_not_written_when_nothing_could_run(tiny_onnx, tmp_path):
    out = tmp_path / "preds.csv"
    proc = xray_infer("-m", tmp_path / "missing.onnx", "x.png", "-o", out, check=False)
    assert proc.returncode == 2 and not out.exists()


def test_table_prints_nothing_when_no_input_was_classified(tiny_onnx, mode_files, tmp_path):
    path, _, _, _ = tiny_onnx
    proc = xray_infer("-m", path, tmp_path / "missing.png", check=False)
    assert proc.returncode == 1 and proc.stdout == "" and "missing.png: no such file" in proc.stderr
    both = xray_infer("-m", path, tmp_path / "missing.png", mode_files["png8"], check=False).stdout.splitlines()
    assert len(both) == 2 and both[0].split()[:2] == ["file", "prediction"]  # the header comes with the first row


# --------------------------------------------------------------------------------------------- inputs


def make_class_tree(root: Path, per_class=2) -> list[Path]:
    files = []
    for k, c in enumerate(["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]):
        for i in range(per_class):
            sub = root / c / ("nested" if i else "")
            sub.mkdir(parents=True, exist_ok=True)
            p = sub / f"img{i}.png"
            Image.fromarray(np.rint(radiograph(120, seed=10 * k + i) * 255).astype(np.uint8)).save(p)
            files.append(p)
    (root / "NORMAL" / "notes.txt").write_text("not an image, skipped when walking a folder")
    (root / "NORMAL" / ".hidden.png").write_text("hidden files are skipped")
    return files


def test_folders_globs_stdin_and_duplicates(tiny_onnx, tmp_path):
    path = tiny_onnx[0]
    files = make_class_tree(tmp_path / "test")
    proc = xray_infer("-m", path, tmp_path / "test", "-f", "jsonl")
    got = [json.loads(line)["file"] for line in proc.stdout.splitlines()]
    assert sorted(got) == sorted(map(str, files)) and len(got) == 6  # recursive, .txt and hidden skipped
    proc = xray_infer("-m", path, str(tmp_path / "test" / "*" / "img0.png"), "-f", "jsonl")
    assert len(proc.stdout.splitlines()) == 3
    listing = "\n".join(map(str, files[:2])) + "\n\n"
    proc = xray_infer("-m", path, "-", files[0], "-f", "jsonl", stdin=listing)  # files[0] twice: once
    assert [json.loads(line)["file"] for line in proc.stdout.splitlines()] == [str(files[0]), str(files[1])]


def test_collect_inputs_and_labels(tmp_path):
    classes = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    make_class_tree(tmp_path / "data" / "test")
    items, errors = collect_inputs([str(tmp_path / "data" / "test"), str(tmp_path / "nope")])
    assert errors == [(str(tmp_path / "nope"), f"{tmp_path / 'nope'}: no such file or directory")]
    assert len(items) == 6 and {folder_label(i, classes) for i in items} == set(classes)
    nested = [i for i in items if "nested" in i]
    assert [folder_label(p, classes) for p in nested] == [Path(p).parts[-3] for p in nested]
    one_class, _ = collect_inputs([str(tmp_path / "data" / "test" / "TUBERCULOSIS")])
    assert {folder_label(i, classes) for i in one_class} == {"TUBERCULOSIS"}
    assert folder_label("/srv/train/x.png", classes) is None
    assert folder_label("/srv/Normal/uploads/x.png", classes) == "NORMAL"
    assert folder_label("data/PNEUMONIA/virus/x.png", classes) == "PNEUMONIA"  # an alias folder below a class
    assert folder_label("data/tb/x.png", classes) == "TUBERCULOSIS"
    assert folder_label("data/NORMAL/x.png", ["COVID", "OTHER"]) is None


def test_eval_on_class_folders(tiny_onnx, tmp_path):
    path, _, _, classes = tiny_onnx
    make_class_tree(tmp_path / "test", per_class=3)
    proc = xray_infer("-m", path, tmp_path / "test", "--eval", "-f", "json")
    doc = json.loads(proc.stdout)
    preds = doc["predictions"]
    true = [classes.index(Path(r["file"]).relative_to(tmp_path / "test").parts[0]) for r in preds]
    pred = [classes.index(r["prediction"]) for r in preds]
    m = doc["metrics"]
    assert m["num_samples"] == 9
    assert m["accuracy"] == pytest.approx(np.mean(np.array(true) == np.array(pred)))
    cm = np.zeros((3, 3), int)
    for t, p in zip(true, pred):
        cm[t, p] += 1
    assert m["confusion_matrix"] == cm.tolist()
    table = xray_infer("-m", path, tmp_path / "test", "--eval").stdout
    assert "Macro F1" in table and "Confusion matrix" in table
    csv_run = xray_infer("-m", path, tmp_path / "test", "--eval", "-f", "csv")
    assert "Macro F1" in csv_run.stderr and "Macro F1" not in csv_run.stdout  # stdout stays CSV
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(next((tmp_path / "test" / "NORMAL").glob("*.png")), loose / "a.png")
    proc = xray_infer("-m", path, loose, "--eval", check=False)
    assert proc.returncode == 2 and "class folder" in proc.stderr


# --------------------------------------------------------------------------------------------- bad input


def png_bomb(path: Path, w=30000, h=30000):
    from test_common_imageio import _png_1bit

    _png_1bit(path, w, h)
    return path


def test_bad_inputs_are_reported_and_the_rest_processed(tiny_onnx, mode_files, dicom_file, tmp_path):
    import pydicom

    path = tiny_onnx[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty").mkdir()
    (bad / "zero.png").write_bytes(b"")
    data = mode_files["jpeg"].read_bytes()
    (bad / "truncated.jpeg").write_bytes(data[: len(data) // 3])
    (bad / "text.png").write_text("hello, not a PNG\n" * 20)
    png_bomb(bad / "bomb.png")
    ds = pydicom.dcmread(dicom_file)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless: no decoder installed
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    ds.save_as(bad / "j2k.dcm", enforce_file_format=True)
    good = str(mode_files["png8"])
    args = [good, bad / "missing.png", bad / "empty", bad / "zero.png", bad / "truncated.jpeg", bad / "text.png",
            bad / "bomb.png", bad / "j2k.dcm", str(bad / "nothing*.png")]
    t0 = time.perf_counter()
    proc = xray_infer("-m", path, *args, "-f", "json", check=False)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("note: ")]  # the old model's
    assert len(lines) == len(args) - 1 and all(line.startswith("error: ") for line in lines), proc.stderr
    for needle in ("missing.png: no such file", "empty: folder has no supported images", "zero.png: empty file",
                   "truncated.jpeg: corrupt or truncated", "text.png: not a recognised image",
                   "bomb.png: image too large", "j2k.dcm: cannot decode DICOM pixel data", "nothing*.png: no files match"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    doc = json.loads(proc.stdout)
    assert [r["file"] for r in doc["predictions"]] == [good]
    assert len(doc["errors"]) == len(args) - 1 and all(e["error"] for e in doc["errors"])
    assert elapsed < 30, "the 30000 x 30000 PNG must be refused from its header, not decoded"


def test_max_pixels_refuses_larger_images_and_the_default_lets_them_through(tiny_onnx, tmp_path):
    """--max-pixels from the CLI: an image over the limit is one error line naming its size and the limit
    (exit 1) while a smaller one in the same run is still predicted; the default limit takes both."""
    path = tiny_onnx[0]
    picture = Image.fromarray(np.rint(radiograph(1000, seed=1) * 255).astype(np.uint8), "L")
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    picture.resize((2500, 2000)).save(big)  # 5.0 MP
    picture.resize((1200, 1000)).save(small)  # 1.2 MP
    proc = xray_infer("-m", path, big, small, "-f", "json", "--max-pixels", 4_000_000, check=False)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("note: ")]  # the no-guard note
    assert errors == [f"error: {big}: image too large (2500x2000 = 5 MP > 4 MP limit)"], proc.stderr
    doc = json.loads(proc.stdout)
    assert [r["file"] for r in doc["predictions"]] == [str(small)]
    assert [e["file"] for e in doc["errors"]] == [str(big)]
    default = predictions(xray_infer("-m", path, big, small, "-f", "json"))  # 50 MP default: exit 0
    assert list(default) == [str(big), str(small)]
    assert all(r["prediction"] in tiny_onnx[3] for r in default.values())


def test_unreadable_file_is_one_error(tiny_onnx, mode_files, monkeypatch, capsys):
    """Permission denied (tests run as root, so simulated): one line, exit 1, the other file still done."""
    from xray.infer.cli import main

    locked = str(mode_files["jpeg"])
    real = Path.read_bytes

    def read_bytes(self):
        if str(self) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(SystemExit) as e:
        main(["-m", str(tiny_onnx[0]), locked, str(mode_files["png8"]), "-f", "jsonl"])
    out, err = capsys.readouterr()
    assert e.value.code == 1
    errors = [line for line in err.splitlines() if not line.startswith("note: ")]  # the old model's guard note
    assert errors == [f"error: {locked}: permission denied"]
    assert [json.loads(line)["file"] for line in out.splitlines()] == [locked, str(mode_files["png8"])]
    assert "error" in json.loads(out.splitlines()[0])


def onnx_without_metadata(src: Path, dst: Path) -> Path:
    proto = onnx.load(str(src))
    del proto.metadata_props[:]
    onnx.save(proto, str(dst))
    return dst


def onnx_with_spec(src: Path, dst: Path, spec: ImageSpec) -> Path:
    proto = onnx.load(str(src))
    for p in proto.metadata_props:
        if p.key == "xray.image_spec":
            p.value = spec.to_json()
    onnx.save(proto, str(dst))
    return dst


def test_bad_models_exit_2_with_one_line(tiny_onnx, mode_files, tmp_path):
    path, _, spec, _ = tiny_onnx
    img = str(mode_files["png8"])
    (tmp_path / "text.onnx").write_text("not a protobuf")
    cases = {
        tmp_path / "missing.onnx": "model file not found",
        tmp_path / "text.onnx": "not a usable ONNX model",
        tmp_path: "no model.int8.onnx or model.onnx in this folder",  # a folder is read as an export folder
        onnx_without_metadata(path, tmp_path / "bare.onnx"): "not an xray-edge model",
        onnx_with_spec(path, tmp_path / "shape.onnx", spec.with_size(96)): "disagrees with its metadata",
    }
    for model, message in cases.items():
        proc = xray_infer("-m", model, img, check=False)
        assert proc.returncode == 2, (model, proc.returncode, proc.stderr)
        assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout == ""
    proc = xray_infer("-m", path, check=False)
    assert proc.returncode == 2 and "no input" in proc.stderr


# --------------------------------------------------------------------------------------------- model resolution


def test_model_resolution_order(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.delenv("XRAY_MODEL", raising=False)
    assert resolve_model_path("given.onnx", tmp_path) == Path("given.onnx")
    monkeypatch.setenv("XRAY_MODEL", "/env/model.onnx")
    assert resolve_model_path(None, tmp_path) == Path("/env/model.onnx")
    monkeypatch.delenv("XRAY_MODEL")
    old, new = tmp_path / "runs" / "old" / "export", tmp_path / "runs" / "new" / "export"
    for d in (old, new):
        d.mkdir(parents=True)
    for f in (old / "model.int8.onnx", new / "model.onnx", new / "model.int8.rejected.onnx"):
        f.write_bytes(b"x")
    os.utime(old / "model.int8.onnx", (1_000_000, 1_000_000))
    assert resolve_model_path(None, tmp_path) == new / "model.onnx"  # newest export; rejected int8 never chosen
    (new / "model.int8.onnx").write_bytes(b"x")
    from xray.common.cpu import Cpu

    vnni, avx2 = Cpu("avx512_vnni", "test"), Cpu("avx2", "test")
    assert resolve_model_path(None, tmp_path, cpu=vnni) == new / "model.int8.onnx"  # int8 is faster there
    assert resolve_model_path(None, tmp_path, cpu=avx2) == new / "model.onnx"  # and not there
    assert resolve_model_path(None, tmp_path, precision="int8", cpu=avx2) == new / "model.int8.onnx"
    assert resolve_model_path(str(new), precision="fp32", cpu=vnni) == new / "model.onnx"  # a folder as --model
    from xray.common.errors import XrayError

    with pytest.raises(XrayError, match="no model"):
        resolve_model_path(None, tmp_path / "elsewhere")


def test_default_model_location_and_env_through_the_cli(tiny_onnx, mode_files, tmp_path):
    path = tiny_onnx[0]
    export = tmp_path / "runs" / "r1" / "export"
    export.mkdir(parents=True)
    shutil.copy(path, export / "model.int8.onnx")
    img = str(mode_files["png8"])
    env = {k: v for k, v in os.environ.items() if k != "XRAY_MODEL"}
    proc = subprocess.run([*INFER, img, "-f", "json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["path"] == str(Path("runs/r1/export/model.int8.onnx"))
    proc = subprocess.run([*INFER, img, "-f", "json"], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "XRAY_MODEL": str(path)})
    assert json.loads(proc.stdout)["model"]["path"] == str(path)
    proc = subprocess.run([*INFER, img], cwd=tmp_path / "runs", env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "no model" in proc.stderr and "XRAY_MODEL" in proc.stderr


# --------------------------------------------------------------------------------------------- purity


BLOCK = ("import sys, importlib.abc\n"
         "class Block(importlib.abc.MetaPathFinder):\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in {blocked!r}:\n"
         "            raise ImportError('blocked for this test: ' + name)\n"
         "sys.meta_path.insert(0, Block())\n"
         "from xray.infer.cli import main\n"
         "try:\n"
         "    main()\n"
         "finally:\n"
         "    assert 'torch' not in sys.modules, 'xray-infer imported torch'\n")


def infer_blocking(blocked: set, *args):
    code = BLOCK.format(blocked=blocked)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


def test_runs_with_torch_unimportable(tiny_onnx, mode_files):
    proc = infer_blocking({"torch", "torchvision", "timm", "accelerate", "onnx"}, "-m", tiny_onnx[0],
                          mode_files["jpeg"], mode_files["png16"], "-f", "jsonl")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2 and "Traceback" not in proc.stderr


def test_dicom_without_pydicom_names_the_extra(tiny_onnx, mode_files, dicom_file):
    proc = infer_blocking({"torch", "pydicom"}, "-m", tiny_onnx[0], dicom_file, mode_files["png8"])
    assert proc.returncode == 1, proc.stderr
    assert "xray-edge[dicom]" in proc.stderr and "Traceback" not in proc.stderr
    assert str(mode_files["png8"]) in proc.stdout


def test_help():
    proc = xray_infer("--help")
    for text in ("--model", "XRAY_MODEL", "--format", "--top-k", "--eval", "--threads", "--batch-size",
                 "Exit codes", "runs/*/export"):
        assert text in proc.stdout, text
    script = ROOT / ".venv" / "bin" / "xray-infer"
    if script.exists():
        assert run_command([script, "--help"]).stdout == proc.stdout


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_exported_int8_model_on_the_edge_matches_the_export_report(exported):
    """train -> xray-export -> xray-infer --eval: the edge figures are the export's verification figures."""
    out, _ = exported
    report = json.loads((out / "export_report.json").read_text())
    split = out / report["eval"]["split"]  # relative to the report
    for name, key in (("model.int8.onnx", "onnx_int8"), ("model.onnx", "onnx_fp32")):
        doc = json.loads(xray_infer("-m", out / name, split, "--eval", "-f", "json").stdout)
        assert doc["model"]["precision"] == ("int8" if "int8" in name else "fp32")
        m = doc["metrics"]
        assert m["num_samples"] == report["eval"]["images"]
        assert abs(m["accuracy"] - report["metrics"][key]["accuracy"]) <= 1 / m["num_samples"] + 1e-9, name
        # calibrated by default: NLL / ECE before and after T, as the export measured them on the same images
        c, t = m["calibration"], report["calibration"]["temperature"]
        assert c["temperature"] == pytest.approx(t) and t != 1.0 and c["ece_bins"] == 15
        want = report["calibration"]["eval"]["onnx_int8" if key == "onnx_int8" else "pytorch"]
        for when in ("before", "after"):
            assert c[when]["nll"] == pytest.approx(want[when]["nll"], abs=2e-3), (name, when)
            assert c[when]["ece"] == pytest.approx(want[when]["ece"], abs=1.5 / m["num_samples"]), (name, when)


def test_closed_pipe_is_not_a_traceback(tiny_onnx, mode_files, tmp_path):
    """`xray-infer folder | head -1`: the reader leaves early; xray-infer stops quietly (click handles EPIPE)."""
    many = tmp_path / "many"
    many.mkdir()
    small = many / "img000.png"
    Image.open(mode_files["png8"]).resize((64, 64)).save(small)
    for i in range(1, 600):  # ~150 kB of jsonl: more than a pipe buffers, so a write hits the closed pipe
        os.link(small, many / f"img{i:03d}.png")
    cmd = [*INFER, "-m", tiny_onnx[0], many, "-f", "jsonl"]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert json.loads(first)["file"] == str(small)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_int8_model_verified_with_another_onnxruntime_warns_once(tiny_onnx, mode_files, tmp_path):
    """int8 numerics are onnxruntime's kernels: a different major.minor than the export's gets one warning line."""
    import onnxruntime

    from xray.common.model_meta import ModelInfo
    from xray.export.onnx_export import set_metadata

    path, _, spec, classes = tiny_onnx
    f = str(mode_files["jpeg"])
    for precision, version, warned in (("int8", "0.1.0", True), ("int8", onnxruntime.__version__, False),
                                       ("fp32", "0.1.0", False)):
        model = tmp_path / f"{precision}-{version}.onnx"
        model.write_bytes(path.read_bytes())
        set_metadata(model, ModelInfo(classes, spec, "efficientnet_lite0", precision=precision,
                                      verification={"onnxruntime": version}).to_metadata())
        proc = xray_infer("-m", model, f, "-f", "json")
        assert json.loads(proc.stdout)["predictions"][0]["prediction"] in classes
        lines = [line for line in proc.stderr.splitlines() if "verified with onnxruntime" in line]
        assert len(lines) == (1 if warned else 0), proc.stderr
        if warned:
            assert lines[0].startswith("warning: ") and "0.1.0" in lines[0] and onnxruntime.__version__ in lines[0]


def test_model_choice_by_cpu_features(tmp_path):
    """Both outcomes of the per-CPU choice, from real /proc/cpuinfo texts (no numpy table), and the errors of
    --precision."""
    from xray.common.cpu import classify, cpu_flags, int8_dot_product
    from xray.common.errors import XrayError
    from xray.infer.model import choose_in_folder

    epyc_avx2 = classify({}, cpu_flags("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma "
                                       "bmi2\n"), "x86_64")
    zen4 = classify({}, cpu_flags("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512bw "
                                  "avx512_vnni avx512_bf16\n"), "x86_64")
    graviton = classify({}, cpu_flags("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics asimddp\n"),
                        "aarch64")
    assert int8_dot_product(epyc_avx2) == []
    assert int8_dot_product(zen4) == ["AVX-512 VNNI"]
    assert int8_dot_product(graviton) == ["Arm dot product"]
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("model.onnx", "model.int8.onnx"):
        (folder / name).write_bytes(b"x")
    fast = choose_in_folder(folder, cpu=zen4)
    assert fast.path.name == "model.int8.onnx" and "AVX-512 VNNI" in fast.reason
    slow = choose_in_folder(folder, cpu=epyc_avx2)
    assert slow.path.name == "model.onnx" and "no int8 dot-product" in slow.reason
    (folder / "model.int8.onnx").unlink()
    only = choose_in_folder(folder, cpu=zen4)
    assert only.path.name == "model.onnx" and only.reason is None  # nothing to choose between
    with pytest.raises(XrayError, match=r"no model.int8.onnx \(--precision int8\)"):
        choose_in_folder(folder, "int8")
    with pytest.raises(XrayError, match="no model.int8.onnx or model.onnx"):
        choose_in_folder(tmp_path, "auto")


def test_cli_says_which_model_it_chose(tiny_onnx, mode_files, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for name in ("model.onnx", "model.int8.onnx"):
        shutil.copy(tiny_onnx[0], export / name)
    proc = xray_infer("-m", export, mode_files["png8"], "-f", "json")
    from xray.common.cpu import int8_dot_product

    want = "model.int8.onnx" if int8_dot_product() else "model.onnx"
    assert json.loads(proc.stdout)["model"]["path"] == str(export / want)
    assert f"note: model {export / want} (" in proc.stderr
    proc = xray_infer("-m", export, mode_files["png8"], "-f", "json", "--precision", "fp32")
    assert json.loads(proc.stdout)["model"]["path"] == str(export / "model.onnx")
