"""xray-infer: classify chest X-rays with an exported ONNX model; onnxruntime + numpy + PIL only, no torch."""
from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click

from xray.common.cli_config import config_option
from xray.common.errors import EXIT_FAILURE, EXIT_OK, XrayError, exit_on_user_error
from xray.common.imageio import DEFAULT_MAX_PIXELS

EPILOG = """\b
Model: --model (a file or an export folder), else $XRAY_MODEL, else the newest runs/*/export/ below
the current directory. From a folder holding both verified models, the faster one on this CPU: int8
with VNNI/AMX (or Arm dot product), else fp32 (--precision overrides). An int8 model runs only on the
CPU classes its export covers (every class for a default export): from a folder the tools fall back to
fp32, a file or --precision int8 is refused unless --force-int8. Classes and preprocessing come
from the model's metadata.
\b
Out-of-distribution guard (models from xray-export with it): ood / ood_score per image; a flagged
image gets a note on stderr. --ood-action abstain replaces its prediction with OUT_OF_DISTRIBUTION.
\b
--engine ray (the [ray] extra): the same model and decoding as a Ray Data job, on this machine or a
cluster (--ray-address), one Parquet row per input in the --output folder; re-running with the same
--output scores only what is not there yet (--resume-by).
\b
Exit codes: 0 every input was classified; 1 some inputs failed (each named on stderr, the others
are still in the output); 2 nothing could run (no inputs, bad model, bad option); 130 interrupted.
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@config_option
@click.argument("inputs", nargs=-1, metavar="IMAGE_OR_FOLDER...")
@click.option("--model", "-m", "model_path", metavar="PATH", type=click.Path(),
              help="ONNX model written by xray-export, or its export folder, or models:/NAME/VERSION (registered "
                   "by xray-export --register; needs MLflow and MLFLOW_TRACKING_URI).")
@click.option("--precision", type=click.Choice(["auto", "int8", "fp32"]), default="auto", show_default=True,
              help="Which model of an export folder: auto picks the faster one on this CPU.")
@click.option("--force-int8", is_flag=True,
              help="Run an int8 model even on a CPU its export does not cover (its answers may differ there).")
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json", "jsonl", "csv"]), default="table",
              show_default=True, help="Output format.")
@click.option("--top-k", type=click.IntRange(min=1), help="Show only the k most probable classes per image.")
@click.option("--output", "-o", type=click.Path(),
              help="Write the output to this file (replaced only when the run completes) instead of stdout. "
                   "--engine ray: the Parquet dataset folder (required).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="onnxruntime threads (0: all cores).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding threads running ahead of inference (default: one per core; 0: decode inline).")
@click.option("--eval", "evaluate", is_flag=True,
              help="Inputs are class folders (e.g. data/test/<CLASS>/...): also print accuracy, macro-F1, "
                   "per-class precision/recall/F1 and the confusion matrix.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse larger images from their header, before decoding (decompression bombs).")
@click.option("--ood-action", type=click.Choice(["flag", "abstain"]), default="flag", show_default=True,
              help="Images the out-of-distribution guard flags: flag (ood=true, prediction kept) or abstain "
                   "(prediction OUT_OF_DISTRIBUTION, with the reason).")
@click.option("--heatmap", "heatmap_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write one PNG per image to DIR: the image with the predicted class's activation map over it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process. ray: a Ray Data job (this machine, or --ray-address) writing a Parquet "
                   "dataset to --output; INPUT may also be @paths.txt, a CSV/Parquet manifest or a URI "
                   "(s3://, gs://, ...). Needs the [ray] extra.")
@click.option("--ray-address", metavar="ADDR", help="--engine ray: join this Ray cluster (default: $RAY_ADDRESS, "
                                                    "else Ray starts on this machine).")
@click.option("--actors", type=click.IntRange(min=1), help="--engine ray: model actors, each reading, decoding and "
                                                          "scoring with every core of its node (default: one per "
                                                          "node).")
@click.option("--threads-per-actor", type=click.IntRange(min=0), default=0, show_default=True,
              help="--engine ray: decoding threads and onnxruntime threads in each actor (0: its node's cores).")
@click.option("--resume-by", type=click.Choice(["path", "hash"]), default="path", show_default=True,
              help="--engine ray: an input already in --output is skipped when its path, size and modification "
                   "time match (path), or its content's sha256 (hash).")
@click.option("--path-column", default="path", show_default=True,
              help="--engine ray: the column of a CSV/Parquet manifest that holds the paths.")
@click.option("--part-rows", type=click.IntRange(min=1), default=1000, show_default=True,
              help="--engine ray: rows per Parquet part file (the most an interrupted job redoes).")
@exit_on_user_error
def main(inputs, model_path, precision, force_int8, fmt, top_k, output, threads, batch_size, workers, evaluate,
         max_pixels, ood_action, heatmap_dir, quiet, engine, ray_address, actors, threads_per_actor, resume_by,
         path_column, part_rows):
    """Classify chest X-ray images: files, folders (recursive), globs, or - to read paths from stdin.

    JPEG, PNG (8/16-bit, RGB(A), palette), TIFF, BMP, WebP, and DICOM (.dcm, needs the [dicom] extra).
    """
    from .formats import WRITERS, ood_reason
    from .inputs import collect_inputs
    from .model import cpu_count, open_model
    from .predict import Result, predict_files

    if not inputs:
        raise XrayError("no input: give image files, folders, globs, or - to read paths from stdin (see --help)")
    if engine == "ray":
        check_ray_options(output, fmt, top_k, evaluate, heatmap_dir, inputs, threads, workers)
        from .ray_engine import Options, run

        sys.exit(run(Options(inputs, output, model_path, precision, force_int8, ray_address, actors,
                             threads_per_actor, batch_size, max_pixels, ood_action, resume_by, path_column,
                             part_rows, quiet)))
    if output and Path(output).is_dir():
        raise XrayError(f"--output {output}: is a folder; give a file name (a folder is for --engine ray)")
    model, choice = open_model(model_path, precision, threads, force_int8)
    if choice.reason:
        click.echo(f"{'warning' if choice.forced else 'note'}: model {model.path} ({choice.reason})", err=True)
    if warning := model.runtime_warning():
        print(f"warning: {warning}", file=sys.stderr)
    for note in (model.portability_note(), model.guard_note()):
        if note:
            click.echo(f"note: {note}", err=True)
    if heatmap_dir and not model.has_cam:
        raise XrayError(f"--heatmap: {model.path.name} has no class activation maps (exported before they existed); "
                        "re-export it with xray-export")
    guard = model.info.ood if model.has_guard else None
    classes = model.info.classes
    paths, input_errors = collect_inputs(inputs, sys.stdin if "-" in inputs else None)
    if evaluate:
        labels = eval_labels(paths, classes)
    top_k = min(top_k, len(classes)) if top_k else None
    failed = 0
    results = []
    width = max((len(p) for p in paths), default=4)
    with open_output(output) as out:
        writer = WRITERS[fmt](out, classes, top_k, width, guard, ood_action)
        heatmaps = Heatmaps(heatmap_dir, model.info.spec, writer, model.info.cam_scale_value) if heatmap_dir else None
        writer.start(model_description(model))
        for arg, message in input_errors:
            failed += 1
            report_error(message)
            writer.row(Result(arg, error=message))
        stream = predict_files(model, paths, batch_size, cpu_count() if workers is None else workers, max_pixels,
                               cam=heatmaps is not None)
        with progress(len(paths), quiet or len(paths) <= batch_size) as bar, out_of_memory_is_one_line(batch_size):
            for result in stream:
                bar.update(1)
                if result.error:
                    failed += 1
                    report_error(result.error)
                elif result.ood:
                    click.echo(f"note: {result.path}: {ood_reason(result, guard)}", err=True)
                if heatmaps and result.probs is not None:
                    heatmaps.write(result, max_pixels)
                writer.row(result)
                if evaluate:
                    results.append(result)
        metrics = text = None
        if evaluate:
            temperature = float(model.info.verification.get("temperature") or 1.0)
            metrics, text = eval_metrics(results, labels, classes, temperature)
            if fmt in ("jsonl", "csv"):
                click.echo(text, err=True, nl=False)  # stdout stays machine-readable
        writer.finish(metrics, text)
    sys.exit(EXIT_FAILURE if failed else EXIT_OK)


def check_ray_options(output, fmt, top_k, evaluate, heatmap_dir, inputs, threads, workers):
    """--engine ray writes Parquet rows; what only the local engine does is refused in one line."""
    if not output:
        raise XrayError("--engine ray: give --output FOLDER (the Parquet dataset the rows go to)")
    if "://" in output:
        raise XrayError(f"--output {output}: --engine ray writes to a local folder (copy it to object storage after)")
    given = [name for name, value in (("--format", fmt != "table"), ("--top-k", top_k), ("--eval", evaluate),
                                      ("--heatmap", heatmap_dir), ("- (stdin)", "-" in inputs),
                                      ("--threads (use --threads-per-actor)", threads),
                                      ("--workers (use --threads-per-actor)", workers is not None)) if value]
    if given:
        raise XrayError(f"--engine ray: {', '.join(given)} only with --engine local (ray writes Parquet rows; "
                        "read them with pyarrow or pandas)")


@contextmanager
def out_of_memory_is_one_line(batch_size: int):
    """The machine ran out of memory (never an image's fault, so never a row's error): stop with one line that
    says what to lower, not a traceback. The rows written so far stay written."""
    try:
        yield
    except MemoryError:
        raise XrayError(f"out of memory while decoding or running a batch: lower --batch-size ({batch_size}) "
                        "or --workers", EXIT_FAILURE) from None


class Heatmaps:
    """--heatmap DIR: one overlay PNG per classified image, named <stem>.<prediction>_<probability>.png."""

    def __init__(self, folder, spec, writer, scale=None):
        """scale: the model's cam scale (xray.cam_scale); None, a model exported before it: maps scaled per image,
        said once."""
        from pathlib import Path

        from .heatmap import SCALE_NOTE_PER_IMAGE

        self.folder, self.spec, self.writer, self.scale, self.used = Path(folder), spec, writer, scale, set()
        self.folder.mkdir(parents=True, exist_ok=True)
        if scale is None:
            click.echo(f"warning: {SCALE_NOTE_PER_IMAGE}", err=True)

    def write(self, result, max_pixels):
        import numpy as np

        from xray.common.imageio import load_image

        from .heatmap import heatmap_name, write_heatmap

        rec = self.writer.record(result)
        best = int(np.argmax(result.probs))
        prob = rec["probability"]
        caption = f"{rec['prediction']} {prob:.2f}" if prob is not None else rec["prediction"]
        if rec.get("ood"):
            caption += " (not like the training data)" if prob is not None else ""
        name = heatmap_name(result.path, rec["prediction"], prob, self.used)
        image = load_image(result.path, max_pixels=max_pixels)
        write_heatmap(self.folder, name, image, result.cam[best], self.spec, caption, self.scale)


def report_error(message: str):
    click.echo(f"error: {message}", err=True)


@contextmanager
def open_output(path):
    """stdout, or a file that appears only once the run completes (never half-written)."""
    if not path:
        yield sys.stdout
        sys.stdout.flush()
        return
    from xray.common.artifacts import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        yield f


def progress(total: int, hidden: bool):
    if hidden or not sys.stderr.isatty():
        return nullcontext(_NoBar())
    return click.progressbar(length=total, label="classifying", file=sys.stderr, show_pos=True, show_eta=True)


class _NoBar:
    def update(self, n):
        pass


def model_description(model) -> dict:
    i = model.info
    return {"path": str(model.path), "model_name": i.model_name, "precision": i.precision, "classes": i.classes,
            "image_size": i.spec.input_size, "checkpoint_sha256": i.checkpoint_sha256, "export_date": i.export_date,
            **({"ood_guard": i.ood} if model.has_guard else {})}


def eval_labels(paths, classes) -> dict:
    """path -> class index from the class folder each file sits in; files outside one are not scored."""
    from .inputs import folder_label

    index = {c: k for k, c in enumerate(classes)}
    labels = {p: index[c] for p in paths if (c := folder_label(p, classes)) is not None}
    if paths and not labels:
        raise XrayError(f"--eval: no input is inside a folder named after a model class ({', '.join(classes)}); "
                        "give class folders such as data/test")
    if len(labels) < len(paths):
        click.echo(f"warning: --eval: {len(paths) - len(labels)} of {len(paths)} files are not in a class folder; "
                   "they are predicted but not scored", err=True)
    return labels


def eval_metrics(results, labels, classes, temperature: float = 1.0):
    """Classification metrics, and NLL / ECE of the model's probabilities before (T = 1) and after the
    temperature its export baked in: softmax(T * log p) gives the un-tempered probabilities back."""
    import numpy as np

    from xray.common.metrics import ECE_BINS, classification_metrics, expected_calibration_error, log_loss
    from xray.common.metrics import metrics_markdown, softmax

    rows = [r for r in results if r.probs is not None and r.path in labels]
    if not rows:
        return None, "--eval: no image could be scored\n"
    y_true = np.array([labels[r.path] for r in rows])
    probs = np.stack([r.probs for r in rows])
    metrics = classification_metrics(y_true, probs.argmax(1), classes)
    text = metrics_markdown(metrics, title=f"Evaluation ({len(rows)} images)")
    before = softmax(temperature * np.log(np.maximum(probs, 1e-30)))
    metrics["calibration"] = {"temperature": temperature, "ece_bins": ECE_BINS, **{
        name: {"nll": log_loss(y_true, p), "ece": expected_calibration_error(p, y_true, ECE_BINS)[0]}
        for name, p in (("before", before), ("after", probs))}}
    c = metrics["calibration"]
    text += (f"\nCalibration (temperature T = {temperature:.4f}, ECE over {ECE_BINS} bins): NLL "
             f"{c['before']['nll']:.4f} -> {c['after']['nll']:.4f}, ECE {c['before']['ece']:.4f} -> "
             f"{c['after']['ece']:.4f}" + (" (not calibrated: T = 1)" if temperature == 1.0 else "") + ".\n")
    guarded = [r.ood for r in rows if r.ood is not None]
    if guarded:  # every scored image is in distribution by construction: the guard should accept it
        metrics["ood_acceptance"] = 1.0 - sum(guarded) / len(guarded)
        text += (f"\nOut-of-distribution guard: {len(guarded) - sum(guarded)} of {len(guarded)} images accepted "
                 f"({metrics['ood_acceptance'] * 100:.1f}%), {sum(guarded)} flagged.\n")
    return metrics, text


if __name__ == "__main__":
    main()
