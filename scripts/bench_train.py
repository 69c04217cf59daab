#!/usr/bin/env python
"""Training throughput on this CPU: the trainer's own step vs a plain PyTorch loop, and the data loader alone.

    python scripts/bench_train.py                       # synthetic data in a temp folder, both models
    python scripts/bench_train.py --data-dir data --models efficientnet_lite0 --json bench.json

Measured in one run, reported as ratios (never asserted anywhere):

- plain loop: a hand-written single-process loop (model.train(), AdamW, CrossEntropyLoss,
  forward/backward/step). Phase A freezes the backbone the naive way (requires_grad=False, without the
  trainer's no-grad frozen-backbone forward, BatchNorm left in train mode); phase B unfreezes the same
  last N blocks as the trainer.
- trainer: accelerate.Accelerator(cpu=True) + xray.train.phases.set_trainable / set_train_mode /
  param_groups + xray.train.loop.train_one_epoch on a prepared model, optimizer, loader and scheduler,
  as train/main.py's Run.run_phase does it (default path, no --cache-features).
- loader only: the real XrayDataset (train augmentation) + DataLoader, no model, with 0 and N workers.

Both training paths read the same kind of DataLoader (real XrayDataset with augmentation, the trainer's
default 2 workers), so a row's ratio compares the steps, not the input pipelines. Plain loop and trainer
run in alternating passes (ABBA over --rounds), each pass with its own untimed warm-up batches; the
model and optimizer persist across a path's passes. Training img/s = batch size / median timed batch
time (robust to a few batches stalled by other processes on a shared CPU); the wall-time ratio is
printed next to it. Loader img/s = timed images / wall time (workers deliver in bursts).

On a shared 2-core box absolute img/s drift by tens of percent from minute to minute with other
processes' load; the ratios inside one row (measured interleaved) are what this script is for.
With glibc's default malloc a large part of each 224 px step here is page faults (freed activation
memory goes back to the OS and is faulted in again); the trainer keeps freed memory in the process
(xray.train.perf.tune_malloc) and so does this script, unless --no-tune-malloc.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from torch.utils.data import DataLoader

from xray.common.errors import XrayError, exit_on_user_error
from xray.train.augment import AugmentConfig
from xray.train.data import XrayDataset, class_weights, scan_split
from xray.train.models import REGISTRY, build_model, get_model_def
from xray.train.perf import tune_malloc as apply_malloc_tuning

SCRIPTS = Path(__file__).resolve().parent
SEED = 42
# the trainer's defaults (train/main.py)
LR = {"A": 1e-3, "B": 3e-4}
WEIGHT_DECAY = 1e-4
BACKBONE_LR_FACTOR = 0.1
CLIP_GRAD = 1.0
WARMUP_FRAC = 0.1

def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ---- data ---------------------------------------------------------------------------------------
def make_data(tmp: Path, per_class: int) -> Path:
    raw = tmp / "raw"
    for cmd in ([sys.executable, str(SCRIPTS / "make_synthetic.py"), "--out", str(raw), "--per-class", str(per_class),
                 "--size", "256"],
                [sys.executable, str(SCRIPTS / "split_dataset.py"), "--raw", str(raw), "--out", str(tmp)]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise XrayError(f"{Path(cmd[1]).name} failed (exit {done.returncode}): {last[0]}")
    return tmp


def take(samples: list, n: int) -> list:
    """Exactly n samples (cycling when the split is smaller), so every measurement has the same batches."""
    return [samples[i % len(samples)] for i in range(n)]


def make_loader(samples, spec, batch_size: int, workers: int):
    """As Run.loader(train=True) builds it: augmentation on, shuffled, seeded."""
    ds = XrayDataset(samples, spec, AugmentConfig(), seed=SEED)
    return ds, DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                          generator=torch.Generator().manual_seed(SEED), drop_last=False)


def timed_steps(t0: float, stamps: list[float], warmup: int) -> list[float]:
    """Durations of the batches after the first `warmup` of a pass; t0 = start, stamps[i] = end of batch i+1."""
    if len(stamps) <= warmup:
        raise XrayError(f"only {len(stamps)} batches ran, fewer than warm-up + 1")
    ends = [t0] + stamps
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]


def summarize(steps: list[float], batch_size: int) -> dict:
    """images_per_s_wall = timed images / their total time; images_per_s_median = batch size / median batch
    time, which a few batches stalled by other processes on a shared CPU do not move."""
    return {"images_per_s_wall": len(steps) * batch_size / sum(steps),
            "images_per_s_median": batch_size / statistics.median(steps),
            "seconds": round(sum(steps), 3), "timed_batches": len(steps),
            "batch_seconds": [round(s, 4) for s in steps]}


# ---- measurements -------------------------------------------------------------------------------
def bench_loader(samples, spec, batch_size, workers, warmup):
    _, loader = make_loader(samples, spec, batch_size, workers)
    stamps = []
    t0 = time.perf_counter()
    for _x, _y in loader:
        stamps.append(time.perf_counter())
    r = summarize(timed_steps(t0, stamps, warmup), batch_size)
    r["images_per_s"] = r["images_per_s_wall"]  # workers deliver batches in bursts: a median would mislead
    return r


class PlainLoop:
    """The naive loop: requires_grad=False on the frozen part, everything in train mode, one AdamW group."""

    def __init__(self, make_model, phase, n_unfreeze, samples, spec, batch_size, workers, **_):
        model = make_model()
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        if phase == "B":
            for block in model.blocks[len(model.blocks) - n_unfreeze:]:
                for m in block:
                    for p in m.parameters():
                        p.requires_grad_(True)
        for p in model.head.parameters():
            p.requires_grad_(True)
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[phase],
                                           weight_decay=WEIGHT_DECAY)
        self.criterion = torch.nn.CrossEntropyLoss()
        _, self.loader = make_loader(samples, spec, batch_size, workers)

    def run_pass(self, epoch: int) -> tuple[float, list[float]]:
        model, optimizer, criterion = self.model, self.optimizer, self.criterion
        model.train()
        stamps = []
        t0 = time.perf_counter()
        for x, y in self.loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            stamps.append(time.perf_counter())
        return t0, stamps

    def close(self):
        pass


class TrainerStep:
    """Run.run_phase's setup, then one train_one_epoch per pass, with the train split cut to one pass."""

    def __init__(self, make_model, phase, n_unfreeze, samples, spec, batch_size, workers, *, acc, num_classes,
                 passes):
        from xray.train.phases import param_groups, set_trainable, warmup_cosine

        self.acc, self.phase = acc, phase
        torch.manual_seed(SEED)
        model = make_model()
        self.unfrozen = set_trainable(model, phase, n_unfreeze)
        optimizer = torch.optim.AdamW(param_groups(model, LR[phase], LR[phase] * BACKBONE_LR_FACTOR, WEIGHT_DECAY))
        self.train_ds, train_loader = make_loader(samples, spec, batch_size, workers)
        total = len(train_loader) * passes
        scheduler = warmup_cosine(optimizer, round(WARMUP_FRAC * total), total)
        self.criterion = torch.nn.CrossEntropyLoss(weight=class_weights(samples, num_classes).to(acc.device))
        self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(model, optimizer, train_loader,
                                                                              scheduler)
        self.raw_model = acc.unwrap_model(self.model)
        self.state = {"phase_index": 0, "epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": {},
                      "bad_epochs": 0, "history": []}

    def run_pass(self, epoch: int) -> tuple[float, list[float]]:
        from tqdm.auto import tqdm

        from xray.train.loop import train_one_epoch
        from xray.train.phases import set_train_mode

        self.loader.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        self.state.update(epoch=epoch, step_in_epoch=0)
        set_train_mode(self.raw_model, self.unfrozen)
        stamps = []
        bar = tqdm(total=len(self.loader), disable=True)  # run_phase passes a bar; set_postfix costs a loss.item()
        t0 = time.perf_counter()  # the values Run.run_phase passes on the default path (no --cache-features)
        train_one_epoch(self.acc, self.model, self.loader, self.optimizer, self.scheduler, self.criterion,
                        mode="frozen" if self.phase == "A" else "full", seed=SEED, clip_grad=CLIP_GRAD,
                        state=self.state, sums=torch.zeros(3, dtype=torch.float64),
                        on_step=lambda: stamps.append(time.perf_counter()), progress=bar)
        bar.close()
        return t0, stamps

    def close(self):
        del self.model, self.optimizer, self.loader, self.scheduler, self.raw_model
        self.acc.free_memory()


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bench_pair(acc, make_model, phase, n_unfreeze, samples, spec, batch_size, workers, warmup, rounds, num_classes):
    """Plain loop and trainer in rounds, ABBA (plain, trainer | trainer, plain | ...), each pass with its own
    warm-up batches; a load burst from elsewhere then rarely hits only one side."""
    args = dict(make_model=make_model, phase=phase, n_unfreeze=n_unfreeze, samples=samples, spec=spec,
                batch_size=batch_size, workers=workers)
    runners = {"plain": PlainLoop(**args),
               "trainer": TrainerStep(**args, acc=acc, num_classes=num_classes, passes=rounds)}
    steps = {"plain": [], "trainer": []}
    per_round = {"plain": [], "trainer": []}
    try:
        for r in range(rounds):
            for which in (("plain", "trainer") if r % 2 == 0 else ("trainer", "plain")):
                t0, stamps = runners[which].run_pass(r)
                s = timed_steps(t0, stamps, warmup)
                steps[which] += s
                per_round[which].append(round(len(s) * batch_size / sum(s), 3))
                log(f"  round {r + 1} {which}: {len(s) * batch_size / sum(s):.2f} img/s; "
                    f"batches {[round(x, 2) for x in s]} s")
        out = {}
        for which in ("plain", "trainer"):
            out[which] = summarize(steps[which], batch_size)
            out[which]["images_per_s"] = out[which]["images_per_s_median"]
            out[which]["per_round_images_per_s_wall"] = per_round[which]
        out["plain"]["trainable_params"] = trainable(runners["plain"].model)
        out["trainer"]["trainable_params"] = trainable(runners["trainer"].raw_model)
        return out
    finally:
        for runner in runners.values():
            runner.close()


