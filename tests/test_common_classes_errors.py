"""xray.common.classes, xray.common.errors and xray.common.artifacts."""
from __future__ import annotations

import hashlib
import json

import pytest

from xray.common.artifacts import (atomic_path, read_csv, sha256_bytes, sha256_file, write_bytes_atomic,
                                   write_csv_atomic, write_json_atomic, write_text_atomic)
from xray.common.classes import (DEFAULT_CLASSES, canonical_name, check_classes, class_from_parts,
                                 parse_class_option, validate_class_name)
from xray.common.errors import EXIT_USAGE, ImageError, XrayError, exit_on_user_error

# -------------------------------------------------------------------------------------------- classes


@pytest.mark.parametrize("raw,expected", [
    ("normal", "NORMAL"), ("Normal", "NORMAL"), ("NORMAL", "NORMAL"), (" normal ", "NORMAL"),
    ("healthy", "NORMAL"),
    ("tb", "TUBERCULOSIS"), ("TB", "TUBERCULOSIS"), ("Tuberculosis", "TUBERCULOSIS"),
    ("bacteria", "PNEUMONIA"), ("virus", "PNEUMONIA"), ("Viral", "PNEUMONIA"), ("pneumonia", "PNEUMONIA"),
    ("covid-19", "COVID_19"), ("COVID 19", "COVID_19"), ("lung opacity", "LUNG_OPACITY"),
    ("--edema--", "EDEMA"),
])
def test_canonical_name(raw, expected):
    assert canonical_name(raw) == expected


@pytest.mark.parametrize("raw", ["", "   ", "---", "!!"])
def test_canonical_name_rejects_nameless(raw):
    with pytest.raises(XrayError):
        canonical_name(raw)


@pytest.mark.parametrize("parts,expected", [
    (("chest_xray", "train", "PNEUMONIA", "bacteria"), "PNEUMONIA"),
    (("chest_xray", "train", "PNEUMONIA"), "PNEUMONIA"),
    (("train", "Normal"), "NORMAL"),
    (("train",), None),
    ((), None),
    (("data", "train", "val"), None),
    (("data", "COVID"), "COVID"),
    (("data", "covid-19", "test"), "COVID_19"),
    (("Tuberculosis", "images"), "TUBERCULOSIS"),
    (("TB", ".hidden"), "TUBERCULOSIS"),
])
def test_class_from_parts(parts, expected):
    assert class_from_parts(parts) == expected


def test_parse_class_option_keep_all():
    assert parse_class_option(None) is None
    assert parse_class_option("") is None
    assert parse_class_option("   ") is None


def test_parse_class_option_restrict():
    assert parse_class_option("NORMAL,PNEUMONIA") == {"NORMAL": "NORMAL", "PNEUMONIA": "PNEUMONIA"}
    assert parse_class_option(" normal , tb ,") == {"NORMAL": "NORMAL", "TUBERCULOSIS": "TUBERCULOSIS"}


def test_parse_class_option_rename():
    assert parse_class_option("normal=NORMAL,tb=TUBERCULOSIS") == {
        "NORMAL": "NORMAL", "TUBERCULOSIS": "TUBERCULOSIS"}
    assert parse_class_option("covid=covid-19,pneumonia=sick") == {"COVID": "COVID_19", "PNEUMONIA": "SICK"}
    # several sources may merge into one output class
    assert parse_class_option("COVID=PNEUMONIA,pneumonia") == {"COVID": "PNEUMONIA", "PNEUMONIA": "PNEUMONIA"}


@pytest.mark.parametrize("option", [",", " , , ", "=NORMAL", "!!!", "NORMAL=!!"])
def test_parse_class_option_errors(option):
    with pytest.raises(XrayError):
        parse_class_option(option)


def test_validate_class_name():
    assert validate_class_name("COVID_19") == "COVID_19"
    for bad in ("normal", "_X", "A-B", "", "A B"):
        with pytest.raises(XrayError, match="bad class name"):
            validate_class_name(bad)


def test_check_classes():
    assert check_classes(["PNEUMONIA", "NORMAL"]) == ["NORMAL", "PNEUMONIA"]
    assert check_classes(DEFAULT_CLASSES) == list(DEFAULT_CLASSES)
    with pytest.raises(XrayError, match="at least two"):
        check_classes(["NORMAL"])
    with pytest.raises(XrayError, match="at least two"):
        check_classes([])
    with pytest.raises(XrayError, match="duplicate"):
        check_classes(["NORMAL", "PNEUMONIA", "NORMAL"])
    with pytest.raises(XrayError, match="bad class name"):
        check_classes(["NORMAL", "pneumonia"])


