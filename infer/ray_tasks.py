"""The two stages `xray-infer --engine ray` runs on the cluster's workers.

`prepare_batch` (Ray tasks): read each file's bytes (local path, or a URI through pyarrow.fs), skip it if the output
already holds it (--resume), decode + preprocess with the same `xray.common` functions as the local engine. The
model input travels as float32 bytes, exactly as computed.

`Scorer` (an actor pool): each actor writes the shipped model files to a temporary folder on its own node and opens
them once through `xray.infer.model.open_model`, so int8 or fp32 is chosen for that node's CPU.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from xray.common.errors import one_line

from .formats import OOD_LABEL
from .model import open_model
from .predict import ImageFailure, prepare_or_error
from .ray_inputs import is_uri
from .ray_parts import prob_column, resume_key

PREPARED = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sha256", pa.string()),
                      ("pixels", pa.large_binary()), ("error_kind", pa.string()), ("error", pa.string())])

_DONE_CACHE: dict = {}  # per worker process: the resume keys, fetched once, not once per task


def stat_source(path: str) -> tuple[int | None, int | None, ImageFailure | None]:
    """(size, mtime_ns, failure) of one input, without reading it (--resume-by path decides on these)."""
    if is_uri(path):
        import pyarrow.fs

        try:
            fs, inner = pyarrow.fs.FileSystem.from_uri(path)
            info = fs.get_file_info(inner)
        except Exception as e:  # pyarrow raises OSError or its own ArrowException subclasses
            return None, None, ImageFailure("unreadable", f"{path}: cannot read ({one_line(e)})")
        if info.type == pyarrow.fs.FileType.NotFound:
            return None, None, ImageFailure("missing", f"{path}: no such file or directory")
        return info.size, info.mtime_ns, None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, None, ImageFailure("missing", f"{path}: no such file or directory")
    except OSError as e:
        return None, None, ImageFailure("unreadable", f"{path}: cannot read ({e.strerror or one_line(e)})")
    return st.st_size, st.st_mtime_ns, None


def read_bytes(path: str) -> tuple[bytes | None, ImageFailure | None]:
    """One input's bytes. The messages for a local file are the local engine's."""
    try:
        if is_uri(path):
            import pyarrow.fs

            fs, inner = pyarrow.fs.FileSystem.from_uri(path)
            with fs.open_input_file(inner) as f:
                return f.read(), None
        with open(path, "rb") as f:
            return f.read(), None
    except PermissionError:
        return None, ImageFailure("unreadable", f"{path}: permission denied")
    except IsADirectoryError:
        return None, ImageFailure("unreadable", f"{path}: is a directory")
    except Exception as e:  # OSError, or pyarrow's own errors for a URI
        return None, ImageFailure("unreadable", f"{path}: cannot read ({getattr(e, 'strerror', None) or one_line(e)})")


def _done_keys(done) -> set:
    """done: None, or [ObjectRef of the set of resume keys] (a list, so Ray passes the reference, not the set)."""
    if not done:
        return set()
    ref = done[0]
    key = ref.hex()
    if key not in _DONE_CACHE:
        import ray

        _DONE_CACHE.clear()
        _DONE_CACHE[key] = ray.get(ref)
    return _DONE_CACHE[key]


def prepare_batch(batch: pa.Table, spec, max_pixels: int, resume_by: str, done=None) -> pa.Table:
    """Paths -> prepared rows (model input or error), leaving out inputs the output already holds."""
    done_keys = _done_keys(done)
    rows = {name: [] for name in PREPARED.names}
    for path in batch.column("path").to_pylist():
        size, mtime_ns, failure = stat_source(path)
        if done_keys and resume_by == "path" and resume_key(path, size, mtime_ns, None, "path") in done_keys:
            continue  # decided from the file's metadata: not even read
        data, sha = None, None
        if failure is None:
            data, failure = read_bytes(path)
            sha = hashlib.sha256(data).hexdigest() if data is not None else None
        if done_keys and resume_by == "hash" and resume_key(path, size, mtime_ns, sha, "hash") in done_keys:
            continue
        pixels = None
        if failure is None:
            array, failure = prepare_or_error(data, spec, max_pixels, name=path)
            pixels = None if array is None else np.ascontiguousarray(array, dtype=np.float32).tobytes()
        del data
        for name, value in zip(PREPARED.names, (path, size, mtime_ns, sha, pixels, failure and failure.kind,
                                                 failure and failure.message)):
            rows[name].append(value)
    return pa.table(rows, schema=PREPARED)


class Scorer:
    """One model per actor, opened once; prepared rows in, result rows out."""

    def __init__(self, model_files, model_file: str | None, precision: str, threads: int, force_int8: bool,
                 ood_action: str):
        import ray

        files = ray.get(model_files[0])  # {file name: bytes}: the driver's export, shipped once per actor
        folder = Path(tempfile.mkdtemp(prefix="xray-ray-model-"))
        try:
            for name, data in files.items():
                (folder / name).write_bytes(data)
            option = str(folder / model_file) if model_file else str(folder)
            self.model, _ = open_model(option, precision, threads, force_int8)
        finally:  # onnxruntime has read the file: nothing stays behind on the node
            shutil.rmtree(folder, ignore_errors=True)
        info = self.model.info
        self.classes, self.ood_action = info.classes, ood_action
        self.constants = {"model_name": info.model_name, "checkpoint_sha256": info.checkpoint_sha256,
                          "precision": info.precision, "node_id": ray.get_runtime_context().get_node_id()}
        self.shape = (info.spec.channels, info.spec.input_size, info.spec.input_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        pixels = batch.column("pixels").to_pylist()
        ok = [i for i, p in enumerate(pixels) if p is not None]
        probs = np.full((n, len(self.classes)), np.nan)
        ood = [None] * n
        ood_score = [None] * n
        if ok:
            arrays = np.stack([np.frombuffer(pixels[i], dtype=np.float32).reshape(self.shape) for i in ok])
            out = self.model.predict(arrays)
            probs[ok] = out.probs
            if out.ood is not None:
                for k, i in enumerate(ok):
                    ood[i], ood_score[i] = bool(out.ood[k]), float(out.ood_score[k])
        prediction = [None] * n
        for i in ok:
            prediction[i] = OOD_LABEL if ood[i] and self.ood_action == "abstain" else self.classes[int(probs[i].argmax())]
        okset = set(ok)
        columns = {name: batch.column(name) for name in ("path", "size", "mtime_ns", "sha256")}
        columns["prediction"] = pa.array(prediction, pa.string())
        for k, c in enumerate(self.classes):
            columns[prob_column(c)] = pa.array([float(probs[i, k]) if i in okset else None for i in range(n)],
                                               pa.float64())
        columns["ood"] = pa.array(ood, pa.bool_())
        columns["ood_score"] = pa.array(ood_score, pa.float64())
        columns["error_kind"] = batch.column("error_kind")
        columns["error"] = batch.column("error")
        for name, value in self.constants.items():
            columns[name] = pa.array([value] * n, pa.string())
        return pa.table(columns)
