"""What `xray-infer --engine ray` runs on the cluster's workers: the Scorer actor.

Each actor writes the shipped model files to a temporary folder on its own node and opens them once through
`xray.infer.model.open_model`, so int8 or fp32 is chosen for that node's CPU. For each block of paths it reads the
files (a local path, or a URI through pyarrow.fs), skips those the output already holds (resume), decodes and
preprocesses them with the same `xray.common` functions as the local engine, and runs the model.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from xray.common.errors import one_line

from .formats import OOD_LABEL
from .model import open_model
from .predict import ImageFailure, prepare_or_error
from .ray_inputs import is_uri
from .ray_parts import prob_column, resume_key, row_schema


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


class Scorer:
    """One model per actor, opened once. Paths in, result rows out: a thread pool reads and decodes the block's files
    ahead while onnxruntime runs the batch in hand, as the local engine does (PIL, pydicom's numpy work, hashlib and
    onnxruntime release the GIL), so one actor keeps its node's cores busy with one process's memory."""

    def __init__(self, model_files, model_file: str | None, precision: str, threads: int, force_int8: bool,
                 ood_action: str, batch_size: int, max_pixels: int, resume_by: str, done):
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        # 0: as many threads as the node has CPUs for Ray (which follows a container's CPU limit; the machine's core
        # count may not)
        threads = threads or max(1, int(next((n["Resources"].get("CPU", 0) for n in ray.nodes()
                                              if n["NodeID"] == node_id), 0)))
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
        self.classes, self.spec, self.ood_action = info.classes, info.spec, ood_action
        self.batch_size, self.max_pixels, self.resume_by = batch_size, max_pixels, resume_by
        self.done = ray.get(done[0]) if done else set()  # the resume keys (a list: Ray passes the reference as is)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="xray-decode")
        self.schema = row_schema(self.classes)
        self.constants = {"model_name": info.model_name, "checkpoint_sha256": info.checkpoint_sha256,
                          "precision": info.precision, "node_id": node_id}

    def prepare(self, path: str) -> dict | None:
        """One input -> its row so far and the model input (None: the output already holds it)."""
        size, mtime_ns, failure = stat_source(path)
        if self.done and self.resume_by == "path" and resume_key(path, size, mtime_ns, None, "path") in self.done:
            return None  # decided from the file's metadata: not even read
        data = sha = array = None
        if failure is None:
            data, failure = read_bytes(path)
            if data is not None and self.resume_by == "hash":  # 2 ms a 3 MB file: only when it is the key
                sha = hashlib.sha256(data).hexdigest()
        if self.done and self.resume_by == "hash" and resume_key(path, size, mtime_ns, sha, "hash") in self.done:
            return None
        if failure is None:
            array, failure = prepare_or_error(data, self.spec, self.max_pixels, name=path)
        return {"path": path, "size": size, "mtime_ns": mtime_ns, "sha256": sha, "array": array,
                "error_kind": failure and failure.kind, "error": failure and failure.message}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, chunk = [], []
        for row in self.pool.map(self.prepare, batch.column("path").to_pylist()):  # in order, decoded ahead
            if row is None:
                continue
            chunk.append(row)
            if len(chunk) == self.batch_size:
                rows += self.score(chunk)
                chunk = []
        rows += self.score(chunk)
        return self.table(rows)

    def score(self, rows: list[dict]) -> list[dict]:
        ok = [r for r in rows if r["array"] is not None]
        if ok:
            out = self.model.predict(np.stack([r.pop("array") for r in ok]))
            for k, r in enumerate(ok):
                probs = out.probs[k]
                r["ood"] = None if out.ood is None else bool(out.ood[k])
                r["ood_score"] = None if out.ood_score is None else float(out.ood_score[k])
                flagged = r["ood"] and self.ood_action == "abstain"
                r["prediction"] = OOD_LABEL if flagged else self.classes[int(probs.argmax())]
                r.update({prob_column(c): float(p) for c, p in zip(self.classes, probs)})
        return rows

    def table(self, rows: list[dict]) -> pa.Table:
        for r in rows:
            r.pop("array", None)
            r.update(self.constants)
        return pa.Table.from_pylist(rows, schema=self.schema)
