#!/usr/bin/env python
"""Two-phase transfer learning for chest X-rays.

    accelerate launch train/main.py --data-dir data --model efficientnet_lite0
    python train/main.py ...                                   # the same, one process
    accelerate launch --multi_gpu --num_processes 2 train/main.py ...   # 2 CPU processes (gloo)

Phase A trains a new head on the frozen pretrained backbone; phase B starts from phase A's best
checkpoint with the last N blocks unfrozen at a lower learning rate. Outputs go to runs/<run>/.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import click
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from xray.common.cli_config import config_option, save_config
from xray.common.errors import XrayError, exit_on_user_error
from xray.train.augment import AugmentConfig
from xray.train.checkpoint import load_weights_into, read_sidecar, save_checkpoint
from xray.train.data import XrayDataset, class_weights, oversample, scan_split
from xray.train.loop import Throughput, evaluate, extract_features, train_one_epoch
from xray.train.models import REGISTRY, build_model, get_model_def
from xray.train.perf import tune_malloc
from xray.train.phases import param_groups, set_train_mode, set_trainable, warmup_cosine
from xray.train.report import save_plots, test_metrics, write_history, write_metrics
from xray.train.tracking import PROJECT, TRACKERS, make_trackers, preflight, save_mlflow_run, saved_mlflow_run

STATE_FILE = "trainer_state.json"


def parse_unfreeze(value: str):
    if value in (None, "", "default"):
        return None
    if value == "all":
        return "all"
    try:
        n = int(value)
    except ValueError:
        raise XrayError(f"--unfreeze-blocks must be a number, 'all' or 'default', got {value!r}") from None
    if n < 0:
        raise XrayError("--unfreeze-blocks must be >= 0")
    return n


def make_accelerator(grad_accum: int, output_dir: str) -> Accelerator:
    # Without cpu=True on a GPU-less box, `--multi_gpu` ranks would not form a gloo group.
    # The trackers (--report-to) are added once the run folder is known (start_tracking).
    acc = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=grad_accum,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                      project_config=ProjectConfiguration(project_dir=output_dir))
    if acc.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // acc.num_processes))
    return acc


def make_criterion(cfg: dict, weights: torch.Tensor | None, device="cpu") -> torch.nn.CrossEntropyLoss:
    """Cross-entropy with the run's class weights and --label-smoothing."""
    return torch.nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                     label_smoothing=cfg["label_smoothing"])


def better(a: dict, b: dict | None) -> bool:
    """Best by val macro-F1, ties by lower val loss."""
    return b is None or (a["macro_f1"], -a["loss"]) > (b["macro_f1"], -b["loss"])


