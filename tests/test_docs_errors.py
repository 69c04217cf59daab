"""docs/troubleshooting.md keeps up with the code's one-line errors (reads files only: no command is run).

The page's convention: every markdown table row whose first cell is one code span is an error message, its variable
parts written as `<placeholders>` (a placeholder in Python's quotes, `'<name>'`, takes its quotes with it).

- Each message's longest fixed fragment (the text between placeholders) must still be in the code: in a string
  literal of common/, train/, export/, infer/, evaluate/, serve/ or scripts/ (implicit concatenation joined, an
  f-string's `{...}` a break, except a module constant such as ENV_VAR, which reads as its value). A message
  reworded in the code fails here and names the row to update.
- The page covers at least 80 % of the XrayError messages: the fixed start of each `XrayError("...")` /
  `XrayError(f"...")` message, up to its first `{` (starts shorter than 12 characters are left out), must appear
  in one of the page's messages.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PAGE_NAME = "docs/troubleshooting.md"
PAGE = ROOT / PAGE_NAME
SOURCE_DIRS = ("common", "train", "export", "infer", "evaluate", "serve", "scripts")
PLACEHOLDER = re.compile(r"""['"]?<[^<>\s][^<>]*>['"]?""")  # <path>, '<name>'; not "<= 8" or "sum < 1"
CELL_SPLIT = re.compile(r"(?<!\\)\|")
HOLE = "\x00"  # an f-string's interpolation: no fragment of the page can span it
MIN_COVERAGE = 0.8
MIN_PREFIX = 12
MIN_FRAGMENT = 4


def source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_constants(trees: list[ast.Module]) -> dict[str, str]:
    """NAME -> value of the module-level `NAME = "text"` assignments (a name given two values is left out)."""
    seen: dict[str, set[str]] = {}
    for tree in trees:
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                seen.setdefault(node.targets[0].id, set()).add(node.value.value)
    return {name: values.pop() for name, values in seen.items() if len(values) == 1}


def rendered(node: ast.JoinedStr, constants: dict[str, str]) -> str:
    """An f-string as the user reads it: its literal parts, a module constant's value, HOLE for the rest."""
    out = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            out.append(str(value.value))
        elif (isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name)
              and value.value.id in constants and value.conversion == -1 and value.format_spec is None):
            out.append(constants[value.value.id])
        else:
            out.append(HOLE)
    return "".join(out)


def source_strings() -> str:
    """Every string literal of the source tree, HOLE-separated, in one text to search."""
    trees = [parse(p) for p in source_files()]
    constants = module_constants(trees)
    texts = []
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                texts.append(rendered(node, constants))
    return HOLE.join(texts)


def page_messages() -> list[tuple[int, str, str]]:
    """(line number, section (its headings), message) of every table row whose first cell is one code span."""
    out, headings = [], {}
    for number, line in enumerate(PAGE.read_text(encoding="utf-8").splitlines(), 1):
        if m := re.match(r"(#+) (.*)", line):
            level = len(m.group(1))
            headings = {k: v for k, v in headings.items() if k < level} | {level: m.group(2).strip()}
        section = " / ".join(headings[k] for k in sorted(headings))
        if not line.startswith("|"):
            continue
        first = CELL_SPLIT.split(line)[1].strip()
        m = re.fullmatch(r"`([^`]+)`", first)
        if m:
            out.append((number, section, m.group(1).replace("\\|", "|")))
    return out


def fragments(message: str) -> list[str]:
    return PLACEHOLDER.split(message)


def longest_fragment(message: str) -> str:
    return max(fragments(message), key=len)


def xray_error_prefixes() -> dict[str, str]:
    """fixed start of an XrayError message (up to its first `{`) -> where it is raised (file:line)."""
    out = {}
    for path in source_files():
        for node in ast.walk(parse(path)):
            if not (isinstance(node, ast.Call) and node.args and getattr(node.func, "id", None) == "XrayError"):
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                text = arg.value
            elif isinstance(arg, ast.JoinedStr):
                text = ""
                for value in arg.values:
                    if not isinstance(value, ast.Constant):
                        break
                    text += str(value.value)
            else:
                continue  # XrayError(problem), XrayError(str(e)): the message is made elsewhere
            prefix = text.split("{")[0]
            if len(prefix.strip()) >= MIN_PREFIX:
                out.setdefault(prefix, f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def test_the_page_lists_messages_with_a_fixed_part():
    messages = page_messages()
    assert len(messages) >= 150, f"{PAGE_NAME}: only {len(messages)} messages parsed: is the table convention kept?"
    short = [(n, m) for n, _, m in messages if len(longest_fragment(m)) < MIN_FRAGMENT]
    assert not short, f"{PAGE_NAME}: messages with too little fixed text to search for (line, message): {short}"
    by_section: dict[tuple[str, str], int] = {}
    twice = []
    for number, section, message in messages:
        if (section, message) in by_section:
            twice.append((number, message))
        by_section[(section, message)] = number
    assert not twice, f"{PAGE_NAME}: messages listed twice in one section (line, message): {twice}"


def test_every_message_on_the_page_is_still_in_the_code():
    code = source_strings()
    stale = [f"line {number}: {message!r} (looked for {longest_fragment(message)!r})"
             for number, _, message in page_messages() if longest_fragment(message) not in code]
    assert not stale, (f"{PAGE_NAME} lists messages the code no longer has (reworded or removed?); "
                       "update these rows:\n" + "\n".join(stale))


def test_the_page_covers_the_xray_errors():
    text = "\n".join(message for _, _, message in page_messages())
    prefixes = xray_error_prefixes()
    missing = {prefix: where for prefix, where in prefixes.items() if prefix not in text}
    coverage = 1 - len(missing) / len(prefixes)
    assert coverage >= MIN_COVERAGE, (
        f"{PAGE_NAME} covers {coverage:.0%} of {len(prefixes)} XrayError messages (at least "
        f"{MIN_COVERAGE:.0%} wanted); add rows for:\n" + "\n".join(f"{w}: {p!r}" for p, w in sorted(missing.items())))
