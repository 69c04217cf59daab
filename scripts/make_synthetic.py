#!/usr/bin/env python
"""Generate a deterministic synthetic chest X-ray set into data/raw/<CLASS>/.

Synthetic images teach the pipeline, not medicine. Each image has a thorax silhouette, dark lung
fields with domed diaphragms, ribs, clavicles, mediastinum and heart, vascular texture, exposure and
noise variation; each class adds a learnable finding:

  NORMAL        clear lung fields
  PNEUMONIA     patchy lower-zone consolidation (one or both lungs)
  TUBERCULOSIS  upper-zone nodules and cavities
  other names   further findings in order: diffuse haze, pleural effusion, cardiomegaly

Files get Kermany-style names (person0042_bacteria_0107.jpeg) with 1-3 images per patient that share
the patient's anatomy, so a split that ignores patients leaks. Formats cycle through 8-bit JPEG,
8-bit PNG and 16-bit PNG. The same --seed always gives byte-identical files.
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image

from xray.common.artifacts import SOURCES_COLUMNS, SOURCES_FILE, read_csv, sha256_bytes, write_bytes_atomic, write_csv_atomic
from xray.common.classes import DEFAULT_CLASSES, canonical_name, check_classes
from xray.common.errors import XrayError, exit_on_user_error

KNOWN_FINDINGS = {"NORMAL": "clear", "PNEUMONIA": "lower_patchy", "TUBERCULOSIS": "upper_nodules"}
EXTRA_FINDINGS = ("diffuse_haze", "effusion", "cardiomegaly")
FORMATS = ("jpeg", "png", "png16")


@dataclass(frozen=True)
class Anatomy:
    """One patient's geometry, shared by all their images."""

    cx: float
    cy: float
    scale: float
    lung_w: float
    lung_h: float
    heart: float
    rib_spacing: float
    tissue: float
    height: int
    aspect: float

    @classmethod
    def sample(cls, rng: np.random.Generator, size: int) -> "Anatomy":
        return cls(cx=rng.normal(0.5, 0.015), cy=rng.normal(0.50, 0.015), scale=rng.uniform(0.9, 1.05),
                   lung_w=rng.uniform(0.14, 0.17), lung_h=rng.uniform(0.28, 0.33), heart=rng.uniform(0.09, 0.12),
                   rib_spacing=rng.uniform(0.065, 0.085), tissue=rng.uniform(0.45, 0.6),
                   height=int(size * rng.uniform(0.9, 1.15)), aspect=rng.uniform(0.88, 1.12))


def finding_for(classes: list[str]) -> dict[str, str]:
    """Map each class to a finding: the known ones by name, the rest to unused findings in order."""
    out, spare = {}, [f for f in EXTRA_FINDINGS]
    for c in classes:
        if c in KNOWN_FINDINGS:
            out[c] = KNOWN_FINDINGS[c]
    unused = [f for f in ("clear", "lower_patchy", "upper_nodules") if f not in out.values()] + spare
    for c in classes:
        if c not in out:
            if not unused:
                raise XrayError(f"the synthetic generator knows {3 + len(EXTRA_FINDINGS)} distinct findings; "
                                f"{len(classes)} classes asked")
            out[c] = unused.pop(0)
    return out


def _ellipse(yy, xx, cy, cx, ry, rx, soft=0.08):
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.clip((1.0 + soft - d) / (2 * soft), 0.0, 1.0)


def _blob(yy, xx, cy, cx, r):
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))


