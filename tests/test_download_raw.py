"""Ingestion: class normalisation, source splits merged, corrupt files reported, duplicates once,
idempotent re-runs, zip and folder sources, kagglehub monkeypatched, clear offline error."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import SCRIPTS, run_script

from xray.common.artifacts import read_csv


@pytest.fixture
def messy_source(tmp_path, synthetic_raw):
    """A Kermany/Kaggle-like tree: mixed-case and alias class folders, source splits, sub-types,
    a duplicate across splits, a duplicate under another class, corrupt and non-image files."""
    src = tmp_path / "src" / "chest_xray"
    n = sorted((synthetic_raw / "NORMAL").iterdir())
    p = sorted((synthetic_raw / "PNEUMONIA").iterdir())
    t = sorted((synthetic_raw / "TUBERCULOSIS").iterdir())
    layout = {
        "train/Normal": n[:6], "test/normal": n[6:9] + [n[0]],  # n[0] duplicated across source splits
        "train/PNEUMONIA/bacteria": p[:4], "train/PNEUMONIA/virus": p[4:8], "val/PNEUMONIA": p[8:10],
        "train/tb": t[:5], "test/Tuberculosis": t[5:8] + [n[1]],  # n[1] also under TB: label conflict
    }
    for folder, files in layout.items():
        (src / folder).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, src / folder / f.name)
    (src / "train/tb/notes.txt").write_text("not an image")
    (src / "train/tb/fake.png").write_text("text pretending to be a png")
    (src / "train/Normal/truncated.jpeg").write_bytes(n[0].read_bytes()[:600] if n[0].suffix == ".jpeg"
                                                      else next(f for f in n if f.suffix == ".jpeg").read_bytes()[:600])
    (src / "train/Normal/empty.png").write_bytes(b"")
    (src / "README.md").write_text("dataset readme")
    (src / "__MACOSX").mkdir()
    (src / "__MACOSX" / "._x.png").write_bytes(b"junk")
    return src.parent


def _report(out):
    return json.loads((out / "ingest_report.json").read_text())


def test_folder_ingest_normalises_merges_and_reports(tmp_path, messy_source):
    out = tmp_path / "raw"
    proc = run_script("download_raw", "--from-dir", messy_source, "--out", out)
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    counts = {d.name: len(list(d.iterdir())) for d in out.iterdir() if d.is_dir()}
    # NORMAL: 9 unique, minus n[1] which conflicts with TB; PNEUMONIA: 10; TB: 8 (n[1] left out)
    assert counts == {"NORMAL": 8, "PNEUMONIA": 10, "TUBERCULOSIS": 8}
    rep = _report(out)
    corrupt = {c["file"].split("/")[-1] for c in rep["corrupt"]}
    assert corrupt == {"truncated.jpeg", "empty.png", "fake.png"}
    assert [x.split("/")[-1] for x in rep["not_images"]] == ["notes.txt"]
    assert rep["unlabelled"] == ["chest_xray/README.md"]
    assert len(rep["duplicates"]) == 2 and len(rep["label_conflicts"]) == 1
    assert rep["label_conflicts"][0]["classes"] == ["NORMAL", "TUBERCULOSIS"]
    assert "corrupt images left out" in proc.stdout
    rows = read_csv(out / "sources.csv")
    assert len(rows) == 26 and all(r["source"] == "dir:src" for r in rows)


def test_rerun_is_idempotent_and_does_not_recopy(tmp_path, messy_source):
    out = tmp_path / "raw"
    run_script("download_raw", "--from-dir", messy_source, "--out", out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.*") if p.parent != out}
    run_script("download_raw", "--from-dir", messy_source, "--out", out)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.*") if p.parent != out}
    assert before == after
    rep = _report(out)
    assert sum(c["new"] for c in rep["classes"].values()) == 0
    assert sum(c["already_present"] for c in rep["classes"].values()) == 26


def test_zip_source_and_class_restriction(tmp_path, messy_source):
    archive = tmp_path / "ChestXRay2017.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in messy_source.rglob("*"):
            if p.is_file():
                zf.write(p, p.relative_to(messy_source).as_posix())
    out = tmp_path / "raw"
    run_script("download_raw", "--from-zip", archive, "--out", out, "--classes", "normal,pneumonia=PNEU")
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == ["NORMAL", "PNEU"]
    assert len(list((out / "PNEU").iterdir())) == 10
    rep = _report(out)
    assert rep["counts"]["excluded_class:TUBERCULOSIS"] == 11  # 8 images + n[1] + 2 non-images, all skipped
    assert len(list((out / "NORMAL").iterdir())) == 9  # no conflict once TB is excluded
    assert rep["source"] == "zip:ChestXRay2017.zip"


def test_kaggle_path_uses_kagglehub(tmp_path, messy_source, monkeypatch):
    import download_raw
    import kagglehub

    calls = []
    monkeypatch.setattr(kagglehub, "dataset_download", lambda slug: calls.append(slug) or str(messy_source))
    out = tmp_path / "raw"
    with pytest.raises(SystemExit) as e:
        download_raw.main(["--out", str(out)])
    assert e.value.code == 0
    assert calls == [download_raw.DEFAULT_SLUG]
    assert _report(out)["source"] == f"kaggle:{download_raw.DEFAULT_SLUG}"


def test_kaggle_offline_fails_with_one_clear_line(tmp_path):
    """A subprocess whose kagglehub raises like it does offline (no network is touched)."""
    code = (
        "import sys, kagglehub, requests\n"
        "def fail(slug): raise requests.exceptions.ConnectionError('Failed to resolve api.kaggle.com')\n"
        "kagglehub.dataset_download = fail\n"
        f"sys.path.insert(0, {str(SCRIPTS)!r})\n"
        "import download_raw\n"
        f"download_raw.main(['--out', {str(tmp_path / 'raw')!r}, '--slug', 'someone/some-set'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "someone/some-set" in lines[0]
    assert "--from-zip" in lines[0] and "--from-dir" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["--from-dir", "/nonexistent/xyz"], "no such folder"),
    (["--from-zip", "/nonexistent/x.zip"], "no such file"),
    (["--from-dir", "/tmp", "--from-zip", "/tmp/x.zip"], "either"),
    (["--classes", ",,", "--from-dir", "/tmp"], "names no class"),
])
def test_bad_input(tmp_path, args, message):
    proc = run_script("download_raw", "--out", tmp_path / "raw", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_not_a_zip_and_empty_source(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_text("nope")
    proc = run_script("download_raw", "--from-zip", bad, "--out", tmp_path / "raw", check=False)
    assert proc.returncode == 2 and "not a readable zip" in proc.stderr
    (tmp_path / "empty" / "NORMAL").mkdir(parents=True)
    proc = run_script("download_raw", "--from-dir", tmp_path / "empty", "--out", tmp_path / "raw", check=False)
    assert proc.returncode == 2 and "no usable images" in proc.stderr
