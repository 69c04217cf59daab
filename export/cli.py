"""xray-export: best checkpoint -> verified fp32 and int8 ONNX models with a report.

Both models carry three outputs: logits, ood_score (with its threshold in the metadata) and cam.

Exit codes: 0 exported and verified; 1 the int8 model failed the gate (fp32 kept, int8 written as
model.int8.rejected.onnx) or fp32 parity failed (both written as *.rejected.onnx); 2 bad input.
"""
from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from xray.common.cli_config import config_option
from xray.common.errors import EXIT_FAILURE, XrayError, exit_on_user_error


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="A .safetensors checkpoint (default: RUN_DIR/best.safetensors).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Default: <run>/export.")
@click.option("--data-dir", help="Split folder (default: the data_dir the checkpoint was trained on).")
@click.option("--eval-split", default="test", show_default=True, help="test, val, or a folder of class folders.")
@click.option("--calibration-images", default=300, show_default=True, type=click.IntRange(1))
@click.option("--calibration-method", default="minmax", show_default=True, type=click.Choice(["minmax", "entropy", "percentile"]))
@click.option("--calibration-dir", type=click.Path(file_okay=False), help="Calibrate on this class-folder split instead of <data>/train.")
@click.option("--max-accuracy-drop", default=1.0, show_default=True, type=float, help="Points of accuracy int8 may lose.")
@click.option("--min-agreement", default=0.98, show_default=True, type=click.FloatRange(0, 1))
@click.option("--allow-drop", is_flag=True, help="Keep an int8 model that fails the gate (loud warning in the report).")
@click.option("--parity-tolerance", default=1e-3, show_default=True, type=float, help="Max |logit| difference PyTorch vs fp32 ONNX.")
@click.option("--threads", default=os.cpu_count() or 1, show_default=True, type=click.IntRange(1))
@click.option("--latency-runs", default=30, show_default=True, type=click.IntRange(1))
@click.option("--bias-correction-images", default=64, show_default=True, type=click.IntRange(0),
              help="Sequential bias correction of the int8 model on this many calibration images (0: off).")
@click.option("--gptq-images", default=64, show_default=True, type=click.IntRange(0),
              help="GPTQ: choose the int8 weights that minimise each layer's output error on this many calibration "
                   "images (0: plain round-to-nearest).")
@click.option("--ood-score", default="auto", show_default=True, type=click.Choice(["auto", "mahalanobis", "energy", "knn"]),
              help="The out-of-distribution score put into the graph; auto: the one that best separates the val split "
                   "from the probe sets (all three are compared in the report).")
@click.option("--ood-accept", default=0.95, show_default=True, type=click.FloatRange(0.5, 1.0, max_open=True),
              help="Share of in-distribution (val) images the guard's threshold accepts.")
@click.option("--ood-fit-images", default=2000, show_default=True, type=click.IntRange(2),
              help="Training-split images the OOD statistics are fitted on (stratified sample).")
@click.option("--probe-images", default=12, show_default=True, type=click.IntRange(1),
              help="Images per probe family (transformed eval images, generated non-radiographs).")
@click.option("--min-ood-agreement", default=0.98, show_default=True, type=click.FloatRange(0, 1),
              help="int8 gate: share of eval images + probes whose OOD decision matches PyTorch's.")
@click.option("--int8-full-range", is_flag=True,
              help="8-bit weights everywhere: right only on CPUs with VNNI, AMX or Arm (saturates AVX2 / AVX-512 "
                   "without VNNI, where the edge tools then refuse it). Default: 7-bit matrix weights, right on every CPU.")
@click.option("--emulated-images", default=16, show_default=True, type=click.IntRange(0),
              help="Eval images the int8 model also runs on emulated CPUs of other classes (qemu-user): AVX2 "
                   "(qemu-x86_64 -cpu Haswell), and Arm with --arm64-root (0: skip).")
@click.option("--arm64-root", type=click.Path(exists=True, file_okay=False, path_type=Path), envvar="XRAY_ARM64_ROOT",
              help="An arm64 root from scripts/arm64_root.sh ($XRAY_ARM64_ROOT): also verify on emulated Arm "
                   "(cortex-a72 without dot product, neoverse-n1 with it).")
@click.option("--no-calibrate", "calibrate", flag_value=False, default=True,
              help="Export T = 1 (uncalibrated probabilities). Default: the checkpoint's temperature, or one fitted "
                   "on the val split by minimum NLL, in both graphs.")
@click.option("--register", metavar="NAME",
              help="Log the export to the run's MLflow run (a run trained with --report-to mlflow) and, when it "
                   "passes its gate, register the export folder as a version of the model NAME. An int8 model that "
                   "failed the gate (--allow-drop) is left out: that version holds model.onnx only, tagged "
                   "xray.int8=rejected.")
@exit_on_user_error
def main(run_dir, checkpoint, output_dir, data_dir, eval_split, calibration_images, calibration_method, calibration_dir,
         max_accuracy_drop, min_agreement, allow_drop, parity_tolerance, threads, latency_runs, bias_correction_images,
         gptq_images, ood_score, ood_accept, ood_fit_images, probe_images, min_ood_agreement, int8_full_range,
         emulated_images, arm64_root, calibrate, register):
    """Export the best checkpoint of RUN_DIR to ONNX fp32 + int8 and verify both against PyTorch."""
    from .pipeline import ExportOptions, run_export  # heavy imports after --help

    if not run_dir and not checkpoint:
        raise XrayError("give a run folder (xray-export runs/<run>) or --checkpoint PATH")
    if run_dir and not Path(run_dir).is_dir():
        raise XrayError(f"{run_dir}: no such run folder")
    saved = None
    if register:  # before the export's minutes: the run has an MLflow run, MLflow is installed
        from .register import check_register

        saved = check_register(run_dir)
    ckpt = Path(checkpoint) if checkpoint else Path(run_dir) / "best.safetensors"
    out = Path(output_dir) if output_dir else (Path(run_dir) if run_dir else ckpt.parent) / "export"
    opts = ExportOptions(checkpoint=ckpt, output_dir=out, data_dir=data_dir, eval_split=eval_split,
                         calibration_images=calibration_images, calibration_method=calibration_method,
                         calibration_dir=calibration_dir, max_accuracy_drop=max_accuracy_drop,
                         min_agreement=min_agreement, allow_drop=allow_drop, parity_tolerance=parity_tolerance,
                         threads=threads, latency_runs=latency_runs, bias_correction_images=bias_correction_images,
                         gptq_images=gptq_images, ood_score=ood_score, ood_accept=ood_accept,
                         ood_fit_images=ood_fit_images, probe_images=probe_images, min_ood_agreement=min_ood_agreement,
                         int8_full_range=int8_full_range, emulated_images=emulated_images, arm64_root=arm64_root, calibrate=calibrate,
                         export_date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    ok = run_export(opts)
    if register:
        from .register import register_export

        registered = register_export(saved, out, register, ok)
        click.echo(registered.line, err=registered.version is None)
    sys.exit(0 if ok else EXIT_FAILURE)


if __name__ == "__main__":
    main()