def _smooth_noise(rng, shape, cells):
    small = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(small, "F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float64)


def _gaussian_blur(img, sigma):
    """Separable Gaussian blur with edge padding (float precision, unlike PIL's 8-bit filter)."""
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(img, pad, mode="edge")
        n = img.shape[axis]
        img = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return img


def render(finding: str, anat: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """One radiograph as float64 in [0, 1] (bright = dense), shape (height, width)."""
    h = anat.height
    w = int(h * anat.aspect)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy /= h
    xx /= w
    # per-image pose jitter: small shift and rotation
    ang = np.deg2rad(rng.uniform(-4, 4))
    ty, tx = rng.normal(0, 0.015, 2)
    cy, cx = anat.cy + ty, anat.cx + tx
    y0, x0 = yy - cy, xx - cx
    yy, xx = cy + y0 * np.cos(ang) - x0 * np.sin(ang), cx + y0 * np.sin(ang) + x0 * np.cos(ang)
    s = anat.scale

    img = np.full((h, w), 0.04)
    body = _ellipse(yy, xx, cy + 0.05, cx, 0.52 * s, 0.44 * s, soft=0.05)
    img += body * anat.tissue
    lungs, lung_boxes = np.zeros_like(img), []
    for side in (-1, 1):
        lcx = cx + side * 0.17 * s
        lung = _ellipse(yy, xx, cy, lcx, anat.lung_h * s, anat.lung_w * s, soft=0.1)
        lungs = np.maximum(lungs, lung)
        lung_boxes.append((cy, lcx, anat.lung_h * s, anat.lung_w * s))
    img -= lungs * 0.32
    # ribs: bright curved bands across the lung fields, curving down laterally
    curve = cy - 0.3 * s + 1.2 * (xx - cx) ** 2
    ribs = np.maximum(0.0, np.cos(2 * np.pi * (yy - curve) / (anat.rib_spacing * s))) ** 6
    img += ribs * lungs * 0.10
    # clavicles: thin bright arcs above the lung apices
    clavicle_y = cy - 0.31 * s + 0.25 * (xx - cx) ** 2
    for side in (-1, 1):
        img += np.exp(-((yy - clavicle_y) / 0.012) ** 2) * (np.abs(xx - cx - side * 0.14 * s) < 0.13 * s) * 0.18
    # mediastinum and heart (the heart sits to the patient's left = image right)
    img += np.exp(-((xx - cx) / (0.05 * s)) ** 2) * (yy > cy - 0.45 * s) * body * 0.35
    heart_r = anat.heart * s * (1.6 if finding == "cardiomegaly" else 1.0) * rng.uniform(0.95, 1.05)
    img += _ellipse(yy, xx, cy + 0.14 * s, cx + 0.04 * s, heart_r * 0.9, heart_r * 1.1, soft=0.15) * 0.3
    # vascular markings: low-frequency texture, stronger near the hila
    img += (_smooth_noise(rng, (h, w), 12) - 0.5) * lungs * 0.08

    sev = rng.uniform(0.4, 1.0)
    px_min = 1.2 / h  # keep small findings at least ~1 px wide in small test images
    if finding == "lower_patchy":
        sides = [0, 1] if rng.random() < 0.35 else [int(rng.integers(2))]
        texture = _smooth_noise(rng, (h, w), 24)
        for si in sides:
            lcy, lcx, lh, lw = lung_boxes[si]
            patch = np.zeros_like(img)
            for _ in range(int(rng.integers(3, 7))):
                py = lcy + lh * rng.uniform(0.2, 0.7)
                px = lcx + lw * rng.uniform(-0.6, 0.6)
                patch += _blob(yy, xx, py, px, rng.uniform(0.03, 0.06) * s)
            img += np.clip(patch, 0, 1) * (0.5 + texture) * lungs * 0.30 * sev
    elif finding == "upper_nodules":
        sides = [0, 1] if rng.random() < 0.5 else [int(rng.integers(2))]
        for si in sides:
            lcy, lcx, lh, lw = lung_boxes[si]
            for _ in range(int(rng.integers(4, 10))):
                py = lcy - lh * rng.uniform(0.35, 0.8)
                px = lcx + lw * rng.uniform(-0.6, 0.6)
                r = max(rng.uniform(0.008, 0.016) * s, px_min)
                img += _blob(yy, xx, py, px, r) * rng.uniform(0.25, 0.4) * sev
            for _ in range(int(rng.integers(1, 3))):
                py = lcy - lh * rng.uniform(0.4, 0.7)
                px = lcx + lw * rng.uniform(-0.4, 0.4)
                r = max(rng.uniform(0.025, 0.04) * s, 3 * px_min)
                d = np.sqrt((yy - py) ** 2 + (xx - px) ** 2)
                img += np.exp(-((d - r) / (0.3 * r)) ** 2) * 0.22 * sev  # bright rim
                img -= (d < r * 0.8) * 0.08 * sev  # air-filled centre
    elif finding == "diffuse_haze":
        img += _smooth_noise(rng, (h, w), 6) * lungs * 0.25 * sev
    elif finding == "effusion":
        si = int(rng.integers(2))
        lcy, lcx, lh, lw = lung_boxes[si]
        level = lcy + lh * rng.uniform(0.2, 0.5)
        img += (yy > level) * _ellipse(yy, xx, lcy, lcx, lh * 1.05, lw * 1.05) * 0.3 * sev
    elif finding not in ("clear", "cardiomegaly"):
        raise ValueError(f"unknown finding {finding!r}")

    # exposure, contrast, detector noise, blur
    lo, hi = np.percentile(img, [0.5, 99.5])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) ** rng.uniform(0.8, 1.25)
    img = img + rng.normal(0, rng.uniform(0.01, 0.03), img.shape)
    img = np.clip(img, 0, 1)
    img = _gaussian_blur(img, rng.uniform(0.3, 1.0))
    lo, hi = img.min(), img.max()
    return (img - lo) / max(hi - lo, 1e-9)


def encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png16":
        Image.fromarray(np.rint(img * 65535).astype(np.uint16)).save(buf, "PNG")
    else:
        pil = Image.fromarray(np.rint(img * 255).astype(np.uint8), "L")
        pil.save(buf, "JPEG", quality=92) if fmt == "jpeg" else pil.save(buf, "PNG")
    return buf.getvalue()


def file_tag(cls: str, rng: np.random.Generator) -> str:
    if cls == "PNEUMONIA":
        return "bacteria" if rng.random() < 0.6 else "virus"
    return {"NORMAL": "normal", "TUBERCULOSIS": "tb"}.get(cls, cls.lower())


def plan(classes: list[str], counts: dict[str, int], seed: int):
    """Yield (class, patient id, image number) in a deterministic order; 1-3 images per patient."""
    pid, n = 0, 0
    for ci, cls in enumerate(classes):
        rng = np.random.default_rng([seed, ci, 0])
        left = counts[cls]
        while left > 0:
            pid += 1
            k = min(left, int(rng.choice([1, 1, 1, 2, 2, 3])))
            for _ in range(k):
                n += 1
                yield cls, pid, n
            left -= k


def generate(out: Path, classes: list[str], counts: dict[str, int], size: int, seed: int,
             formats: tuple[str, ...], progress=None) -> list[dict]:
    findings = finding_for(classes)
    rows, anatomies = [], {}
    for i, (cls, pid, n) in enumerate(plan(classes, counts, seed)):
        if pid not in anatomies:
            anatomies[pid] = Anatomy.sample(np.random.default_rng([seed, pid, 1]), size)
        rng = np.random.default_rng([seed, pid, n, 2])
        fmt = formats[i % len(formats)]
        ext = "jpeg" if fmt == "jpeg" else "png"
        name = f"person{pid:04d}_{file_tag(cls, rng)}_{n:04d}.{ext}"
        path = out / cls / name
        data = encode(render(findings[cls], anatomies[pid], rng), fmt)
        if not path.exists() or path.read_bytes() != data:
            write_bytes_atomic(path, data)
        rows.append({"path": f"{cls}/{name}", "sha256": sha256_bytes(data), "source": "synthetic",
                     "original": f"synthetic:seed={seed}"})
        if progress:
            progress.update(1)
    return rows


def parse_counts(text: str, classes: list[str]) -> dict[str, int]:
    """'120' (every class) or 'NORMAL=100,PNEUMONIA=60,TUBERCULOSIS=80'."""
    try:
        if "=" not in text:
            counts = {c: int(text) for c in classes}
        else:
            counts = {canonical_name(k): int(v) for k, v in (p.split("=") for p in text.split(",") if p.strip())}
    except ValueError:
        raise XrayError(f"--per-class {text!r}: expected a number or CLASS=N,CLASS=N") from None
    missing = set(classes) - set(counts)
    if missing or set(counts) - set(classes):
        raise XrayError(f"--per-class must give a count for exactly the classes {classes}")
    if any(v < 1 for v in counts.values()):
        raise XrayError("--per-class counts must be at least 1")
    return counts


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", default="data/raw", show_default=True, type=click.Path(file_okay=False),
              help="Output folder; images go to <out>/<CLASS>/.")
