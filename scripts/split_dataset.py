#!/usr/bin/env python
"""Split data/raw/<CLASS>/ into data/{train,val,test}/<CLASS>/ (ImageFolder layout) + data/manifest.csv.

Stratified and seeded, with a leakage guard: all images of one patient (and all exact duplicates)
form one group, and a group never crosses splits. Patients come from the file name: Kermany-style
names by default (person1946_bacteria_4875.jpeg -> person1946, IM-0115-0001.jpeg -> IM-0115), any
scheme with --group-regex (its first capture group); files that match nothing are their own group.
Groups are assigned largest first to the split whose per-class counts they bring closest to the
target, so per-class counts land on target (within one image when single-image patients exist).
Re-running rebuilds the split folders from raw/ (hard links when possible, else copies).
"""
from __future__ import annotations

import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import click
import numpy as np

from xray.common.artifacts import MANIFEST_COLUMNS, SOURCES_FILE, read_csv, sha256_file, write_csv_atomic
from xray.common.classes import check_classes
from xray.common.errors import ImageError, XrayError, exit_on_user_error
from xray.common.imageio import image_size, is_supported, load_image
from xray.common.preprocess import pil_filter

SPLITS = ("train", "val", "test")
DEFAULT_GROUP_REGEX = r"^(person\d+|(?:NORMAL2-)?IM-\d+)[_-]"


def find_images(raw: Path):
    """[(class, path)] for every supported file in raw/<CLASS>/ (recursively)."""
    if not raw.is_dir():
        raise XrayError(f"{raw}: no such folder (run scripts/download_raw.py or scripts/make_synthetic.py first)")
    class_dirs = sorted(d for d in raw.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = []
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and is_supported(p) and not p.name.startswith("."))
        if not files:
            raise XrayError(f"{d}: class folder has no images")
        items += [(d.name, p) for p in files]
    if not items:
        raise XrayError(f"{raw}: no class folders with images")
    check_classes({c for c, _ in items})
    return items


def group_key(name: str, pattern: re.Pattern) -> str:
    m = pattern.search(name)
    return (m.group(1) if m.groups() else m.group(0)) if m else Path(name).stem


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def build_groups(records, pattern):
    """Patient groups, merged where exact duplicates (same sha256) sit in different patients."""
    uf = _UnionFind()
    first_by_sha = {}
    for r in records:
        g = "p:" + group_key(Path(r["raw_path"]).name, pattern)
        uf.find(g)
        if r["sha256"] in first_by_sha:
            uf.union(g, first_by_sha[r["sha256"]])
        else:
            first_by_sha[r["sha256"]] = g
        r["_g"] = g
    for r in records:
        r["group"] = uf.find(r["_g"])[2:]
        del r["_g"]


def dhash(path: Path) -> np.ndarray:
    """256-bit difference hash (16x16 gradient signs) as 32 bytes. Survives re-encoding and resizing;
    8x8 hashes are too coarse for chest films, which all look alike at that scale."""
    small = np.asarray(load_image(path, draft_size=64).resize((17, 16), pil_filter("bilinear")), dtype=np.int16)
    return np.packbits((small[:, 1:] > small[:, :-1]).ravel())


def merge_near_duplicates(records, raw: Path, max_bits: int) -> int:
    """Put images whose dHashes differ in <= max_bits of 256 bits into one group; returns pairs found."""
    hashes = np.stack([dhash(raw / r["raw_path"]) for r in _progress(records, len(records), "near-dup")])
    uf, pairs = _UnionFind(), 0
    for i in range(len(records) - 1):
        dist = np.unpackbits(hashes[i + 1:] ^ hashes[i], axis=1).sum(axis=1)
        for j in np.nonzero(dist <= max_bits)[0] + i + 1:
            uf.union(records[i]["group"], records[j]["group"])
            pairs += 1
    for r in records:
        r["group"] = uf.find(r["group"])
    return pairs


def targets(counts: np.ndarray, fractions) -> np.ndarray:
    """Per (split, class) target counts: largest-remainder rounding so each class sums exactly."""
    exact = np.outer(fractions, counts)
    out = np.floor(exact).astype(int)
    for c in range(len(counts)):
        short = counts[c] - out[:, c].sum()
        order = np.argsort(-(exact[:, c] - out[:, c]), kind="stable")
        out[order[:short], c] += 1
    return out


def assign(records, classes, fractions, seed):
    """Greedy stratified group assignment; sets record['split']."""
    cidx = {c: i for i, c in enumerate(classes)}
    groups = defaultdict(list)
    for r in records:
        groups[r["group"]].append(r)
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(keys)
    vecs = {k: np.bincount([cidx[r["class"]] for r in groups[k]], minlength=len(classes)) for k in keys}
    keys.sort(key=lambda k: -vecs[k].sum())  # stable: size descending, seeded order within a size
    total = np.bincount([cidx[r["class"]] for r in records], minlength=len(classes))
    tgt = targets(total, fractions)
    cur = np.zeros_like(tgt)
    for k in keys:
        v = vecs[k]
        cost = ((cur + v - tgt) ** 2 - (cur - tgt) ** 2).sum(axis=1)
        deficit = (tgt - cur)[:, v > 0].sum(axis=1)
        s = min(range(len(SPLITS)), key=lambda i: (cost[i], -deficit[i]))
        cur[s] += v
        for r in groups[k]:
            r["split"] = SPLITS[s]
    return tgt, cur


def place(src: Path, dst: Path, link: bool):
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def write_resized(src: Path, dst: Path, size: int):
    """A PNG copy whose shorter side is `size` (never upscaled), decoded through common loading."""
    img = load_image(src)
    w, h = img.size
    scale = size / min(w, h)
    if scale < 1:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), pil_filter("bicubic"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst.with_suffix(".png"), "PNG")


