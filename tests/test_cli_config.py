"""--config FILE (xray.common.cli_config) on a small click command with every kind of option the trainer has:
the file's values become defaults, the command line wins, a wrong key or value is one line and exit 2, and what
save_config writes reads back to the same options."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from xray.common.cli_config import config_option, save_config


@click.command()
@config_option
@click.option("--epochs-a", default=4, type=click.IntRange(0))
@click.option("--lr-a", default=1e-3, type=float)
@click.option("--model", "model_name", default="efficientnet_lite0", type=click.Choice(["efficientnet_lite0", "vit"]))
@click.option("--no-augment", is_flag=True)
@click.option("--report-to", multiple=True, type=click.Choice(["tensorboard", "mlflow", "wandb"]))
@click.option("--run-name", default=None)
def command(**options):
    click.echo(repr(sorted(options.items())))


def run(*args):
    return CliRunner().invoke(command, [str(a) for a in args])


def options(result) -> dict:
    assert result.exit_code == 0, result.output
    return dict(eval(result.output))


def test_the_file_sets_defaults_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs_a: 7\nlr_a: 3e-4\nmodel_name: vit\nno_augment: true\nreport_to: mlflow\n")
    got = options(run("--config", cfg))
    assert got == {"epochs_a": 7, "lr_a": 3e-4, "model_name": "vit", "no_augment": True, "report_to": ("mlflow",),
                   "run_name": None}  # YAML's "3e-4" is a string: click's float made it a number
    got = options(run("--epochs-a", 2, "--config", cfg, "--report-to", "wandb", "--report-to", "tensorboard"))
    assert got["epochs_a"] == 2 and got["report_to"] == ("wandb", "tensorboard") and got["model_name"] == "vit"


@pytest.mark.parametrize("text, words", [
    ("epochs: 3\n", "unknown key 'epochs'"),
    ("epochs_a: -1\n", "epochs_a: -1 is not in the range x>=0"),
    ("model_name: resnet\n", "model_name: 'resnet' is not one of"),
    ("no_augment: maybe\n", "no_augment: 'maybe' is not a valid boolean"),
    ("report_to: [mlflow, comet]\n", "report_to: 'comet' is not one of"),
    ("- a list\n", "expected 'option_name: value' lines, got a list"),
    ("epochs_a: [1\n", "--config"),
    ("config: other.yaml\n", "unknown key 'config'"),
])
def test_bad_files_are_one_line_naming_the_problem(tmp_path, text, words):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    result = run("--config", cfg)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --config"), result.output
    assert words in lines[0], lines[0]


def test_a_missing_file_is_one_line(tmp_path):
    result = run("--config", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and "nope.yaml" in result.output


def test_saved_options_read_back_to_the_same_options(tmp_path):
    got = options(run("--epochs-a", 9, "--report-to", "mlflow", "--report-to", "wandb", "--no-augment",
                      "--run-name", "first"))
    saved = tmp_path / "config.yaml"
    save_config(got, saved, leave_out=("run_name",), order=[p.name for p in command.params])
    text = saved.read_text()
    assert "run_name" not in text and text.index("epochs_a") < text.index("report_to")  # the command's order
    again = options(run("--config", saved, "--run-name", "second"))
    assert {**again, "run_name": "first"} == got


@pytest.mark.parametrize("cli", ["xray.export.cli", "xray.evaluate.cli"])
def test_export_and_eval_take_config_files_too(cli, tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "export.yaml"
    cfg.write_text("max_accuracy_drop: 2\ncalibration_imgs: 100\n" if "export" in cli else "per_pair: 3\nsplitt: val\n")
    proc = subprocess.run([sys.executable, "-c", f"from {cli} import main; main()", "--config", str(cfg), "x"],
                          capture_output=True, text=True, timeout=120)
    key = "calibration_imgs" if "export" in cli else "splitt"
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --config {cfg}: unknown key '{key}' (keys are the option names with _ for -, e.g. "
        f"{'run_dir' if 'export' in cli else 'model'})"], proc.stderr


def test_a_missing_tracker_package_is_one_line_before_anything(monkeypatch, tmp_path):
    import sys

    from xray.common.errors import XrayError
    from xray.train.tracking import preflight

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(XrayError, match=r"--report-to wandb: wandb is not installed \(pip install 'xray-edge\[wandb\]'\)"):
        preflight(("tensorboard", "wandb"), tmp_path)
    assert list(tmp_path.iterdir()) == []