class Run:
    """Everything one training run needs; phases run in order, state survives in last/."""

    def __init__(self, acc: Accelerator, cfg: dict, run_dir: Path, state: dict | None):
        self.acc, self.cfg, self.run_dir = acc, cfg, run_dir
        self.main = acc.is_main_process
        data = Path(cfg["data_dir"])
        self.classes, self.train_samples = scan_split(data / "train")
        _, self.val_samples = scan_split(data / "val", self.classes)
        _, self.test_samples = scan_split(data / "test", self.classes)
        self.model_def = get_model_def(cfg["model"])
        spec = self.model_def.spec
        self.spec = spec.with_size(cfg["image_size"]) if cfg["image_size"] else spec
        self.unfreeze = cfg["unfreeze_blocks"] if cfg["unfreeze_blocks"] is not None else self.model_def.unfreeze_blocks
        self.state = state or {"phase_index": 0, "epoch": 0, "step_in_epoch": 0, "global_step": 0,
                               "best": {}, "bad_epochs": 0, "history": []}
        self.live_sums = None  # this rank's (loss sum, correct, seen) of the epoch in progress
        self.weights = class_weights(self.train_samples, len(self.classes)) if cfg["class_weights"] else None
        self.oversampled = None
        if cfg.get("oversample"):  # after the class weights: hard examples add emphasis, not a new class balance
            self.train_samples, found, ignored = oversample(self.train_samples, cfg["oversample"],
                                                            cfg["oversample_factor"])
            self.oversampled = (found, ignored)

    # ---- data -------------------------------------------------------------------------------
    def loader(self, samples, train: bool):
        aug = AugmentConfig(hflip=self.cfg["hflip"]) if train and self.cfg["augment"] else None
        ds = XrayDataset(samples, self.spec, aug, seed=self.cfg["seed"])
        return ds, DataLoader(ds, batch_size=self.cfg["batch_size"], shuffle=train, num_workers=self.cfg["workers"],
                              generator=torch.Generator().manual_seed(self.cfg["seed"]), drop_last=False)

    # ---- checkpoints --------------------------------------------------------------------------
    def meta(self, phase: str, epoch: int, val: dict | None) -> dict:
        return {"model_name": self.cfg["model"], "classes": self.classes, "image_spec": self.spec.to_dict(),
                "phase": phase, "epoch": epoch, "num_classes": len(self.classes),
                "val_metrics": val, "config": self.cfg,
                "created": datetime.now().isoformat(timespec="seconds")}

    def save_last(self):
        """accelerate state + our trainer state into last/, swapped in only when complete."""
        tmp, last, old = self.run_dir / "last.tmp", self.run_dir / "last", self.run_dir / "last.old"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        partial = None
        if self.live_sums is not None and self.state["step_in_epoch"]:
            partial = self.acc.reduce(self.live_sums.clone().to(self.acc.device), "sum").cpu().tolist()
        self.state["partial_sums"] = partial
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        if self.main:
            (tmp / STATE_FILE).write_text(json.dumps(self.state, indent=1))
            shutil.rmtree(old, ignore_errors=True)
            if last.exists():
                os.replace(last, old)
            os.replace(tmp, last)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def init_path(self, phase: str) -> Path | None:
        """Phase B starts from phase A's best of this run, else from --init; --init may seed phase A too."""
        if phase == "B" and (self.run_dir / "phaseA_best.safetensors").exists():
            return self.run_dir / "phaseA_best.safetensors"
        if self.cfg["init"]:
            path = Path(self.cfg["init"])
            return path / "best.safetensors" if path.is_dir() else path
        return None

    def build(self, phase: str):
        """The phase's starting model: from a checkpoint when there is one, else ImageNet (or scratch)."""
        path = self.init_path(phase)
        if path is None:
            return build_model(self.cfg["model"], len(self.classes), pretrained=self.cfg["pretrained"],
                               weights=self.cfg["weights"])
        meta = read_sidecar(path)
        if meta["model_name"] != self.cfg["model"] or meta["classes"] != self.classes:
            raise XrayError(f"--init {path}: checkpoint is {meta['model_name']} with classes {meta['classes']}, "
                            f"this run is {self.cfg['model']} with {self.classes}")
        model = build_model(self.cfg["model"], len(self.classes), pretrained=False)
        load_weights_into(model, path, meta)
        self.print(f"phase {phase}: starting from {path}")
        return model

    def print(self, *args):
        if self.main:
            tqdm.write(" ".join(str(a) for a in args))

    # ---- phases -------------------------------------------------------------------------------
    def run_phase(self, phase: str, resume: bool):
        cfg, acc = self.cfg, self.acc
        p = cfg["phase_" + phase.lower()]
        set_seed(cfg["seed"])
        model = self.build(phase)
        unfrozen = set_trainable(model, phase, self.unfreeze)
        trainable = sum(p_.numel() for p_ in model.parameters() if p_.requires_grad)
        self.print(f"\nphase {phase}: {len(unfrozen)}/{len(model.blocks)} backbone blocks unfrozen, "
                   f"{trainable:,} trainable parameters, {p['epochs']} epochs, lr {p['lr']:g}")
        optimizer = torch.optim.AdamW(param_groups(model, p["lr"], p["lr"] * cfg["backbone_lr_factor"],
                                                   p["weight_decay"]))
        train_ds, train_loader = self.loader(self.train_samples, train=True)
        _, val_loader = self.loader(self.val_samples, train=False)
        steps_per_epoch = math.ceil(len(train_loader) / cfg["grad_accum"])
        total = steps_per_epoch * p["epochs"]
        scheduler = warmup_cosine(optimizer, round(cfg["warmup_frac"] * total), total)
        criterion = make_criterion(cfg, self.weights, acc.device)
        model, optimizer, train_loader, val_loader, scheduler = acc.prepare(
            model, optimizer, train_loader, val_loader, scheduler)
        if resume:
            acc.load_state(str(self.run_dir / "last"))
        else:
            self.state.update(epoch=0, step_in_epoch=0, bad_epochs=0)
        raw_model = acc.unwrap_model(model)
        mode = "frozen" if phase == "A" else "full"
        if phase == "A" and cfg["cache_features"]:
            train_ds, train_loader = self.cached_feature_loader(raw_model)
            mode = "features"
        checkpoint_every = cfg["checkpoint_every"]

        def on_step():
            if checkpoint_every and self.state["global_step"] % checkpoint_every == 0 and acc.sync_gradients:
                self.save_last()

        while self.state["epoch"] < p["epochs"]:
            epoch = self.state["epoch"]
            train_loader.set_epoch(epoch)
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)
            skip = self.state["step_in_epoch"]
            loader = acc.skip_first_batches(train_loader, skip) if skip else train_loader
            set_train_mode(raw_model, unfrozen, bn_stats_frozen=cfg["pretrained"] and not cfg.get("bn_train", False))
            bar = tqdm(total=len(train_loader), initial=skip, desc=f"phase {phase} epoch {epoch + 1}/{p['epochs']}",
                       unit="batch", disable=True if not acc.is_local_main_process else None, leave=False)
            timer = Throughput()
            carried = self.state.get("partial_sums") if skip else None  # totals before a mid-epoch resume
            self.live_sums = torch.tensor(carried if carried and self.main else [0.0, 0.0, 0.0], dtype=torch.float64)
            tr_loss, tr_acc, seen = train_one_epoch(acc, model, loader, optimizer, scheduler, criterion, mode=mode,
                                                    seed=cfg["seed"], clip_grad=cfg["clip_grad"], state=self.state,
                                                    sums=self.live_sums, on_step=on_step, progress=bar)
            self.live_sums = None
            seconds, ips = timer.rate(seen - (int(carried[2]) if carried else 0))
            bar.close()
            val, _, _ = evaluate(acc, model, val_loader, self.classes)
            lrs = {g.get("name", ""): g["lr"] for g in optimizer.param_groups}
            row = {"phase": phase, "epoch": epoch + 1, "train_loss": round(tr_loss, 6),
                   "train_accuracy": round(tr_acc, 6), "val_loss": round(val["loss"], 6),
                   "val_accuracy": round(val["accuracy"], 6), "val_macro_f1": round(val["macro_f1"], 6),
                   "lr_head": lrs.get("head", ""), "lr_backbone": lrs.get("backbone", ""),
                   "seconds": round(seconds, 2), "images_per_s": round(ips, 1)}
            self.state["history"].append(row)
            summary = {"macro_f1": val["macro_f1"], "loss": val["loss"], "accuracy": val["accuracy"], "epoch": epoch + 1}
            improved = better(summary, self.state["best"].get(phase))
            if improved:
                self.state["best"][phase] = summary
                self.state["bad_epochs"] = 0
                if self.main:
                    save_checkpoint(self.run_dir / f"phase{phase}_best.safetensors", raw_model,
                                    self.meta(phase, epoch + 1, val))
                if better(summary, self.state["best"].get("overall")):
                    self.state["best"]["overall"] = {**summary, "phase": phase}
                    if self.main:
                        save_checkpoint(self.run_dir / "best.safetensors", raw_model, self.meta(phase, epoch + 1, val))
            else:
                self.state["bad_epochs"] += 1
            self.print(f"phase {phase} epoch {epoch + 1}: train loss {tr_loss:.4f} acc {tr_acc:.3f} | val loss "
                       f"{val['loss']:.4f} acc {val['accuracy']:.3f} macro-F1 {val['macro_f1']:.4f}"
                       f"{' *' if improved else ''} | {ips:.1f} img/s")
            self.state.update(epoch=epoch + 1, step_in_epoch=0)
            stop = cfg["patience"] and self.state["bad_epochs"] >= cfg["patience"]
            if stop:
                self.state["epoch"] = p["epochs"]
                self.print(f"phase {phase}: early stop, no val macro-F1 gain for {cfg['patience']} epochs")
            if self.main:
                write_history(self.run_dir, self.state["history"])
            acc.log({f"{phase}/{k}": v for k, v in row.items() if isinstance(v, (int, float))},
                    step=len(self.state["history"]))
            self.save_last()
        acc.free_memory()

    def cached_feature_loader(self, raw_model):
        """Phase A with --cache-features: the frozen backbone runs once over the (unaugmented) train
        split; the epochs then train the head on the stored features."""
        _, plain = self.loader(self.train_samples, train=False)
        timer = Throughput()
        feats, labels = extract_features(self.acc, raw_model.backbone, self.acc.prepare(plain))
        seconds, ips = timer.rate(len(labels))
        self.print(f"phase A: cached {tuple(feats.shape)} backbone features in {seconds:.1f} s ({ips:.1f} img/s)")
        ds = TensorDataset(feats, labels)
        loader = DataLoader(ds, batch_size=self.cfg["batch_size"], shuffle=True,
                            generator=torch.Generator().manual_seed(self.cfg["seed"]))
        return ds, self.acc.prepare(loader)

    def final_test(self):
        model = build_model(self.cfg["model"], len(self.classes), pretrained=False)
        best = self.run_dir / "best.safetensors"
        meta = read_sidecar(best)
        load_weights_into(model, best, meta)
        _, test_loader = self.loader(self.test_samples, train=False)
        model, test_loader = self.acc.prepare(model, test_loader)
        metrics, probs, labels = evaluate(self.acc, model, test_loader, self.classes)
        if self.main:
            metrics = test_metrics(metrics, probs, labels, self.classes)
            metrics["world_size"] = self.acc.num_processes
            checkpoint = {k: meta[k] for k in ("model_name", "phase", "epoch")} | {"path": str(best)}
            text = write_metrics(self.run_dir, metrics, checkpoint)
            save_plots(self.run_dir, self.state["history"], metrics)
            self.print("\n" + text)
            self.print(f"run: {self.run_dir}  (best.safetensors, metrics.json, history.csv, plots/, summary.md)")
        self.acc.free_memory()


