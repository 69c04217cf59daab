"""xray-eval: evaluate a checkpoint or an ONNX model on a class-folder split; metrics, plots, failure modes."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from xray.common.cli_config import config_option
from xray.common.errors import XrayError, exit_on_user_error


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.argument("model", metavar="MODEL")
@click.argument("data", nargs=-1, required=True, metavar="DATA")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Default: report/ next to the model (runs/<run>/report, runs/<run>/export/report).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0), help="0: all cores.")
@click.option("--low-margin", default=0.2, show_default=True, type=click.FloatRange(0, 1),
              help="hard_examples.csv also lists correct images whose top-1 minus top-2 probability is below this.")
@click.option("--per-pair", default=6, show_default=True, type=click.IntRange(1),
              help="Most confident failures shown per (true, predicted) pair.")
@click.option("--calibrate", is_flag=True,
              help="Fit temperature scaling on the val split and store T in the checkpoint sidecar "
                   "(xray-export then bakes it into the ONNX graph); the report shows NLL and ECE before/after.")
@click.option("--val-data", type=click.Path(file_okay=False), help="Split for --calibrate (default: DATA/../val).")
@click.option("--gradcam", "gradcam_only", is_flag=True,
              help="DATA are image files: only write their Grad-CAM heatmaps (gradcam.png; PyTorch checkpoints).")
@click.option("--split", default="test", show_default=True, help="With a manifest.csv as DATA: which split.")
@click.option("--no-embeddings", is_flag=True, help="Skip the t-SNE projection of penultimate features.")
@exit_on_user_error
def main(model, data, output_dir, batch_size, threads, low_margin, per_pair, calibrate, val_data, gradcam_only,
         split, no_embeddings):
    """Evaluate MODEL (a run folder, a .safetensors checkpoint or an exported .onnx) on DATA, a split of
    class folders (e.g. data/test), or data/manifest.csv with --split. Writes metrics.json, report.md, hard_examples.csv and PNG plots;
    for a checkpoint also Grad-CAM over the failures and a t-SNE of its features; for a model with the
    out-of-distribution guard (an exported ONNX model, or a run with export/model.onnx) its acceptance
    of DATA and how it separates DATA from each probe family (ood_histograms.png).

    \b
    xray-eval runs/<run> data/test
    xray-eval runs/<run>/export/model.int8.onnx data/test
    xray-eval runs/<run> --gradcam scan1.png scan2.dcm"""
    import numpy as np
    from tqdm import tqdm

    from xray.train.data import scan_split

    from . import explain, plots
    from .analysis import bootstrap_ci, evaluate, failures, hard_examples, per_source
    from .model_card import read_manifest, write_model_card
    from .backends import load_model, predict_logits
    from .guard import evaluate_guard
    from xray.common.metrics import ECE_BINS, softmax
    from .report import write_report

    loaded = load_model(model, threads)
    out = Path(output_dir) if output_dir else loaded.path.parent / "report"
    if gradcam_only:
        require_checkpoint(loaded, "--gradcam")
        out.mkdir(parents=True, exist_ok=True)
        click.echo(f"Grad-CAM: {explain.gradcam_files(loaded, list(data), out)}")
        return
    if len(data) != 1:
        raise XrayError("give one DATA split folder (or --gradcam with image files)")
    if data[0].endswith(".csv"):  # a manifest + --split: the split's folder is beside the manifest
        data_dir = Path(data[0]).parent / split
        samples = manifest_split(Path(data[0]), split, loaded.classes)
    else:
        data_dir = Path(data[0])
        _, samples = scan_split(data_dir, loaded.classes)
    files, labels = [s[0] for s in samples], np.array([s[1] for s in samples])
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(files), desc=f"evaluating ({loaded.kind})", unit="img", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        logits = predict_logits(loaded, files, batch_size, bar)
    calibration = None
    if calibrate:
        calibration = fit_and_store_temperature(loaded, Path(val_data) if val_data else data_dir.parent / "val",
                                                logits, labels, batch_size)
    probs = softmax(logits, loaded.temperature)
    m = evaluate(probs, labels, loaded.classes)
    m["temperature"] = loaded.effective_temperature
    m["temperature_source"] = (("baked into the ONNX graph by xray-export" if loaded.kind == "onnx"
                                else "fitted by xray-eval --calibrate") if m["temperature"] != 1.0 else "uncalibrated")
    from xray.train.calibration import before_after

    m["calibration_effect"] = {"ece_bins": ECE_BINS, **before_after(loaded.raw_logits(logits), labels, m["temperature"])}
    if calibration:
        m["calibration"] = calibration
    manifest_rows, sources = read_manifest(data_dir)
    m["per_source"] = per_source([str(Path(f).resolve()) for f in files], labels, probs.argmax(axis=1), sources)
    m["bootstrap_95ci"] = bootstrap_ci(labels, probs.argmax(axis=1), loaded.classes)
    guard = evaluate_guard(loaded, files, batch_size)
    if guard:
        m["ood_guard"] = {k: v for k, v in guard.items() if k != "scores"}
    fails = failures(files, probs, labels, loaded.classes, per_pair)
    hard = hard_examples(files, probs, labels, loaded.classes, low_margin)
    drawn = {"confusion_matrix.png": lambda p: plots.confusion_matrices(m["confusion_matrix"], loaded.classes, p),
             "roc_pr.png": lambda p: plots.roc_pr_curves(probs, labels, loaded.classes, m["average_precision"], p),
             "reliability.png": lambda p: plots.reliability_diagram(m["reliability"], m["ece"], p),
             "probability_histograms.png": lambda p: plots.probability_histograms(probs, labels, loaded.classes, p),
             "failures.png": lambda p: plots.failure_sheet(fails, p)}
    if guard:
        drawn["ood_histograms.png"] = lambda p: plots.ood_histograms(guard["scores"], guard["threshold"], p)
    if loaded.kind == "pytorch":
        drawn["failures_gradcam.png"] = lambda p: explain.failures_gradcam(loaded, fails, out)
        if not no_embeddings and len(files) >= 5:
            drawn["embeddings.png"] = lambda p: explain.embeddings(loaded, files, labels, probs, out, batch_size)
    for name, draw in drawn.items():
        (out / name).unlink(missing_ok=True)  # never show a stale plot from an earlier evaluation
        draw(out / name)
    drawn = [name for name in drawn if (out / name).exists()]  # failures_gradcam.png: none without failures
    np.savez_compressed(out / "probabilities.npz", probs=probs, labels=labels, files=np.array(files))
    text = write_report(out, m, loaded, data_dir, fails, hard, drawn)
    card = loaded.path.parent / "MODEL_CARD.md"
    write_model_card(card, loaded, data_dir, m, m["bootstrap_95ci"], manifest_rows, m["per_source"], fails)
    click.echo(text)
    click.echo(f"report: {out / 'report.md'}; model card: {card}", err=True)


def manifest_split(manifest: Path, split: str, classes) -> list[tuple[str, int]]:
    """(path, label) rows of one split of split_dataset.py's manifest.csv (paths relative to its folder)."""
    from xray.common.artifacts import read_csv

    if not manifest.is_file():
        raise XrayError(f"{manifest}: no such manifest")
    rows = [r for r in read_csv(manifest) if r.get("split") == split]
    if not rows:
        raise XrayError(f"{manifest}: no rows for split {split!r}")
    unknown = sorted({r["class"] for r in rows} - set(classes))
    if unknown:
        raise XrayError(f"{manifest}: split {split} has classes {unknown} the model does not know ({classes})")
    index = {c: i for i, c in enumerate(classes)}
    return [(str(manifest.parent / r["path"]), index[r["class"]]) for r in rows]


