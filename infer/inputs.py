"""What the user asked to classify: files, folders (recursive), globs, or `-` for paths on stdin.

Problems with one argument (missing path, empty folder, unreadable folder, a glob matching nothing)
are collected as one-line errors so the other inputs are still processed.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from xray.common.classes import canonical_name
from xray.common.errors import XrayError
from xray.common.imageio import SUPPORTED_EXTENSIONS, is_supported

GLOB_CHARS = set("*?[")


def collect_inputs(args, stdin_lines=None) -> tuple[list[str], list[tuple[str, str]]]:
    """(files in argument order without duplicates, [(argument, error message)])."""
    files, errors, seen = [], [], set()

    def add(path: str):
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)

    for arg in _expand_stdin(args, stdin_lines):
        if os.path.isdir(arg):
            found, walk_errors = _walk(arg)
            errors += walk_errors
            if not found and not walk_errors:
                errors.append((arg, f"{arg}: folder has no supported images ({', '.join(SUPPORTED_EXTENSIONS)})"))
            for f in found:
                add(f)
        elif os.path.lexists(arg):
            add(arg)  # an explicit file is tried whatever its extension: the decoder sniffs the content
        elif GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                errors.append((arg, f"{arg}: no files match"))
            for m in matches:
                if os.path.isdir(m):
                    found, walk_errors = _walk(m)
                    errors += walk_errors
                    for f in found:
                        add(f)
                elif is_supported(m):
                    add(m)
        else:
            errors.append((arg, f"{arg}: no such file or directory"))
    return files, errors


def _expand_stdin(args, stdin_lines):
    for arg in args:
        if arg == "-":
            yield from (line.strip() for line in (stdin_lines or []) if line.strip())
        else:
            yield arg


def _walk(folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Supported image files below `folder`, sorted, hidden files and folders skipped."""
    errors = []

    def on_error(e: OSError):
        errors.append((e.filename, f"{e.filename}: cannot list folder ({e.strerror})"))

    found = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and is_supported(f)]
    return found, errors


def folder_label(path: str, classes) -> str | None:
    """The class a file is filed under, for --eval: the deepest folder on its path whose name is one of
    the model's classes, aliases included (data/test/PNEUMONIA/virus/x.png -> PNEUMONIA); None if none is."""
    wanted = set(classes)
    for part in reversed(Path(os.path.abspath(path)).parent.parts):
        try:
            name = canonical_name(part)
        except XrayError:  # a folder name with no letters or digits
            continue
        if name in wanted:
            return name
    return None
