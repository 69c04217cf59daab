"""Class names: normalising what datasets call them, and parsing the --classes option.

Classes are always the sorted upper-case folder names of the data (or as configured) and travel with
every artifact; model code never hard-codes them.
"""
from __future__ import annotations

import re

from .errors import XrayError

DEFAULT_CLASSES = ("NORMAL", "PNEUMONIA", "TUBERCULOSIS")

# What public chest X-ray sets call their folders -> our canonical class.
ALIASES = {
    "normal": "NORMAL",
    "healthy": "NORMAL",
    "pneumonia": "PNEUMONIA",
    "bacteria": "PNEUMONIA",
    "bacterial": "PNEUMONIA",
    "virus": "PNEUMONIA",
    "viral": "PNEUMONIA",
    "tb": "TUBERCULOSIS",
    "tuberculosis": "TUBERCULOSIS",
}

# Folder names that are a dataset's own splits or wrappers, never classes.
NOT_CLASSES = {"train", "training", "val", "valid", "validation", "test", "testing", "dev",
               "images", "image", "data", "dataset", "chest_xray", "chest-xray", "chestxray",
               "chestxray2017", "all", "raw"}

_CLASS_RE = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")


def canonical_name(raw: str) -> str:
    """'Tuberculosis' -> 'TUBERCULOSIS', 'tb' -> 'TUBERCULOSIS', 'covid-19' -> 'COVID_19'."""
    key = raw.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    name = re.sub(r"[^A-Za-z0-9]+", "_", raw.strip()).strip("_").upper()
    if not name:
        raise XrayError(f"cannot make a class name out of {raw!r}")
    return name


def class_from_parts(folder_parts) -> str | None:
    """The class of a file from its folder names (outermost first): the deepest known alias
    (so PNEUMONIA/bacteria/x.jpeg -> PNEUMONIA), else the deepest folder that is not a split or
    wrapper name; None if the file sits in no class folder."""
    parts = [p for p in folder_parts if p and not p.startswith(".")]
    for p in reversed(parts):
        if p.strip().lower() in ALIASES:
            return ALIASES[p.strip().lower()]
    for p in reversed(parts):
        if p.strip().lower() not in NOT_CLASSES:
            return canonical_name(p)
    return None


def parse_class_option(option: str | None) -> dict[str, str] | None:
    """--classes 'NORMAL,PNEUMONIA' (restrict) or 'normal=NORMAL,tb=TUBERCULOSIS' (rename + restrict).

    Returns {canonical source class: output class}, or None for 'keep every class'.
    """
    if option is None or not option.strip():
        return None
    mapping: dict[str, str] = {}
    for item in option.split(","):
        item = item.strip()
        if not item:
            continue
        src, _, dst = item.partition("=")
        src_c = canonical_name(src)
        dst_c = canonical_name(dst) if dst.strip() else src_c
        validate_class_name(dst_c)
        mapping[src_c] = dst_c
    if not mapping:
        raise XrayError(f"--classes {option!r} names no class")
    return mapping


def validate_class_name(name: str) -> str:
    if not _CLASS_RE.match(name):
        raise XrayError(f"bad class name {name!r}: use upper-case letters, digits and '_'")
    return name


def check_classes(classes) -> list[str]:
    """A usable class list: at least two distinct valid names, returned sorted."""
    names = [validate_class_name(c) for c in classes]
    if len(set(names)) != len(names):
        raise XrayError(f"duplicate class names in {names}")
    if len(names) < 2:
        raise XrayError(f"need at least two classes, found {names or 'none'}")
    return sorted(names)
