#!/usr/bin/env python
"""Edge inference, whole processes: xray-infer (ONNX int8, ONNX fp32) vs a PyTorch eager CLI doing the same.

    python scripts/bench_infer.py --run runs/lite224                 # needs best.safetensors + export/
    python scripts/bench_infer.py --run runs/lite224 --images 600 --repeats 15 --json bench_infer.json

Measured in one run, on this machine, with the project's own code:

- xray-infer runs from an edge venv built for the bench (the project wheel + onnxruntime, numpy,
  pillow, click; no torch, no editable-install import hook), as it is installed on a clinic PC.
- cold single image: `xray-infer --model M one.jpeg --format json` as a new process each time (Python
  start, imports, session creation, decode, predict, print), median of --repeats; peak RSS of that
  process from os.wait4. The torch CLI does the same job: import torch, xray.train.checkpoint
  .load_checkpoint (timm model + safetensors), load_image + preprocess, softmax, print.
- folder throughput: one process over --images generated 1-2.5 MP chest-like JPEGs (make_synthetic
  --size 1300), images / wall second including start-up. xray-infer: its own threaded decoder and
  batches; torch: the same decode in a thread pool of --threads and batches of 16 under torch.no_grad().
- trust outputs: batch-1 latency with ood_score (+ cam) vs the same graph cut back to the classifier.
- JPEG draft: max |Δprobability| of xray-infer's decode (libjpeg DCT-domain downscale to >= the model's
  resize size, as training and xray-export decode) against a full decode on the same files, and the
  decode+preprocess time of both.

Ratios within one run are what to read: another load on a shared CPU moves all figures together.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from xray.common.imageio import image_size

ROOT = Path(__file__).resolve().parents[1]

TORCH_ONE = """
import sys, torch
from xray.train.checkpoint import load_checkpoint
from xray.common.imageio import load_image
from xray.common.preprocess import preprocess
torch.set_num_threads(int(sys.argv[3]))
model, meta = load_checkpoint(sys.argv[1])
spec = meta["image_spec"]
x = torch.from_numpy(preprocess(load_image(sys.argv[2], draft_size=spec.resize_size), spec))[None]
with torch.no_grad():
    p = torch.softmax(model.eval()(x), 1)[0]
print(meta["classes"][int(p.argmax())], float(p.max()))
"""

TORCH_FOLDER = """
import sys, glob, numpy, torch
from concurrent.futures import ThreadPoolExecutor
from xray.train.checkpoint import load_checkpoint
from xray.common.imageio import load_image
from xray.common.preprocess import preprocess
threads = int(sys.argv[3])
torch.set_num_threads(threads)
model, meta = load_checkpoint(sys.argv[1])
model.eval()
spec = meta["image_spec"]
files = sorted(glob.glob(sys.argv[2] + "/**/*.jpeg", recursive=True))
prep = lambda f: preprocess(load_image(f, draft_size=spec.resize_size), spec)
with ThreadPoolExecutor(threads) as pool, torch.no_grad():
    arrays = pool.map(prep, files)
    n = 0
    while True:
        batch = [a for _, a in zip(range(16), arrays)]
        if not batch:
            break
        p = torch.softmax(model(torch.from_numpy(numpy.stack(batch))), 1)
        n += len(batch)
