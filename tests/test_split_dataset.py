"""Splits: stratified within one image of target, no patient or sha256 in two splits, seeded,
hard-linked, manifest complete, resized copies, re-runnable, clear errors."""
from __future__ import annotations

import shutil
from collections import Counter, defaultdict

import pytest
from conftest import run_script
from PIL import Image

from xray.common.artifacts import MANIFEST_COLUMNS, read_csv, sha256_file
from xray.common.imageio import load_image

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


@pytest.fixture(scope="module")
def split_out(tmp_path_factory, synthetic_raw):
    out = tmp_path_factory.mktemp("split")
    proc = run_script("split_dataset", "--raw", synthetic_raw, "--out", out, "--prepare-size", 48)
    return out, proc


def test_manifest_has_no_leakage_and_is_stratified(split_out, synthetic_raw):
    out, proc = split_out
    rows = read_csv(out / "manifest.csv")
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert len(rows) == 90
    splits_of = defaultdict(set)
    for r in rows:
        splits_of["g:" + r["group"]].add(r["split"])
        splits_of["s:" + r["sha256"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values()), "a patient or an image crosses splits"
    assert len({r["group"] for r in rows}) < len(rows)  # groups really hold several images
    counts = Counter((r["class"], r["split"]) for r in rows)
    per_class = Counter(r["class"] for r in rows)
    for (cls, split), n in counts.items():
        assert abs(n - FRACTIONS[split] * per_class[cls]) <= 1, (cls, split, n)
    assert "max deviation from the stratified target" in proc.stdout
    assert "NORMAL" in proc.stdout and "patients" in proc.stdout


def test_manifest_describes_the_files(split_out, synthetic_raw):
    out, _ = split_out
    rows = read_csv(out / "manifest.csv")
    for r in rows[:12]:
        f = out / r["path"]
        assert f.is_file() and f.parts[-3] == r["split"] and f.parts[-2] == r["class"]
        assert sha256_file(f) == r["sha256"]
        with Image.open(f) as im:
            assert (int(r["width"]), int(r["height"])) == im.size
        assert r["source"] == "synthetic"
        assert f.stat().st_ino == (synthetic_raw / r["class"] / f.name).stat().st_ino  # hard link, no copy
    files = sorted(p.relative_to(out).as_posix() for s in FRACTIONS for p in (out / s).rglob("*") if p.is_file())
    assert files == sorted(r["path"] for r in rows)


def test_prepared_copies(split_out):
    out, _ = split_out
    rows = read_csv(out / "manifest.csv")
    for r in rows[:10]:
        p = (out / "resized_48" / r["path"]).with_suffix(".png")
        with Image.open(p) as im:
            assert im.mode == "L" and min(im.size) == 48


def test_seeded(tmp_path, synthetic_raw, split_out):
    out, _ = split_out
    run_script("split_dataset", "--raw", synthetic_raw, "--out", tmp_path / "a")
    run_script("split_dataset", "--raw", synthetic_raw, "--out", tmp_path / "b", "--seed", 7)
    ref = {r["path"] for r in read_csv(out / "manifest.csv")}
    assert {r["path"] for r in read_csv(tmp_path / "a" / "manifest.csv")} == ref
    assert {r["path"] for r in read_csv(tmp_path / "b" / "manifest.csv")} != ref


def test_group_regex_and_duplicates_keep_patients_together(tmp_path, synthetic_raw):
    raw = tmp_path / "raw"
    for cls in ("NORMAL", "PNEUMONIA", "TUBERCULOSIS"):
        (raw / cls).mkdir(parents=True)
        for i, f in enumerate(sorted((synthetic_raw / cls).iterdir())):
            shutil.copy(f, raw / cls / f"scan{i}-pt{i // 4:02d}{f.suffix}")  # 4 images per patient
    dup_src = sorted((raw / "NORMAL").iterdir())[0]
    shutil.copy(dup_src, raw / "NORMAL" / f"scan99-pt77{dup_src.suffix}")  # same bytes, "another" patient
    run_script("split_dataset", "--raw", raw, "--out", tmp_path, "--group-regex", r"-(pt\d+)\.", "--copy")
    rows = read_csv(tmp_path / "manifest.csv")
    by_name = {r["path"].split("/")[-1]: r for r in rows}
    assert by_name[dup_src.name]["group"] == by_name[f"scan99-pt77{dup_src.suffix}"]["group"]
    split_of_group = defaultdict(set)
    for r in rows:
        split_of_group[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in split_of_group.values())
    assert {r["group"] for r in rows} >= {"pt00", "pt01"}
    assert (tmp_path / rows[0]["path"]).stat().st_nlink == 1  # --copy


def test_rerun_rebuilds_from_raw(tmp_path, synthetic_raw):
    raw = tmp_path / "raw"
    shutil.copytree(synthetic_raw, raw)
    out = tmp_path / "data"
    run_script("split_dataset", "--raw", raw, "--out", out)
    victim = sorted((raw / "PNEUMONIA").iterdir())[0]
    victim.unlink()
    run_script("split_dataset", "--raw", raw, "--out", out)
    rows = read_csv(out / "manifest.csv")
    assert len(rows) == 89 and not any(r["path"].endswith(victim.name) for r in rows)
    assert not list(out.rglob(victim.name)) and not (out / ".split-tmp").exists()


def test_errors(tmp_path, synthetic_raw):
    def fails(*args, message):
        proc = run_script("split_dataset", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

    fails("--raw", tmp_path / "missing", "--out", tmp_path / "o", message="no such folder")
    fails("--raw", synthetic_raw, "--out", tmp_path / "o", "--val", 0.5, "--test", 0.5, message="sum < 1")
    fails("--raw", synthetic_raw, "--out", tmp_path / "o", "--group-regex", "(", message="--group-regex")
    tiny = tmp_path / "tiny"
    for cls, n in (("NORMAL", 12), ("PNEUMONIA", 2)):
        (tiny / cls).mkdir(parents=True)
        for f in sorted((synthetic_raw / cls).iterdir())[:n]:
            shutil.copy(f, tiny / cls / f.name)
    fails("--raw", tiny, "--out", tmp_path / "o", message="class PNEUMONIA has no images in")
    (tiny / "EMPTY").mkdir()
    fails("--raw", tiny, "--out", tmp_path / "o", message="has no images")


def test_near_duplicates_are_kept_together(tmp_path, synthetic_raw):
    raw = tmp_path / "raw"
    shutil.copytree(synthetic_raw, raw)
    src = sorted((raw / "TUBERCULOSIS").glob("*.png"))[0]
    im = load_image(src)  # a re-encoded, resized copy filed as another patient
    im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(raw / "TUBERCULOSIS" / "person9999_tb_9999.jpeg", quality=85)
    proc = run_script("split_dataset", "--raw", raw, "--out", tmp_path / "o", "--near-dup-bits", 4)
    assert "near-duplicate pairs kept together" in proc.stdout
    rows = {r["path"].split("/")[-1]: r for r in read_csv(tmp_path / "o" / "manifest.csv")}
    assert rows["person9999_tb_9999.jpeg"]["group"] == rows[src.name]["group"]
    assert rows["person9999_tb_9999.jpeg"]["split"] == rows[src.name]["split"]