# ---- report -------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# Training throughput, {cfg['image_size']} px, batch {cfg['batch_size']}, "
             f"{cfg['threads']} torch threads, {cfg['workers']} loader workers in the training runs",
             "",
             "img/s = batch size / median timed batch time; the last column is the same ratio from total wall "
             "times, which batches stalled by other processes on a shared CPU can swing.",
             "",
             "| model | phase | plain loop img/s | trainer img/s | ratio (trainer / plain) | ratio, wall time |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results["training"]:
        lines.append(f"| {r['model']} | {r['phase']} | {r['plain']['images_per_s']:.2f} | "
                     f"{r['trainer']['images_per_s']:.2f} | {r['ratio_trainer_over_plain']:.2f} | "
                     f"{r['ratio_wall']:.2f} |")
    lines += ["", f"Data loader alone (XrayDataset + train augmentation + DataLoader, no model, "
                  f"{results['loader_spec_model']}'s preprocessing):", "",
              "| loader workers | img/s (wall time) |", "|---:|---:|"]
    for w, r in results["loader"].items():
        lines.append(f"| {w} | {r['images_per_s']:.1f} |")
    ws = list(results["loader"])
    lines += ["", "Loader alone vs the trainer's step (> 1: the loader is faster than the model consumes):", "",
              "| model | phase | trainer img/s | " + " | ".join(f"loader w={w} / trainer" for w in ws) + " |",
              "|---|---|---:|" + "---:|" * len(ws)]
    for r in results["training"]:
        t = r["trainer"]["images_per_s"]
        lines.append(f"| {r['model']} | {r['phase']} | {t:.2f} | "
                     + " | ".join(f"{results['loader'][w]['images_per_s'] / t:.1f}" for w in ws) + " |")
    lines += ["", "Notes:"] + [f"- {n}" for n in results["notes"] if n]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--models", default="efficientnet_lite0,efficientnet_b0", show_default=True,
              help=f"Comma-separated, from: {', '.join(REGISTRY)}.")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(32, 1024))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--batches", default=8, show_default=True, type=click.IntRange(1),
              help="Timed batches per measurement (split over the rounds).")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0),
              help="Untimed batches at the start of every pass.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1),
              help="Passes per training measurement, plain and trainer alternating ABBA (1: one pass each).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1), help="torch.set_num_threads.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
              help="DataLoader workers for the training runs (the trainer's default); the loader alone is "
                   "measured with 0 and this many.")
