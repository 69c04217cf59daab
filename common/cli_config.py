"""`--config FILE` for the click commands: a YAML file of `option: value` lines, the keys spelled as the options are
typed (`epochs-a: 3`, `model: efficientnet_lite0`, a flag as typed: `no-calibrate: true`), or with `_` for `-`
(`epochs_a`), or as the parameter's own name (`model_name`, what earlier versions wrote); values checked by each
option's own click type, relative paths taken from the file's folder, the command line winning.

click's default_map would ignore an unknown key silently (a typo would train with the default): every key is
checked here, and a wrong one is one line naming it and the nearest right one. PyYAML is imported only when a file
is given."""
from __future__ import annotations

import difflib
from pathlib import Path

import click


class ConfigError(click.ClickException):
    """One line and exit 2, like click's usage errors but without the usage block."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def spellings(command: click.Command, skip: click.Parameter | None = None) -> dict[str, tuple[click.Parameter, bool]]:
    """Every key a config may use -> (the option, whether the key is the flag's negative form: `no-calibrate`)."""
    keys: dict[str, tuple[click.Parameter, bool]] = {}
    for p in command.params:
        if not p.name or not p.expose_value or p is skip or not isinstance(p, click.Option):
            continue
        keys[p.name] = (p, False)
        for opts, negative in ((p.opts, False), (p.secondary_opts, True)):
            for opt in opts:
                if opt.startswith("--"):
                    keys[opt[2:]] = keys[opt[2:].replace("-", "_")] = (p, negative)
    return keys


def user_key(param: click.Parameter, negative: bool = False) -> str:
    """How a user types the option, without its dashes: `epochs-a`, `model`, `no-calibrate`."""
    opts = [o for o in (param.secondary_opts if negative else param.opts) if o.startswith("--")]
    return opts[0][2:] if opts else param.name


def is_path(param: click.Parameter) -> bool:
    return isinstance(param.type, click.Path)


def _resolve(value, folder: Path):
    """A relative path from a config file means the file's folder, not wherever the command runs."""
    if isinstance(value, str) and value and value != "-" and "://" not in value and ":/" not in value[:8] \
            and not Path(value).expanduser().is_absolute():
        return str(folder / value)
    return value


def _load(ctx: click.Context, param: click.Parameter, path: str | None):
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected 'option: value' lines, got a {type(data).__name__}")
    keys, folder = spellings(ctx.command, param), Path(path).resolve().parent
    values: dict[str, object] = {}
    given: dict[str, str] = {}  # parameter name -> the key that set it
    for key, value in data.items():
        key = str(key)
        if key not in keys:
            near = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f" (keys are the options as typed, e.g. " \
                                                                f"{user_key(next(iter(keys.values()))[0])})"
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
        option, negative = keys[key]
        if option.name in given:
            raise ConfigError(f"--config {path}: {given[option.name]!r} and {key!r} both set --{user_key(option)}")
        given[option.name] = key
        if negative:
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key}: true or false")
            value = not value
        if option.multiple and not isinstance(value, (list, tuple)):
            value = [value]
        if is_path(option):
            value = [_resolve(v, folder) for v in value] if option.multiple else _resolve(value, folder)
        try:
            option.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise ConfigError(f"--config {path}: {key}: {e.message}") from None
        values[option.name] = value
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


def config_option(func):
    """Add --config FILE (eager: read before the other options, which then default to the file's values)."""
    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load, metavar="FILE",
                        help="YAML of option: value, keys as the options are typed (epochs-a: 3, no-calibrate: "
                             "true); relative paths from the file's folder; the command line wins.")(func)


def save_config(options: dict, path: Path, command: click.Command, leave_out: tuple[str, ...] = ()):
    """The resolved options as YAML that --config reads back to the same options: keys as users type them, in the
    command's order, flags in the form that is set (`no-calibrate: true`), paths absolute (the file may be read
    from anywhere, and relative ones would be taken from its folder)."""
    import yaml

    data = {}
    for p in command.params:
        if p.name not in options or p.name in leave_out or not isinstance(p, click.Option):
            continue
        value = options[p.name]
        if isinstance(value, tuple):
            value = list(value)
        if is_path(p) and value is not None:
            value = [str(Path(v).resolve()) for v in value] if p.multiple else str(Path(value).resolve())
        if p.is_flag and p.secondary_opts and value is False:
            data[user_key(p, negative=True)] = True
        else:
            data[user_key(p)] = value
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
