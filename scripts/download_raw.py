#!/usr/bin/env python
"""Ingest a chest X-ray dataset into data/raw/<CLASS>/: from Kaggle (kagglehub), a zip, or a folder.

Class folders are normalised (normal/Normal -> NORMAL, tb -> TUBERCULOSIS, PNEUMONIA/bacteria ->
PNEUMONIA); the source's own train/val/test folders are merged (the split is ours). Every image is
decoded once to prove it is usable; corrupt and non-image files are listed in the report, never
dropped silently. Exact duplicates (sha256 of the bytes) are stored once; a duplicate that appears
under two different classes is left out entirely and reported as a label conflict. Re-running skips
what is already there (a small cache keyed by file identity avoids re-decoding).
"""
from __future__ import annotations

import json
import os
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import click

from xray.common.artifacts import (SOURCES_COLUMNS, SOURCES_FILE, read_csv, sha256_bytes, write_bytes_atomic,
                                   write_csv_atomic, write_json_atomic)
from xray.common.classes import class_from_parts, parse_class_option
from xray.common.errors import ImageError, XrayError, exit_on_user_error
from xray.common.imageio import is_dicom, is_supported, load_image

DEFAULT_SLUG = "muhammadrehan00/chest-xray-dataset"
CACHE_FILE = ".ingest_cache.json"
REPORT_FILE = "ingest_report.json"
JUNK_PARTS = {"__MACOSX", ".DS_Store", "Thumbs.db"}


@dataclass
class SourceFile:
    rel: PurePosixPath  # path inside the source
    identity: str  # changes when the file changes (for the cache)
    read: callable


def iter_dir(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in JUNK_PARTS and not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            yield SourceFile(PurePosixPath(p.relative_to(root).as_posix()),
                             f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}", p.read_bytes)


def iter_zip(path: Path):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise XrayError(f"{path}: not a readable zip archive ({e})") from None
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
        if info.is_dir():
            continue
        yield SourceFile(PurePosixPath(info.filename), f"{path.resolve()}|{info.filename}|{info.file_size}|{info.CRC}",
                         lambda info=info: zf.read(info))


def kaggle_download(slug: str) -> Path:
    """The dataset's local folder from kagglehub (downloaded or already cached by it)."""
    try:
        import kagglehub
    except ImportError:
        raise XrayError("kagglehub is not installed (pip install 'xray-edge[train]'); "
                        "or ingest a local copy with --from-zip FILE or --from-dir DIR") from None
    try:
        return Path(kagglehub.dataset_download(slug))
    except Exception as e:  # network, auth and 404 errors all end here
        raise XrayError(f"could not download Kaggle dataset {slug!r} ({type(e).__name__}); offline or no credentials? "
                        f"use --from-zip FILE or --from-dir DIR") from None


def is_junk(rel: PurePosixPath) -> bool:
    return any(p in JUNK_PARTS or p.startswith(".") for p in rel.parts)


def scan(files, mapping, cache, progress=None):
    """Classify and verify every source file. Returns (accepted {sha: (cls, rel, data-reader)}, report)."""
    report = defaultdict(list)
    counts = Counter()
    first_by_sha: dict[str, tuple[str, SourceFile]] = {}
    classes_by_sha: dict[str, set] = defaultdict(set)
    for sf in files:
        if progress:
            progress.update(1)
        if is_junk(sf.rel):
            counts["system_files_ignored"] += 1
            continue
        cls = class_from_parts(sf.rel.parts[:-1])
        if cls is None:
            report["unlabelled"].append(str(sf.rel))
            continue
        if mapping is not None:
            if cls not in mapping:
                counts[f"excluded_class:{cls}"] += 1
                continue
            cls = mapping[cls]
        entry = cache.get(sf.identity)
        if entry is None:
            data = sf.read()
            if not is_supported(sf.rel) and not is_dicom(sf.rel.name, data):
                entry = {"sha256": sha256_bytes(data), "status": "not_image", "reason": "not an image file"}
            else:
                entry = {"sha256": sha256_bytes(data), "status": "ok", "reason": ""}
                try:
                    load_image(data, name=sf.rel.name)
                except ImageError as e:
                    entry.update(status="corrupt", reason=str(e).split(": ", 1)[-1])
            cache[sf.identity] = entry
        if entry["status"] == "not_image":
            report["not_images"].append(str(sf.rel))
            continue
        if entry["status"] == "corrupt":
            report["corrupt"].append({"file": str(sf.rel), "reason": entry["reason"]})
            continue
        sha = entry["sha256"]
        classes_by_sha[sha].add(cls)
        if sha in first_by_sha:
            report["duplicates"].append({"file": str(sf.rel), "same_as": str(first_by_sha[sha][1].rel)})
        else:
            first_by_sha[sha] = (cls, sf)
    accepted = {}
    for sha, (cls, sf) in first_by_sha.items():
        if len(classes_by_sha[sha]) > 1:
            report["label_conflicts"].append({"file": str(sf.rel), "classes": sorted(classes_by_sha[sha])})
        else:
            accepted[sha] = (cls, sf)
    return accepted, dict(report), dict(counts)


def store(accepted, out: Path, source_label: str, progress=None):
    """Copy accepted images into out/<CLASS>/ (atomically); skip what is already there."""
    sources_path = out / SOURCES_FILE
    rows = {r["path"]: r for r in read_csv(sources_path)} if sources_path.exists() else {}
    path_by_sha = {r["sha256"]: r["path"] for r in rows.values() if (out / r["path"]).exists()}
    copied, present = Counter(), Counter()
    for sha, (cls, sf) in sorted(accepted.items(), key=lambda kv: str(kv[1][1].rel)):
        if progress:
            progress.update(1)
        if sha in path_by_sha:
            present[path_by_sha[sha].split("/")[0]] += 1
            continue
        name = sf.rel.name
        dest = out / cls / name
        if dest.exists() or f"{cls}/{name}" in rows:  # another image with this name: keep both
            dest = out / cls / f"{Path(name).stem}__{sha[:8]}{Path(name).suffix}"
        write_bytes_atomic(dest, sf.read())
        rel = f"{cls}/{dest.name}"
        rows[rel] = {"path": rel, "sha256": sha, "source": source_label, "original": str(sf.rel)}
        path_by_sha[sha] = rel
        copied[cls] += 1
    write_csv_atomic(sources_path, SOURCES_COLUMNS, sorted(rows.values(), key=lambda r: r["path"]))
    return copied, present


def _bar(total, desc):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="file", disable=None)
    except ImportError:
        return None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--slug", default=DEFAULT_SLUG, show_default=True, help="Kaggle dataset to download with kagglehub.")