def build_split(records, raw: Path, tmp: Path, copy_files: bool, prepare_size: int | None):
    """Link (or copy) every record into tmp/<split>/<class>/ and write resized copies; sets record['path']."""
    used = set()
    for r in _progress(records, len(records), "place"):
        name = Path(r["raw_path"]).name
        rel = f"{r['split']}/{r['class']}/{name}"
        if rel in used:  # same file name in two raw sub-folders of one class
            rel = f"{r['split']}/{r['class']}/{Path(name).stem}__{r['sha256'][:8]}{Path(name).suffix}"
        used.add(rel)
        r["path"] = rel
        place(raw / r["raw_path"], tmp / rel, link=not copy_files)
        if prepare_size:
            try:
                write_resized(raw / r["raw_path"], tmp / f"resized_{prepare_size}" / rel, prepare_size)
            except ImageError as e:
                raise XrayError(f"{e} (re-run scripts/download_raw.py to drop corrupt files)") from None
    for split in SPLITS:
        (tmp / split).mkdir(parents=True, exist_ok=True)


def _progress(it, total, desc):
    try:
        from tqdm import tqdm
        return tqdm(it, total=total, desc=desc, unit="img", disable=None)
    except ImportError:
        return it


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--raw", "raw_dir", default="data/raw", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", default="data", show_default=True, type=click.Path(file_okay=False),
              help="Writes OUT/{train,val,test}/<CLASS>/ and OUT/manifest.csv.")
@click.option("--val", "val_frac", default=0.15, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--test", "test_frac", default=0.15, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--group-regex", default=DEFAULT_GROUP_REGEX, show_default=True,
              help="Regex on the file name whose first capture group names the patient.")
@click.option("--copy", "copy_files", is_flag=True, help="Copy files instead of hard-linking them.")
@click.option("--prepare-size", type=click.IntRange(16, 4096), default=None,
              help="Also write PNG copies with shorter side N to OUT/resized_N/{train,val,test}/ "
                   "(train from these to avoid decoding multi-megapixel originals every epoch).")
@click.option("--near-dup-bits", type=click.IntRange(0, 256), default=None,
              help="Also keep near-duplicates together: images whose 256-bit dHash differs in at most N bits "
                   "(about 4 catches re-encoded or resized copies; off by default).")
@exit_on_user_error
def main(raw_dir, out_dir, val_frac, test_frac, seed, group_regex, copy_files, prepare_size, near_dup_bits):
    """Stratified, patient-grouped, seeded train/val/test split of RAW into OUT."""
    if val_frac + test_frac >= 1:
        raise XrayError("--val + --test must leave something to train on (sum < 1)")
    try:
        pattern = re.compile(group_regex)
    except re.error as e:
        raise XrayError(f"--group-regex: {e}") from None
    raw, out = Path(raw_dir), Path(out_dir)
    if out.resolve() == raw.resolve():
        raise XrayError("--out must differ from --raw")
    items = find_images(raw)
    classes = sorted({c for c, _ in items})
    sources_csv = raw / SOURCES_FILE
    source_of = {r["path"]: r["source"] for r in read_csv(sources_csv)} if sources_csv.exists() else {}

    records = []
    for cls, p in _progress(items, len(items), "scan"):
        rel = p.relative_to(raw).as_posix()
        try:
            w, h = image_size(p)
        except Exception as e:
            raise XrayError(f"{p}: cannot read image header ({e}); re-run scripts/download_raw.py to verify raw/")
        records.append({"raw_path": rel, "class": cls, "sha256": sha256_file(p), "width": w, "height": h,
                        "source": source_of.get(rel, "raw")})
    build_groups(records, pattern)
    if near_dup_bits is not None:
        print(f"near-duplicate pairs kept together: {merge_near_duplicates(records, raw, near_dup_bits)}")
    fractions = np.array([1 - val_frac - test_frac, val_frac, test_frac])
    tgt, cur = assign(records, classes, fractions, seed)
    for si, split in enumerate(SPLITS):
        for ci, cls in enumerate(classes):
            if cur[si, ci] == 0:
                n_groups = len({r["group"] for r in records if r["class"] == cls})
                raise XrayError(f"class {cls} has no images in {split} ({n_groups} patient groups for "
                                f"{sum(r['class'] == cls for r in records)} images); add data or change --val/--test")

    # build everything in a temporary folder, then swap it in: a failed or interrupted run leaves the old split
    tmp = out / ".split-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_split(records, raw, tmp, copy_files, prepare_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out.mkdir(parents=True, exist_ok=True)
    managed = list(SPLITS) + ([f"resized_{prepare_size}"] if prepare_size else [])
    for name in managed:
        shutil.rmtree(out / name, ignore_errors=True)
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    records.sort(key=lambda r: r["path"])
    write_csv_atomic(out / "manifest.csv", MANIFEST_COLUMNS, records)

    print(f"\n{'class':<16}" + "".join(f"{s:>8}" for s in SPLITS) + f"{'total':>8}")
    for ci, cls in enumerate(classes):
        print(f"{cls:<16}" + "".join(f"{cur[si, ci]:>8}" for si in range(3)) + f"{cur[:, ci].sum():>8}")
    n_groups = [len({r["group"] for r in records if r["split"] == s}) for s in SPLITS]
    print(f"{'patients':<16}" + "".join(f"{g:>8}" for g in n_groups) + f"{sum(n_groups):>8}")
    print(f"max deviation from the stratified target: {int(np.abs(cur - tgt).max())} image(s)")
    print(f"manifest: {out / 'manifest.csv'}" + (f"; resized copies: {out / f'resized_{prepare_size}'}"
                                                if prepare_size else ""))


if __name__ == "__main__":
    main()
