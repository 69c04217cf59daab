"""Split evidence: the leakage guard checked against patients derived independently from the file names
(not the manifest's own group column), with Kermany's IM-0115-0001 naming; a failed re-split keeps the old split."""
from __future__ import annotations

import shutil
from collections import defaultdict

from conftest import run_script

from xray.common.artifacts import read_csv


def patient_of(name: str) -> str:
    """The oracle, written without the script's regex: person1946_bacteria_4875 -> person1946,
    IM-0115-0001 -> IM-0115, NORMAL2-IM-0135-0001 -> NORMAL2-IM-0135, anything else -> its own stem."""
    stem = name.split(".")[0]
    if stem.startswith("person"):
        return stem.split("_")[0]
    parts = stem.split("-")
    if "IM" in parts and len(parts) >= 3 and parts[-1].isdigit():
        return "-".join(parts[:-1])
    return stem


def kermany_raw(src, dst):
    """A copy of the synthetic set whose NORMAL images carry Kermany's IM-<patient>-<image> names
    (every third patient in the NORMAL2- series); the other classes keep person<N>_... names."""
    for cls_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls_dir.name).mkdir(parents=True)
        for f in sorted(cls_dir.iterdir()):
            name = f.name
            if cls_dir.name == "NORMAL":
                person, _, image = f.stem.split("_")
                number = int(person.removeprefix("person"))
                prefix = "NORMAL2-" if number % 3 == 0 else ""
                name = f"{prefix}IM-{number:04d}-{int(image):04d}{f.suffix}"
            shutil.copy(f, dst / cls_dir.name / name)
    return dst


def test_no_patient_crosses_splits_by_an_independent_reading_of_the_names(tmp_path, synthetic_raw):
    raw = kermany_raw(synthetic_raw, tmp_path / "raw")
    run_script("split_dataset", "--raw", raw, "--out", tmp_path / "data")
    rows = read_csv(tmp_path / "data" / "manifest.csv")
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[patient_of(r["path"].split("/")[-1])].add(r["split"])
    im_patients = [p for p in splits_of if "IM-" in p]
    images_of = defaultdict(int)
    for r in rows:
        images_of[patient_of(r["path"].split("/")[-1])] += 1
    assert sum(images_of[p] >= 2 for p in im_patients) >= 4, "the test needs IM- patients with several images"
    assert any(p.startswith("NORMAL2-") for p in im_patients)
    leaked = {p: s for p, s in splits_of.items() if len(s) > 1}
    assert not leaked, f"patients in more than one split: {leaked}"
    # and the manifest names the same patients
    assert all(r["group"] == patient_of(r["path"].split("/")[-1]) for r in rows), \
        [(r["path"], r["group"]) for r in rows if r["group"] != patient_of(r["path"].split("/")[-1])][:5]


def test_oracle_reads_the_readme_examples():
    assert patient_of("person1946_bacteria_4875.jpeg") == "person1946"
    assert patient_of("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_of("NORMAL2-IM-0135-0001.jpeg") == "NORMAL2-IM-0135"
    assert patient_of("scan.png") == "scan"


def snapshot(out):
    """Every file below the split folders, with its bytes, and the manifest."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for s in ("train", "val", "test", "resized_48")
             for p in sorted((out / s).rglob("*")) if p.is_file()}
    return files, (out / "manifest.csv").read_bytes()


def test_a_failed_resplit_keeps_the_old_split(tmp_path, synthetic_raw):
    raw = tmp_path / "raw"
    shutil.copytree(synthetic_raw, raw)
    out = tmp_path / "data"
    run_script("split_dataset", "--raw", raw, "--out", out, "--prepare-size", 48)
    before = snapshot(out)
    victim = sorted((raw / "PNEUMONIA").glob("*.jpeg"))[-1]  # header intact, scan data cut: fails only on decode
    data = victim.read_bytes()
    broken = raw / "PNEUMONIA" / "person9999_bacteria_9999.jpeg"
    broken.write_bytes(data[: len(data) // 2])
    proc = run_script("split_dataset", "--raw", raw, "--out", out, "--prepare-size", 48, "--seed", 7, check=False)
    assert proc.returncode == 2 and "corrupt or truncated" in proc.stderr and broken.name in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before, "the failed re-split changed the old split"
    assert not (out / ".split-tmp").exists(), "the failed re-split left its half-built folder behind"