def phase_options(f):
    for ph, epochs, lr in (("b", 5, 3e-4), ("a", 5, 1e-3)):
        f = click.option(f"--epochs-{ph}", default=epochs, show_default=True, type=click.IntRange(0))(f)
        f = click.option(f"--lr-{ph}", default=lr, show_default=True, type=float, help=f"Head LR in phase {ph.upper()}.")(f)
        f = click.option(f"--weight-decay-{ph}", default=1e-4, show_default=True, type=float)(f)
    return f


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("--data-dir", type=click.Path(file_okay=False), default="data", show_default=True,
              help="Folder with train/ val/ test/ class folders.")
@click.option("--model", "model_name", default="efficientnet_lite0", show_default=True,
              type=click.Choice(list(REGISTRY)))
@click.option("--image-size", type=click.IntRange(32, 1024), default=None, help="Input size (default: the model's).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Local ImageNet state dict for the backbone (loaded with weights_only=True).")
@click.option("--no-pretrained", is_flag=True, help="Random initialisation (no ImageNet weights).")
@click.option("--phases", default="A,B", show_default=True, help="A, B or A,B.")
@click.option("--init", "init_path", type=click.Path(), default=None,
              help="Start from this checkpoint (e.g. --phases B --init runs/x).")
@phase_options
@click.option("--unfreeze-blocks", default="default", show_default=True,
              help="Phase B: number of last backbone blocks to unfreeze, or 'all'.")