@click.option("--from-zip", "from_zip", type=click.Path(dir_okay=False), help="Ingest a local archive instead "
              "(e.g. Mendeley ChestXRay2017.zip).")
@click.option("--from-dir", "from_dir", type=click.Path(file_okay=False), help="Ingest a local folder instead.")
@click.option("--out", "out_dir", default="data/raw", show_default=True, type=click.Path(file_okay=False))
@click.option("--classes", default=None, help="Keep only these classes, optionally renamed: "
              "'NORMAL,PNEUMONIA' or 'normal=NORMAL,tb=TUBERCULOSIS'.")
@exit_on_user_error
def main(slug, from_zip, from_dir, out_dir, classes):
    """Download or copy a chest X-ray dataset into OUT/<CLASS>/, verified and de-duplicated."""
    if from_zip and from_dir:
        raise XrayError("give either --from-zip or --from-dir, not both")
    mapping = parse_class_option(classes)
    if from_zip:
        src = Path(from_zip)
        if not src.is_file():
            raise XrayError(f"--from-zip {src}: no such file")
        files, label = list(iter_zip(src)), f"zip:{src.name}"
    else:
        if from_dir:
            src, label = Path(from_dir), f"dir:{Path(from_dir).name}"
        else:
            src, label = kaggle_download(slug), f"kaggle:{slug}"
        if not src.is_dir():
            raise XrayError(f"{src}: no such folder")
        files = list(iter_dir(src))
    out = Path(out_dir)
    if out.resolve() == Path(src).resolve() or Path(src).resolve() in out.resolve().parents:
        raise XrayError("--out must not be the source folder or inside it")
    cache_path = out / CACHE_FILE
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    bar = _bar(len(files), "verify")
    accepted, report, counts = scan(files, mapping, cache, bar)
    bar and bar.close()
    if not accepted:
        raise XrayError(f"no usable images in class folders found in {src}"
                        + (f" (classes kept: {', '.join(sorted(set(mapping.values())))})" if mapping else ""))
    bar = _bar(len(accepted), "store")
    copied, present = store(accepted, out, label, bar)
    bar and bar.close()
    write_json_atomic(cache_path, cache)

    per_class = sorted(set(copied) | set(present) | {c for c, _ in accepted.values()})
    full = {"source": label, "output": str(out),
            "classes": {c: {"new": copied[c], "already_present": present[c]} for c in per_class},
            "counts": counts, **{k: report.get(k, []) for k in
                                 ("corrupt", "not_images", "unlabelled", "duplicates", "label_conflicts")}}
    write_json_atomic(out / REPORT_FILE, full)

    print(f"\n{'class':<16}{'new':>8}{'present':>10}")
    for c in per_class:
        print(f"{c:<16}{copied[c]:>8}{present[c]:>10}")
    for key, what in (("corrupt", "corrupt images left out"), ("not_images", "non-image files left out"),
                      ("unlabelled", "files outside any class folder"), ("duplicates", "exact duplicates stored once"),
                      ("label_conflicts", "duplicates with conflicting labels left out")):
        if report.get(key):
            print(f"{len(report[key]):>6}  {what}")
    for k, v in sorted(counts.items()):
        print(f"{v:>6}  {k.replace('_', ' ')}")
    print(f"report: {out / REPORT_FILE}")


if __name__ == "__main__":
    main()