@click.option("--classes", default=",".join(DEFAULT_CLASSES), show_default=True,
              help="Comma-separated class names (any list; unknown names get distinct findings).")
@click.option("--per-class", default="100", show_default=True,
              help="Images per class: a number, or CLASS=N,CLASS=N for an imbalanced set.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(32, 4096),
              help="Typical image height in pixels (each patient varies about it).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--formats", default=",".join(FORMATS), show_default=True,
              help=f"Comma-separated output formats to cycle through: {', '.join(FORMATS)}.")
@exit_on_user_error
def main(out_dir, classes, per_class, size, seed, formats):
    """Generate a synthetic chest X-ray set (deterministic; for tests and the demo, not medicine)."""
    class_list = check_classes([canonical_name(c) for c in classes.split(",") if c.strip()])
    fmts = tuple(f.strip().lower() for f in formats.split(",") if f.strip())
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise XrayError(f"--formats: unknown {bad or 'empty'}; choose from {', '.join(FORMATS)}")
    counts = parse_counts(per_class, class_list)
    out = Path(out_dir)
    total = sum(counts.values())
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="synthetic", unit="img", disable=None)
    except ImportError:
        bar = None
    rows = generate(out, class_list, counts, size, seed, fmts, bar)
    if bar:
        bar.close()
    # keep provenance of anything else already in raw/, replace ours
    sources = out / SOURCES_FILE
    mine = {r["path"] for r in rows}
    old = [r for r in read_csv(sources) if r["path"] not in mine] if sources.exists() else []
    write_csv_atomic(sources, SOURCES_COLUMNS, sorted(old + rows, key=lambda r: r["path"]))
    print(f"wrote {total} synthetic images ({', '.join(f'{c}: {counts[c]}' for c in class_list)}) to {out}/")
    print("note: synthetic images exercise the pipeline; they say nothing about real radiographs.",
          file=sys.stderr)


if __name__ == "__main__":
    main()