@click.option("--backbone-lr-factor", default=0.1, show_default=True, type=float,
              help="Phase B backbone LR = head LR x this (discriminative learning rates).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(1))
@click.option("--clip-grad", default=1.0, show_default=True, type=float, help="Max gradient norm (0: off).")
@click.option("--warmup-frac", default=0.1, show_default=True, type=click.FloatRange(0, 1))
@click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--no-class-weights", is_flag=True, help="Plain cross-entropy instead of inverse-frequency weights.")
@click.option("--no-augment", is_flag=True)
@click.option("--bn-train", is_flag=True,
              help="Phase B: let BatchNorm in unfrozen blocks re-estimate its statistics (default for a "
                   "pretrained backbone: keep ImageNet's; scratch models always re-estimate).")
@click.option("--cache-features", is_flag=True,
              help="Phase A: run the frozen backbone once and train the head on stored features (needs --no-augment).")
@click.option("--hflip", is_flag=True, help="Add horizontal flips (off by default: anatomy is not symmetric).")
@click.option("--patience", default=3, show_default=True, type=click.IntRange(0), help="Early stopping (0: off).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--output-dir", type=click.Path(file_okay=False), default="runs", show_default=True)
@click.option("--run-name", default=None, help="Default: <model>-<timestamp>.")
@click.option("--checkpoint-every", default=0, show_default=True, type=click.IntRange(0),
              help="Also save last/ every N optimizer steps (0: each epoch only).")
@click.option("--report-to", multiple=True, type=click.Choice([*TRACKERS, "none"]),
              help="Also log the config and every epoch through accelerate's trackers (repeatable; none: no "
                   "tracking, the default): tensorboard "
                   "(runs/<run>/tensorboard), mlflow (sqlite:///<output-dir>/mlflow.db unless MLFLOW_TRACKING_URI), "
                   "wandb (offline unless WANDB_MODE).")
@click.option("--oversample", type=click.Path(dir_okay=False),
              help="Hard-example mining: repeat the train images listed in this CSV (xray-eval's hard_examples.csv "
                   "from an evaluation of data/train; files outside the train split are ignored).")
@click.option("--oversample-factor", default=2, show_default=True, type=click.IntRange(2),
              help="Times each listed image appears per epoch.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the interrupted run in this folder.")
@exit_on_user_error
def main(**o):
    """Two-phase transfer learning (frozen backbone, then partial unfreeze)."""
    if "none" in o["report_to"]:  # --report-to none: say no tracking out loud (a config can set it too)
        if len(o["report_to"]) > 1:
            raise XrayError("--report-to none goes alone (it means no tracker)")
        o["report_to"] = ()
    tune_malloc()
    acc = make_accelerator(o["grad_accum"], o["output_dir"])
    try:
        train(acc, o)
    finally:
        acc.end_training()  # without it the process exit aborts about half the time on CPU


def config_from_options(o) -> dict:
    phases = [p.strip().upper() for p in o["phases"].split(",") if p.strip()]
    if not phases or any(p not in ("A", "B") for p in phases) or phases != sorted(set(phases)):
        raise XrayError(f"--phases must be A, B or A,B; got {o['phases']!r}")
    model_def = get_model_def(o["model_name"])
    if o["cache_features"] and not o["no_augment"]:
        raise XrayError("--cache-features needs --no-augment (augmented images differ every epoch)")
    if not model_def.pretrained_available and "A" in phases:
        raise XrayError(f"{o['model_name']} has no pretrained backbone to freeze: use --phases B "
                        "(with --unfreeze-blocks all for a from-scratch run)")
    return {"data_dir": o["data_dir"], "model": o["model_name"], "image_size": o["image_size"],
            "weights": o["weights"], "pretrained": not o["no_pretrained"] and model_def.pretrained_available,
            "phases": phases, "init": o["init_path"],
            "phase_a": {"epochs": o["epochs_a"], "lr": o["lr_a"], "weight_decay": o["weight_decay_a"]},
            "phase_b": {"epochs": o["epochs_b"], "lr": o["lr_b"], "weight_decay": o["weight_decay_b"]},
            "unfreeze_blocks": parse_unfreeze(o["unfreeze_blocks"]), "backbone_lr_factor": o["backbone_lr_factor"],
            "batch_size": o["batch_size"], "grad_accum": o["grad_accum"], "clip_grad": o["clip_grad"],
            "warmup_frac": o["warmup_frac"], "label_smoothing": o["label_smoothing"],
            "class_weights": not o["no_class_weights"], "augment": not o["no_augment"], "hflip": o["hflip"],
            "cache_features": o["cache_features"], "bn_train": o["bn_train"],
            "patience": o["patience"], "workers": o["workers"], "seed": o["seed"],
            "checkpoint_every": o["checkpoint_every"], "oversample": o["oversample"],
            "oversample_factor": o["oversample_factor"]}


def check_trackers(acc: Accelerator, o: dict):
    """Every --report-to tracker can start, checked on the main process before anything is trained; every rank
    gets the verdict (a rank left waiting for a collective would hang)."""
    problem = None
    if acc.is_main_process and o["report_to"]:
        try:
            preflight(o["report_to"], o["output_dir"])
        except XrayError as e:
            problem = str(e)
    if acc.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise XrayError(problem)


def start_tracking(acc: Accelerator, o: dict, cfg: dict, run_dir: Path, resumed: bool):
    """The trackers get the run's config; MLflow's run id goes to runs/<run>/mlflow.json (a resumed run goes on
    in the same MLflow run)."""
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    run_id = (saved_mlflow_run(run_dir) or {}).get("run_id") if resumed else None
    acc.log_with = make_trackers(o["report_to"], run_dir, o["output_dir"], run_id)
    flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in cfg.items()}
    problem = None
    try:
        acc.init_trackers(PROJECT, config=flat)  # the main process only
    except Exception as e:  # e.g. W&B online without a key: still before any training, in one line
        for tracker in acc.trackers:  # those that did start end here; end_training() must not meet half a tracker
            try:
                tracker.finish()
            except Exception:
                pass
        acc.trackers = []
        problem = f"--report-to: a tracker did not start: {' '.join(str(e).split())[:300]}"
    if acc.num_processes > 1:  # every rank learns it, or the others would wait at the next collective
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise XrayError(problem)
    if acc.is_main_process and "mlflow" in o["report_to"]:
        save_mlflow_run(acc, run_dir, o["output_dir"])


