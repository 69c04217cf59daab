"""The commands the docs show (issue #31: "documentation that drifts" is not wanted): every `xray-*`, `accelerate
launch train/main.py`, `python train/main.py` and `python scripts/X.py` line in a bash block of README.md and
docs/*.md names a command that exists and only options that command has; every `make X` is a Makefile target.
A renamed or removed option fails here, naming the page and the line. (What each command does is tested where
its feature is; the end-to-end paths run the real CLIs.)"""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import click
import pytest
from conftest import ROOT

CLIS = {"xray-infer": "xray.infer.cli", "xray-serve": "xray.serve.cli", "xray-export": "xray.export.cli",
        "xray-eval": "xray.evaluate.cli"}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def bash_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, command) for each command of the page's ```bash blocks, continuations joined."""
    out, inside, pending, start = [], False, "", 0
    for n, line in enumerate(page.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            inside = stripped == "```bash"
            continue
        if not inside:
            continue
        code = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if not pending:
            start = n
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        full = (pending + code).strip()
        pending = ""
        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", full):
            if part:
                out.append((start, part))
    return out


@cache
def click_command(target: str) -> click.Command:
    if target in CLIS:
        return importlib.import_module(CLIS[target]).main
    spec = importlib.util.spec_from_file_location(f"docs_{Path(target).stem}", ROOT / target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.main


def options_of(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}


def target_and_args(words: list[str]) -> tuple[str, list[str]] | None:
    """The xray-edge command a line runs and its arguments; None for other tools (curl, openssl, DCMTK, ...)."""
    while words and (words[0] in ("sudo", "time") or "=" in words[0] and not words[0].startswith("-")):
        words = words[1:]  # VAR=value prefixes
    if not words:
        return None
    head = Path(words[0]).name
    if head in CLIS:
        return head, words[1:]
    if head.startswith("python") and len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:]
    if head == "accelerate" and "launch" in words:
        script = next((w for w in words if w.endswith(".py")), None)
        return (script, words[words.index(script) + 1:]) if script else None
    return None


def cases():
    for page in PAGES:
        for n, line in bash_lines(page):
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            if words and words[0] == "make":
                yield pytest.param(page, n, "make", words[1:], id=f"{page.name}:{n}")
                continue
            found = target_and_args(words)
            if found:
                yield pytest.param(page, n, *found, id=f"{page.name}:{n}")


@pytest.mark.parametrize("page, line, target, args", list(cases()))
def test_a_documented_command_exists_with_these_options(page, line, target, args):
    where = f"{page.relative_to(ROOT)}:{line}"
    if target == "make":
        targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
        wanted = [a for a in args if not a.startswith("-") and "=" not in a]
        assert set(wanted) <= targets, f"{where}: make {' '.join(args)}: no target {set(wanted) - targets}"
        return
    if target not in CLIS:
        assert (ROOT / target).is_file(), f"{where}: {target} does not exist"
    known = options_of(click_command(target))
    given = {a.split("=", 1)[0] for a in args if a.startswith("--") and a != "--"}
    given |= {a for a in args if re.fullmatch(r"-[a-zA-Z]", a)}
    assert given <= known, f"{where}: {target} has no {sorted(given - known)}"


def test_the_docs_show_the_main_commands():
    """The parametrised check above is not vacuous: the pages do show the pipeline's commands."""
    shown = {c.values[2] for c in cases()}
    assert {"xray-infer", "xray-serve", "xray-export", "xray-eval", "train/main.py", "make"} <= shown, shown