def require_checkpoint(loaded, option: str):
    if loaded.kind != "pytorch":
        raise XrayError(f"{option} needs the PyTorch checkpoint (a run folder or .safetensors), not {loaded.path.name}")


def fit_and_store_temperature(loaded, val_dir: Path, logits, labels, batch_size: int) -> dict:
    """Fit T on val, record it in the checkpoint sidecar, and measure NLL / ECE before and after."""
    import numpy as np

    from xray.train.calibration import before_after, fit_temperature
    from xray.train.checkpoint import set_temperature
    from xray.train.data import scan_split

    from .backends import predict_logits

    require_checkpoint(loaded, "--calibrate")
    _, val = scan_split(val_dir, loaded.classes)
    val_labels = np.array([label for _, label in val])
    val_logits = predict_logits(loaded, [path for path, _ in val], batch_size)
    t = fit_temperature(val_logits, val_labels)
    result = {"val_split": str(val_dir), "temperature": t, "previous_temperature": loaded.temperature,
              "val": before_after(val_logits, val_labels, t), "eval": before_after(logits, labels, t)}
    set_temperature(loaded.path, t)
    loaded.temperature = t
    click.echo(f"calibrate: T = {t:.4f} fitted on {len(val)} images of {val_dir}; stored in "
               f"{loaded.path.with_suffix('.json')} (re-run xray-export to bake it into the ONNX model)", err=True)
    return result


if __name__ == "__main__":
    main()