@click.option("--phases", default="A,B", show_default=True, help="A, B or A,B.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Reuse an existing split (its train/ is read); default: generate synthetic images in a temp folder.")
@click.option("--tune-malloc/--no-tune-malloc", default=True, show_default=True,
              help="Keep freed memory in the process (xray.train.perf.tune_malloc), as train/main.py does.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@exit_on_user_error
def main(models, image_size, batch_size, batches, warmup, rounds, threads, workers, phases, data_dir, tune_malloc,
         json_path):
    """Images/s of the trainer's step vs a plain PyTorch loop (phases A and B), and of the data loader alone."""
    malloc_tuned = apply_malloc_tuning() if tune_malloc else False
    names = [m.strip() for m in models.split(",") if m.strip()]
    for n in names:
        get_model_def(n)
    phase_list = [p.strip().upper() for p in phases.split(",") if p.strip()]
    if not phase_list or any(p not in ("A", "B") for p in phase_list):
        raise XrayError(f"--phases must be A, B or A,B; got {phases!r}")
    torch.set_num_threads(threads)
    rounds = min(rounds, batches)
    per_pass = math.ceil(batches / rounds)  # timed batches per pass
    pass_images = (warmup + per_pass) * batch_size
    n_images = max(pass_images, (warmup + batches) * batch_size)  # the loader-only pass is one long pass
    started = time.perf_counter()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        notes = []
        if data_dir is None:
            # the 70 % train split holds every batch once; 40 a class so every split gets patients
            per_class = max(40, math.ceil(n_images / (3 * 0.7)) + 4)
            log(f"generating {3 * per_class} synthetic images (256 px) in {tmp} ...")
            root = make_data(Path(tmp), per_class)
            notes.append(f"data: {3 * per_class} synthetic images (make_synthetic.py --per-class {per_class} "
                         "--size 256, split_dataset.py), train split read")
        else:
            root = Path(data_dir)
            notes.append(f"data: train split of {root}")
        classes, all_samples = scan_split(root / "train")
        samples = take(all_samples, pass_images)
        if len(all_samples) < n_images:
            notes.append(f"the train split has {len(all_samples)} images: cycled to {n_images}")

        results = {"config": {"models": names, "phases": phase_list, "image_size": image_size,
                              "batch_size": batch_size, "batches": batches, "warmup": warmup, "rounds": rounds,
                              "timed_batches_per_pass": per_pass, "threads": threads, "workers": workers,
                              "data_dir": data_dir},
                   "environment": {"torch": torch.__version__,
                                   "malloc_tuned": malloc_tuned,
                                   "python": platform.python_version(),
                                   "cpu_count": os.cpu_count(), "machine": platform.machine()},
                   "loader": {}, "training": [], "notes": notes}

        # the loader alone: its cost is the same for every model here (same size, resize and augmentation)
        spec0 = get_model_def(names[0]).spec.with_size(image_size)
        results["loader_spec_model"] = names[0]
        for w in sorted({0, workers}):
            log(f"loader only, {w} workers ...")
            results["loader"][str(w)] = bench_loader(take(all_samples, (warmup + batches) * batch_size), spec0,
                                                     batch_size, w, warmup)
            log(f"  {results['loader'][str(w)]['images_per_s']:.1f} img/s")

        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        torch.set_num_threads(threads)
        try:
            for name in names:
                d = get_model_def(name)
                spec = d.spec.with_size(image_size)
                # ImageNet weights where they exist offline (Lite0's ship in a pip package); B0 is built
                # untrained as the issue asks, anything else falls back to untrained when offline
                pretrained = d.pretrained_available and name != "efficientnet_b0"
                if pretrained:
                    try:
                        build_model(name, len(classes), pretrained=True)
                    except XrayError as e:
                        log(f"{name}: {e}")
                        pretrained = False
                if not pretrained:
                    notes.append(f"{name}: built with build_model({name!r}, {len(classes)}, pretrained=False) "
                                 "(no offline ImageNet weights); throughput does not depend on the weight values")
                else:
                    notes.append(f"{name}: ImageNet weights (available offline)")

                def make_model(name=name, pretrained=pretrained):
                    return build_model(name, len(classes), pretrained=pretrained)

                for phase in phase_list:
                    log(f"{name} phase {phase}: plain loop vs trainer, {rounds} round(s) ...")
                    row = {"model": name, "phase": phase, "pretrained": pretrained,
                           "unfreeze_blocks": d.unfreeze_blocks if phase == "B" else 0}
                    row.update(bench_pair(acc, make_model, phase, d.unfreeze_blocks, samples, spec, batch_size,
                                          workers, warmup, rounds, len(classes)))
                    row["ratio_trainer_over_plain"] = row["trainer"]["images_per_s"] / row["plain"]["images_per_s"]
                    row["ratio_wall"] = row["trainer"]["images_per_s_wall"] / row["plain"]["images_per_s_wall"]
                    log(f"  plain {row['plain']['images_per_s']:.2f} img/s, trainer "
                        f"{row['trainer']['images_per_s']:.2f} img/s (median batch): "
                        f"ratio {row['ratio_trainer_over_plain']:.2f}")
                    results["training"].append(row)
        finally:
            acc.end_training()

    load_after = os.getloadavg()
    total = time.perf_counter() - started
    timed = rounds * per_pass
    notes += [f"training: {rounds} round(s) per model and phase, plain and trainer alternating "
              f"({'ABBA' if rounds > 1 else 'plain first'}), each pass {warmup} warm-up + {per_pass} timed batches "
              f"of {batch_size} ({timed} timed batches per measurement); both paths read the real XrayDataset with "
              f"augmentation through a DataLoader with {workers} workers; the model persists across its passes",
              f"loader alone: {warmup} warm-up + {batches} timed batches, one pass per worker count",
              "loader CPU cost at the trainer's rate: about {:.0%} of one core at most "
              "(trainer img/s / single-process loader img/s)".format(max(
                  r["trainer"]["images_per_s"] for r in results["training"]) / results["loader"]["0"]["images_per_s"])
              if results["training"] and "0" in results["loader"] else "",
              "plain loop: requires_grad=False on the frozen part, model.train() everywhere (frozen BatchNorm in "
              "train mode), one AdamW group, no clipping/scheduler; trainer: set_trainable + set_train_mode "
              "(frozen BatchNorm in eval mode) + param_groups + warmup_cosine + clip_grad 1.0 + class weights + "
              "train_one_epoch (no-grad frozen backbone in phase A) on accelerate-prepared objects",
              "glibc malloc: " + ("freed memory kept in the process (tune_malloc), as in train/main.py"
                                  if malloc_tuned else "defaults (--no-tune-malloc)"),
              f"1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
              f"(on {os.cpu_count()} CPUs; above the thread count means other processes shared the CPU)",
              f"total benchmark time {total:.0f} s"]
    results["environment"].update(loadavg_before=load_before, loadavg_after=load_after, total_seconds=total)
    print(markdown(results))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
        print(f"\nresults: {json_path}")


if __name__ == "__main__":
    main()
