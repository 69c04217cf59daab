"""`--config FILE` for the click commands: a YAML file of `option_name: value` lines, keys being the click parameter
names (`epochs_a`, `model_name`, ...), values checked by each option's own click type, the command line winning.

click's default_map would ignore an unknown key silently (a typo would train with the default): every key is
checked here, and a wrong one is one line naming it. PyYAML is imported only when a file is given."""
from __future__ import annotations

from pathlib import Path

import click


class ConfigError(click.ClickException):
    """One line and exit 2, like click's usage errors but without the usage block."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def _load(ctx: click.Context, param: click.Parameter, path: str | None):
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected 'option_name: value' lines, got a {type(data).__name__}")
    params = {p.name: p for p in ctx.command.params if p.name and p.expose_value and p is not param}
    for key, value in data.items():
        option = params.get(key)
        if option is None:
            raise ConfigError(f"--config {path}: unknown key {key!r} (keys are the option names with _ for -, "
                              f"e.g. {next(iter(params))})")
        if option.multiple and not isinstance(value, (list, tuple)):
            data[key] = value = [value]
        try:
            option.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise ConfigError(f"--config {path}: {key}: {e.message}") from None
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return path


def config_option(func):
    """Add --config FILE (eager: read before the other options, which then default to the file's values)."""
    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load, metavar="FILE",
                        help="YAML of option_name: value (the names with _, e.g. epochs_a: 3); the command line "
                             "wins.")(func)


def save_config(options: dict, path: Path, leave_out: tuple[str, ...] = (), order: list[str] | None = None):
    """The resolved options as YAML that --config reads back (tuples as lists), in the command's order."""
    import yaml

    keys = [k for k in (order or options) if k in options and k not in leave_out]
    data = {k: list(options[k]) if isinstance(options[k], tuple) else options[k] for k in keys}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