# --------------------------------------------------------------------------------------------- errors


def test_exit_on_user_error_passes_through_results():
    @exit_on_user_error
    def ok(a, b=1):
        """doc"""
        return a + b

    assert ok(2, b=3) == 5
    assert ok.__name__ == "ok" and ok.__doc__ == "doc"


def test_exit_on_user_error_xray_error(capsys):
    @exit_on_user_error
    def main():
        raise XrayError("data/raw: no such folder")

    with pytest.raises(SystemExit) as ei:
        main()
    assert ei.value.code == 2 == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err == "error: data/raw: no such folder\n"
    assert captured.out == ""


def test_exit_on_user_error_subclass_and_custom_code(capsys):
    @exit_on_user_error
    def bad_image():
        raise ImageError("x.png: empty file (0 bytes)")

    @exit_on_user_error
    def partial():
        raise XrayError("3 of 10 images failed", exit_code=1)

    with pytest.raises(SystemExit) as ei:
        bad_image()
    assert ei.value.code == 2
    assert capsys.readouterr().err == "error: x.png: empty file (0 bytes)\n"
    with pytest.raises(SystemExit) as ei:
        partial()
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: 3 of 10 images failed"]


def test_exit_on_user_error_internal_bug_propagates(capsys):
    @exit_on_user_error
    def buggy():
        raise KeyError("internal")

    with pytest.raises(KeyError):
        buggy()
    assert capsys.readouterr().err == ""


def test_exit_on_user_error_keyboard_interrupt(capsys):
    @exit_on_user_error
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as ei:
        interrupted()
    assert ei.value.code == 130
    assert "interrupted" in capsys.readouterr().err


def test_xray_error_exit_code_default_and_override():
    assert XrayError("m").exit_code == 2
    assert XrayError("m", exit_code=1).exit_code == 1
    assert XrayError("m").exit_code == 2  # the override did not leak into the class
    assert str(XrayError("the message")) == "the message"


# ------------------------------------------------------------------------------------------ artifacts


def test_atomic_path_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("half-written new content")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]


def test_atomic_path_failure_before_writing(tmp_path):
    target = tmp_path / "sub" / "x.csv"
    with pytest.raises(ValueError):
        with atomic_path(target):
            raise ValueError
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_path_success_replaces(tmp_path):
    target = tmp_path / "deep" / "dir" / "f.txt"  # parents are created
    with atomic_path(target) as tmp:
        tmp.write_text("one")
    assert target.read_text() == "one"
    write_text_atomic(target, "two ü")
    assert target.read_text(encoding="utf-8") == "two ü"
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_write_json_atomic(tmp_path):
    obj = {"classes": ["NORMAL", "PNEUMONIA"], "acc": 0.5, "nested": {"a": [1, 2]}}
    p = tmp_path / "m.json"
    write_json_atomic(p, obj)
    assert json.loads(p.read_text()) == obj
    assert p.read_text().endswith("\n")


def test_csv_round_trip(tmp_path):
    cols = ("path", "class", "split", "width")
    rows = [
        {"path": "a/b.png", "class": "NORMAL", "split": "train", "width": 224},
        {"path": "with,comma \"quoted\".png", "class": "PNEUMONIA", "split": "val", "width": 10},
        {"path": "ünïcode.jpg", "class": "TUBERCULOSIS"},  # missing columns -> ""
    ]
    p = tmp_path / "manifest.csv"
    write_csv_atomic(p, cols, rows)
    back = read_csv(p)
    assert back == [
        {"path": "a/b.png", "class": "NORMAL", "split": "train", "width": "224"},
        {"path": "with,comma \"quoted\".png", "class": "PNEUMONIA", "split": "val", "width": "10"},
        {"path": "ünïcode.jpg", "class": "TUBERCULOSIS", "split": "", "width": ""},
    ]
    assert list(back[0].keys()) == list(cols)


def test_csv_empty_rows(tmp_path):
    p = tmp_path / "empty.csv"
    write_csv_atomic(p, ["a", "b"], [])
    assert p.read_text().strip() == "a,b"
    assert read_csv(p) == []


def test_sha256_file_equals_hashlib(tmp_path):
    data = bytes(range(256)) * 1000 + b"tail"
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == expected
    assert sha256_file(p, chunk=1000) == expected  # many chunks, last one partial
    assert sha256_file(str(p), chunk=7) == expected
    assert sha256_bytes(data) == expected
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os

    from xray.common.artifacts import write_text_atomic

    write_text_atomic(tmp_path / "f.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask
