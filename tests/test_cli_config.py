"""--config FILE (xray.common.cli_config) on a small click command with every kind of option the trainer has:
keys spelled as the options are typed (or with _, or the old parameter names), the file's values become defaults,
the command line wins, relative paths are the file's folder's, a wrong key or value is one line and exit 2 (a typo
gets the nearest key), and what save_config writes, in the users' spelling, reads back to the same options."""
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
@click.option("--calibrate/--no-calibrate", default=True)
@click.option("--report-to", multiple=True, type=click.Choice(["tensorboard", "mlflow", "wandb"]))
@click.option("--run-name", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False), default="data")
def command(**options):
    click.echo(repr(sorted(options.items())))


def run(*args):
    return CliRunner().invoke(command, [str(a) for a in args])


def options(result) -> dict:
    assert result.exit_code == 0, result.output
    return dict(eval(result.output))


DEFAULTS = {"calibrate": True, "data_dir": "data", "run_name": None}


def test_the_file_sets_defaults_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs_a: 7\nlr_a: 3e-4\nmodel_name: vit\nno_augment: true\nreport_to: mlflow\n")
    got = options(run("--config", cfg))
    assert got == {"epochs_a": 7, "lr_a": 3e-4, "model_name": "vit", "no_augment": True, "report_to": ("mlflow",),
                   **DEFAULTS}  # YAML's "3e-4" is a string: click's float made it a number
    got = options(run("--epochs-a", 2, "--config", cfg, "--report-to", "wandb", "--report-to", "tensorboard"))
    assert got["epochs_a"] == 2 and got["report_to"] == ("wandb", "tensorboard") and got["model_name"] == "vit"


def test_keys_as_the_options_are_typed(tmp_path):
    """The option's own spelling (model, epochs-a), with _ (epochs_a), the old parameter name (model_name), a flag
    as typed (no-calibrate: true, no-augment: true)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: vit\nepochs-a: 5\nlr_a: 0.01\nno-calibrate: true\nno-augment: true\nreport-to: [wandb]\n")
    got = options(run("--config", cfg))
    assert got == {"epochs_a": 5, "lr_a": 0.01, "model_name": "vit", "no_augment": True, "calibrate": False,
                   "report_to": ("wandb",), "data_dir": "data", "run_name": None}
    cfg.write_text("calibrate: false\n")
    assert options(run("--config", cfg))["calibrate"] is False
    assert options(run("--config", cfg, "--calibrate"))["calibrate"] is True  # the command line wins


def test_relative_paths_are_the_config_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.yaml").write_text("data-dir: ../data\n")
    monkeypatch.chdir(tmp_path)  # run from elsewhere than the file's folder
    got = options(run("--config", folder / "run.yaml"))
    assert got["data_dir"] == str(folder / "../data")
    (folder / "abs.yaml").write_text(f"data-dir: {tmp_path / 'elsewhere'}\n")
    assert options(run("--config", folder / "abs.yaml"))["data_dir"] == str(tmp_path / "elsewhere")
    assert options(run("--data-dir", "mine", "--config", folder / "run.yaml"))["data_dir"] == "mine"


@pytest.mark.parametrize("text, words", [
    ("epoch_a: 3\n", "unknown key 'epoch_a'; did you mean 'epochs_a'?"),
    ("epochs-b: 3\n", "unknown key 'epochs-b'; did you mean 'epochs-a'?"),
    ("modle: vit\n", "unknown key 'modle'; did you mean 'model'?"),
    ("epochs_a: 2\nepochs-a: 3\n", "'epochs_a' and 'epochs-a' both set --epochs-a"),
    ("no-calibrate: maybe\n", "no-calibrate: true or false"),
    ("zzz: 3\n", "unknown key 'zzz' (keys are the options as typed"),
    ("epochs_a: -1\n", "epochs_a: -1 is not in the range x>=0"),
    ("model_name: resnet\n", "model_name: 'resnet' is not one of"),
    ("no_augment: maybe\n", "no_augment: 'maybe' is not a valid boolean"),
    ("report_to: [mlflow, comet]\n", "report_to: 'comet' is not one of"),
    ("- a list\n", "expected 'option: value' lines, got a list"),
    ("epochs_a: [1\n", "--config"),
    ("config: other.yaml\n", "unknown key 'config'"),
    ("model: resnet\n", "model: 'resnet' is not one of"),
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


def test_saved_options_read_back_to_the_same_options_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = options(run("--epochs-a", 9, "--report-to", "mlflow", "--report-to", "wandb", "--no-augment",
                      "--no-calibrate", "--run-name", "first", "--data-dir", "data/set1"))
    saved = tmp_path / "runs" / "r" / "config.yaml"
    saved.parent.mkdir(parents=True)
    save_config(got, saved, command, leave_out=("run_name",))
    text = saved.read_text()
    assert "run" not in text.replace("report-to", "") and text.index("epochs-a") < text.index("report-to")
    assert "model: efficientnet_lite0" in text and "no-calibrate: true" in text and "no-augment: true" in text
    assert f"data-dir: {tmp_path / 'data' / 'set1'}" in text  # absolute: the same folder from wherever it is read
    monkeypatch.chdir(saved.parent)
    again = options(run("--config", saved, "--run-name", "second"))
    assert {**again, "run_name": "first", "data_dir": "data/set1"} == got
    assert again["data_dir"] == str(tmp_path / "data" / "set1")


@pytest.mark.parametrize("cli", ["xray.export.cli", "xray.evaluate.cli"])
def test_export_and_eval_take_config_files_too(cli, tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "export.yaml"
    cfg.write_text("max_accuracy_drop: 2\ncalibration_imgs: 100\n" if "export" in cli else "per_pair: 3\nsplitt: val\n")
    proc = subprocess.run([sys.executable, "-c", f"from {cli} import main; main()", "--config", str(cfg), "x"],
                          capture_output=True, text=True, timeout=120)
    key, near = ("calibration_imgs", "calibration_images") if "export" in cli else ("splitt", "split")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --config {cfg}: unknown key '{key}'; did you mean '{near}'?"], proc.stderr


def test_a_missing_tracker_package_is_one_line_before_anything(monkeypatch, tmp_path):
    import sys

    from xray.common.errors import XrayError
    from xray.train.tracking import preflight

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(XrayError, match=r"--report-to wandb: wandb is not installed \(pip install 'xray-edge\[wandb\]'\)"):
        preflight(("tensorboard", "wandb"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_report_to_none_goes_alone():
    """--report-to none is no tracking (the shared trained run of conftest uses it, exit 0); with a tracker beside
    it, one line."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "train" / "main.py"), "--report-to", "none", "--report-to",
                           "mlflow"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --report-to none goes alone (it means no tracker)"], proc.stderr


def test_the_training_docs_example_config_is_one_the_trainer_reads(tmp_path):
    """docs/training.md's run.yaml, read by the real trainer (--config before --help: every key checked, no run)."""
    import re
    import subprocess
    import sys

    from conftest import ROOT

    text = (ROOT / "docs" / "training.md").read_text()
    import textwrap

    blocks = [textwrap.dedent(b) for b in re.findall(r"```yaml\n(.*?)^\s*```", text, re.S | re.M)]
    (block,) = [b for b in blocks if b.startswith("# run.yaml")]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(block)
    ok = subprocess.run([sys.executable, str(ROOT / "train" / "main.py"), "--config", str(cfg), "--help"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "Usage:" in ok.stdout, ok.stderr
    cfg.write_text(block.replace("epochs-a:", "epoch-a:"))
    bad = subprocess.run([sys.executable, str(ROOT / "train" / "main.py"), "--config", str(cfg), "--help"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "did you mean 'epochs-a'?" in bad.stderr, bad.stderr
