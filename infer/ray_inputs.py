"""What `xray-infer --engine ray` scores: folders (local, or any URI pyarrow's filesystems open: s3://, gs://, ...),
files, globs, `@paths.txt` (one path per line), and CSV / Parquet manifests (`--path-column`).

Listed on the driver, once: local paths the same way as the local engine (xray.infer.inputs), made absolute so that
every node of a cluster with the same shared mount finds them; URIs passed through to pyarrow.fs as they are.
"""
from __future__ import annotations

import os
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from xray.common.errors import XrayError
from xray.common.imageio import is_supported

from .inputs import collect_inputs

MANIFEST_SUFFIXES = (".csv", ".parquet")


def is_uri(path: str) -> bool:
    return "://" in path


def list_inputs(args, path_column: str = "path") -> tuple[list[str], list[tuple[str, str]]]:
    """(paths in argument order without duplicates, [(argument, error message)]) for the arguments."""
    paths, errors, seen = [], [], set()
    for arg in args:
        found, problems = _expand(arg, path_column)
        errors += problems
        for p in found:
            if p not in seen:
                seen.add(p)
                paths.append(p)
    return paths, errors


def _expand(arg: str, path_column: str) -> tuple[list[str], list[tuple[str, str]]]:
    if arg.startswith("@"):
        return [_absolute(p) for p in _read_text(arg[1:]).splitlines() if p.strip() and not p.startswith("#")], []
    if arg.lower().endswith(MANIFEST_SUFFIXES) and (is_uri(arg) or os.path.isfile(arg)):
        return [_absolute(p) for p in read_manifest(arg, path_column)], []
    if arg.startswith("file://"):
        arg = _absolute(arg)
    if is_uri(arg):
        return _list_uri(arg)
    files, errors = collect_inputs([arg])
    return [os.path.abspath(f) for f in files], errors


def _absolute(path: str) -> str:
    """One spelling per file: a local path made absolute, file:// turned into that path; other URIs as given."""
    path = path.strip()
    if path.startswith("file://"):
        return os.path.abspath(unquote(urlparse(path).path))
    return path if is_uri(path) else os.path.abspath(path)


def _read_text(source: str) -> str:
    try:
        if is_uri(source):
            fs, inner = _filesystem(source)
            with fs.open_input_stream(inner) as f:
                return f.read().decode("utf-8")
        with open(source, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise XrayError(f"@{source}: cannot read the list of paths ({e})") from None


def read_manifest(source: str, column: str) -> list[str]:
    """The path column of a CSV or Parquet manifest (only that column is read)."""
    import pyarrow
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if source.lower().endswith(".csv"):
            def stream():  # a URI through pyarrow.fs (pyarrow.csv opens only local files by name)
                if is_uri(source):
                    fs, inner = _filesystem(source)
                    return fs.open_input_stream(inner)
                return pyarrow.input_stream(source)

            with stream() as f:
                names = pyarrow.csv.open_csv(f).schema.names
            if column not in names:
                raise XrayError(f"{source}: no column '{column}' (it has {', '.join(names)}); pass --path-column")
            with stream() as f:
                table = pyarrow.csv.read_csv(f, convert_options=pyarrow.csv.ConvertOptions(
                    include_columns=[column], column_types={column: "string"}))
        else:
            names = pyarrow.parquet.read_schema(source).names
            if column not in names:
                raise XrayError(f"{source}: no column '{column}' (it has {', '.join(names)}); pass --path-column")
            table = pyarrow.parquet.read_table(source, columns=[column])
    except XrayError:
        raise
    except Exception as e:  # pyarrow's own errors for a file that is not CSV / Parquet
        raise XrayError(f"{source}: not a readable manifest ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    return [p for p in table.column(column).to_pylist() if p]


def _filesystem(uri: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as e:  # an unknown scheme, or a filesystem pyarrow was built without
        raise XrayError(f"{uri}: pyarrow cannot open this URI ({str(e).splitlines()[0][:200]})") from None


def _list_uri(uri: str) -> tuple[list[str], list[tuple[str, str]]]:
    """A URI: a file as it is, a folder as its supported files (recursive, hidden ones skipped)."""
    import pyarrow.fs

    fs, inner = _filesystem(uri)
    info = fs.get_file_info(inner)
    if info.type == pyarrow.fs.FileType.NotFound:
        return [], [(uri, f"{uri}: no such file or directory")]
    if info.type != pyarrow.fs.FileType.Directory:
        return [uri], []
    scheme, query = uri.split("://", 1)[0], urlparse(uri).query  # the query: endpoint_override, region, ...
    root = PurePosixPath(inner.rstrip("/"))
    found = sorted(i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
                   if i.type == pyarrow.fs.FileType.File and is_supported(i.path)
                   and not any(part.startswith(".") for part in PurePosixPath(i.path).relative_to(root).parts))
    if not found:
        return [], [(uri, f"{uri}: folder has no supported images")]
    return [f"{scheme}://{p}" + (f"?{query}" if query else "") for p in found], []