def train(acc: Accelerator, o: dict):
    state = None
    if o["resume_dir"]:
        run_dir = Path(o["resume_dir"])
        if not (run_dir / "config.json").exists():
            raise XrayError(f"--resume {run_dir}: not a run folder (no config.json)")
        saved = saved_mlflow_run(run_dir)
        if saved and "mlflow" in o["report_to"]:  # a resumed run goes on in the store it started in
            os.environ["MLFLOW_TRACKING_URI"] = saved["tracking_uri"]
    check_trackers(acc, o)
    if o["resume_dir"]:
        cfg = json.loads((run_dir / "config.json").read_text())
        if (run_dir / "last" / STATE_FILE).exists():
            state = json.loads((run_dir / "last" / STATE_FILE).read_text())
    else:
        cfg = config_from_options(o)
        if o["weights"] and not Path(o["weights"]).is_file():
            raise XrayError(f"--weights {o['weights']}: no such file")
        # The main process names the run and checks it is free; every rank gets its answer. Each rank checking
        # for itself races: a slow rank would find the config.json the main process has just written.
        name = o["run_name"] or f"{cfg['model']}-{datetime.now():%Y%m%d-%H%M%S}"
        decided = [name, (Path(o["output_dir"]) / name / "config.json").exists()]
        name, taken = broadcast_object_list(decided) if acc.num_processes > 1 else decided
        run_dir = Path(o["output_dir"]) / name
        if taken:
            raise XrayError(f"{run_dir} already holds a run: use --resume {run_dir} or another --run-name")
    run = Run(acc, cfg, run_dir, state)
    if o["report_to"]:  # before config.json: a tracker that fails here leaves no run behind to --resume
        start_tracking(acc, o, cfg, run_dir, resumed=state is not None)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        if not (run_dir / "config.yaml").exists():  # the options, for --config (a resumed run keeps its own)
            save_config(o, run_dir / "config.yaml", main, leave_out=("run_name", "output_dir", "resume_dir"))
        run.print(f"run {run_dir}: {cfg['model']}, classes {run.classes}, {len(run.train_samples)} train / "
                  f"{len(run.val_samples)} val / {len(run.test_samples)} test images, {acc.num_processes} process(es) "
                  f"on {acc.device.type}")
        if run.oversampled:
            found, ignored = run.oversampled
            run.print(f"oversample: {found} hard train images x{cfg['oversample_factor']}"
                      + (f"; {ignored} listed files are not in the train split (mine hard examples on data/train, "
                         "never on val/test): ignored" if ignored else ""))
    acc.wait_for_everyone()
    started = time.perf_counter()
    resume_index = run.state["phase_index"] if state else None  # the phase last/ was saved in
    for i, phase in enumerate(cfg["phases"]):
        if resume_index is not None and i < resume_index:
            continue
        run.state["phase_index"] = i
        run.run_phase(phase, resume=i == resume_index)
    if not (run_dir / "best.safetensors").exists():
        raise XrayError("no epoch was trained (all --epochs are 0); nothing to evaluate")
    run.final_test()
    run.print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