print(n)
"""


def rss_and_wall(cmd) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of one process; reaped with wait4 so the RSS is its own."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))[:300]}")
    return wall, usage.ru_maxrss / 1024, out.decode()


def edge_venv(folder: Path) -> Path:
    """A venv holding only the edge install (the xray-edge wheel + onnxruntime, numpy, pillow, click; no
    torch), as on a clinic PC; built once, offline, from the wheels `make install` downloaded."""
    cli = folder / "bin" / "xray-infer"
    if cli.exists():
        return cli
    import venv

    wheels = Path(sys.prefix) / "edge-wheels"
    dist = folder.parent / "edge-dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", dist,
                    ROOT], check=True)
    venv.EnvBuilder(with_pip=True).create(folder)
    pip = [folder / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-index", "--find-links", wheels]
    subprocess.run(pip + ["onnxruntime", "numpy", "pillow", "click"], check=True)
    subprocess.run(pip + ["--no-deps", "--force-reinstall", *dist.glob("xray_edge-*.whl")], check=True)
    return cli


def generated_jpegs(folder: Path, n: int) -> list[Path]:
    if len(list(folder.glob("*/*.jpeg"))) < n - n % 3:
        per_class = n // 3
        subprocess.run([sys.executable, ROOT / "scripts" / "make_synthetic.py", "--out", folder,
                        "--per-class", str(per_class), "--size", "1300", "--seed", "7", "--formats", "jpeg"],
                       check=True)
    return sorted(folder.glob("*/*.jpeg"))


def draft_effect(model_path: Path, files: list[Path]) -> dict:
    """Probabilities and decode time with the JPEG draft (what xray-infer does) vs a full decode."""
    from xray.common.imageio import load_image
    from xray.common.preprocess import preprocess
    from xray.infer.model import EdgeModel

    model = EdgeModel(model_path, 2)
    spec = model.info.spec
    out = {}
    for name, draft in (("draft", spec.resize_size), ("full", None)):
        t0 = time.perf_counter()
        x = np.stack([preprocess(load_image(f, draft_size=draft), spec) for f in files])
        out[name + "_ms_per_image"] = (time.perf_counter() - t0) * 1000 / len(files)
        out[name] = model.predict(x).probs
    diff = np.abs(out.pop("draft") - out.pop("full"))
    return {**out, "model_name": model.info.model_name, "max_abs_prob_diff": float(diff.max()), "mean_abs_prob_diff": float(diff.mean())}


def trust_cost(models: dict, threads: int, rounds: int = 300) -> dict:
    """Batch-1 latency of each model with its trust outputs (logits + ood_score + cam, as xray-infer --heatmap
    asks; logits + ood_score, as plain xray-infer asks) vs the same graph cut back to the classifier alone
    (onnx.utils.extract_model: what a model exported before the guard computes). Interleaved blocks."""
    import onnx.utils
    import onnxruntime as ort

    from xray.infer.model import EdgeModel

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    out = {}
    for name, path in models.items():
        edge = EdgeModel(path, threads)
        x = x[:, :edge.info.spec.channels, :edge.info.spec.input_size, :edge.info.spec.input_size].copy()
        with tempfile.TemporaryDirectory() as tmp:
            cut = Path(tmp) / "classifier_only.onnx"
            onnx.utils.extract_model(str(path), str(cut), ["input"], ["logits"])
            plain = ort.InferenceSession(str(cut), edge.session.get_session_options(), providers=["CPUExecutionProvider"])
        runs = {"classifier only": lambda: plain.run(["logits"], {"input": x}),
                "logits + ood_score": lambda: edge.session.run(["logits", "ood_score"], {"input": x}),
                "logits + ood_score + cam": lambda: edge.session.run(["logits", "ood_score", "cam"], {"input": x})}
        times = {k: [] for k in runs}
        for _ in range(rounds // 10):  # blocks of 10 calls, the first dropped: the switch between two sessions'
            for k, fn in runs.items():  # weights costs cache misses that a folder run does not pay
                for i in range(10):
                    t0 = time.perf_counter()
                    fn()
                    if i:
                        times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        out[name] = {"ms": med, "ratio": {k: v / med["classifier only"] for k, v in med.items()}}
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A trained run: best.safetensors and export/model.onnx (+ model.int8.onnx).")
@click.option("--images", default=450, show_default=True, help="Generated JPEGs for the throughput test.")
@click.option("--repeats", default=11, show_default=True, help="Cold single-image runs per CLI (median).")
@click.option("--threads", default=2, show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where the generated JPEGs are kept (reused).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the figures here.")
def main(run_dir, images, repeats, threads, work_dir, json_out):
    """Cold start, peak memory and folder throughput of xray-infer vs a PyTorch eager CLI."""
    run = Path(run_dir)
    export = run / "export"
    int8 = export / "model.int8.onnx"
    if not int8.is_file() and (export / "model.int8.rejected.onnx").is_file():
        int8 = export / "model.int8.rejected.onnx"
        print(f"note: timing {int8.name} (int8 failed the export gate; speed is what this measures)", file=sys.stderr)
    models = {"xray-infer int8": int8, "xray-infer fp32": export / "model.onnx"}
    for p in [*models.values(), run / "best.safetensors"]:
        if not p.is_file():
            raise SystemExit(f"missing {p}: train and xray-export the run first")
    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "xray-bench-infer"
    folder = work / f"jpegs-{images}"  # exactly the timed files: the folder runs read all of it
    files = generated_jpegs(folder, images)
    mp = [w * h / 1e6 for w, h in (image_size(f) for f in files)]
    one = files[0]
    infer = edge_venv(work / "edge-venv")

    commands = {name: [infer, "--model", m, one, "--format", "json", "--threads", threads]
                for name, m in models.items()}
    commands["torch eager"] = [sys.executable, "-c", TORCH_ONE, run / "best.safetensors", one, threads]
    for cmd in commands.values():
        rss_and_wall(cmd)  # warm the page cache
    cold = {name: {"seconds": [], "rss_mb": []} for name in commands}
    for _ in range(repeats):  # interleaved, so a load burst hits every CLI alike
        for name, cmd in commands.items():
            wall, rss, _ = rss_and_wall(cmd)
            cold[name]["seconds"].append(wall)
            cold[name]["rss_mb"].append(rss)
    for v in cold.values():
        v["median_s"] = statistics.median(v.pop("seconds"))
        v["peak_rss_mb"] = max(v.pop("rss_mb"))

    throughput = {}
    for name, m in models.items():
        wall, rss, out = rss_and_wall([infer, "--model", m, folder, "--format", "jsonl", "--threads", threads, "-q"])
        throughput[name] = {"images": len(out.splitlines()), "seconds": wall, "images_per_s": len(out.splitlines()) / wall,
                            "peak_rss_mb": rss}
    wall, rss, out = rss_and_wall([sys.executable, "-c", TORCH_FOLDER, run / "best.safetensors", folder, threads])
    throughput["torch eager"] = {"images": int(out.strip()), "seconds": wall, "images_per_s": int(out.strip()) / wall,
                                 "peak_rss_mb": rss}

    draft = draft_effect(int8, files[:60])
    trust = trust_cost(models, threads)

    base_cold = cold["torch eager"]["median_s"]
    print(f"\nxray-infer bench: {threads} threads, {len(files)} JPEGs of {min(mp):.1f}-{max(mp):.1f} MP, "
          f"{repeats} cold runs each, {draft['model_name']} at {one.name}\n")
    print("| CLI | cold 1 image (median s) | vs torch | peak RSS MB (1 image) | folder img/s | vs torch |")
    print("|---|---|---|---|---|---|")
    base_tp = throughput["torch eager"]["images_per_s"]
    for name in commands:
        c, t = cold[name], throughput[name]
        print(f"| {name} | {c['median_s']:.3f} | {base_cold / c['median_s']:.1f}x | {c['peak_rss_mb']:.0f} | "
              f"{t['images_per_s']:.0f} | {t['images_per_s'] / base_tp:.2f}x |")
    print(f"\nJPEG draft decode: {draft['draft_ms_per_image']:.1f} ms/image vs full decode "
          f"{draft['full_ms_per_image']:.1f} ms/image; max |Δprobability| {draft['max_abs_prob_diff']:.4f} "
          f"(mean {draft['mean_abs_prob_diff']:.5f}) on {min(60, len(files))} images")
    print("\nTrust outputs at batch 1 (median of 270 warm runs in interleaved blocks, ms; ratio to the classifier "
          "alone):\n")
    print("| model | classifier only | logits + ood_score | + cam (--heatmap) |")
    print("|---|---|---|---|")
    for name, t in trust.items():
        ms, r = t["ms"], t["ratio"]
        print(f"| {name} | {ms['classifier only']:.2f} | {ms['logits + ood_score']:.2f} ({r['logits + ood_score']:.3f}x) | "
              f"{ms['logits + ood_score + cam']:.2f} ({r['logits + ood_score + cam']:.3f}x) |")
    if json_out:
        Path(json_out).write_text(json.dumps({"threads": threads, "images": len(files), "megapixels": [min(mp), max(mp)],
                                              "cold": cold, "throughput": throughput, "draft": draft, "trust": trust},
                                             indent=2))


if __name__ == "__main__":
    main()
