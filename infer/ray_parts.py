"""The output of `xray-infer --engine ray`: a Parquet dataset, i.e. a folder of part files.

A part file appears only complete: it is written as a hidden `.part-*.tmp` (which pyarrow's dataset readers skip,
like every name starting with `.` or `_`), fsynced, then renamed. A killed job leaves at most a hidden temporary
file, removed by the next run. Re-running with the same --output reads back what the committed parts hold (the
resume key columns only) and scores only the rest.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from xray.common.errors import XrayError

PART_GLOB = "part-*.parquet"
TMP_GLOB = ".part-*.tmp"


def row_schema(classes) -> pa.Schema:
    """One row per input file. sha256: the content's hash, written with --resume-by hash (null otherwise: hashing
    costs about a tenth of the CPU a file takes). prob_<CLASS>: one column per class; error_kind / error: why a file has no prediction
    (ImageError's kind, or `missing` / `unreadable` for a file that could not be read)."""
    return pa.schema([
        ("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sha256", pa.string()),
        ("prediction", pa.string()), *[(prob_column(c), pa.float64()) for c in classes],
        ("ood", pa.bool_()), ("ood_score", pa.float64()), ("error_kind", pa.string()), ("error", pa.string()),
        ("model_name", pa.string()), ("checkpoint_sha256", pa.string()), ("precision", pa.string()),
        ("node_id", pa.string()),
    ])


def prob_column(cls: str) -> str:
    return f"prob_{cls}"


def resume_key(path, size, mtime_ns, sha256, resume_by: str):
    """What makes an input already scored: path + size + mtime, or (--resume-by hash) its content's sha256.
    A file that could not be read has no hash: its path stands in."""
    if resume_by == "hash":
        return ("sha256", sha256) if sha256 else ("path", path)
    return (path, size, mtime_ns)


def committed_parts(out: Path) -> list[Path]:
    return sorted(out.glob(PART_GLOB))


def prepare_output(out: Path, schema: pa.Schema, checkpoint_sha256: str, resume_by: str) -> set:
    """Create `out` (or check it holds our parts), remove a killed job's temporary files, and return the resume keys
    of the rows already written there."""
    if out.exists() and not out.is_dir():
        raise XrayError(f"--output {out}: is a file; --engine ray writes a folder of Parquet part files")
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(TMP_GLOB):
        leftover.unlink(missing_ok=True)
    parts = committed_parts(out)
    if not parts:
        return set()
    try:
        existing = pq.read_schema(parts[0])
        table = pq.read_table(parts, columns=["path", "size", "mtime_ns", "sha256", "error_kind", "checkpoint_sha256"])
    except Exception as e:  # another program's files, or a part damaged after it was written
        raise XrayError(f"--output {out}: cannot read its part files ({str(e).splitlines()[0][:200]}); "
                        "give a new folder") from None
    if existing.names != schema.names:
        raise XrayError(f"--output {out}: holds results with other columns (another model's classes?); "
                        "give a new folder")
    models = {m for m in table.column("checkpoint_sha256").to_pylist() if m is not None} - {checkpoint_sha256}
    if models:
        raise XrayError(f"--output {out}: holds results of another model (checkpoint {sorted(models)[0][:12]}…); "
                        "give a new folder, or the same model")
    read = [kind not in ("missing", "unreadable") for kind in table.column("error_kind").to_pylist()]
    if resume_by == "hash" and any(r and h is None for r, h in zip(read, table.column("sha256").to_pylist())):
        raise XrayError(f"--output {out}: its rows were written without content hashes (--resume-by path); resume it "
                        "with --resume-by path, or give a new folder for --resume-by hash")
    cols = [table.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "sha256")]
    return {resume_key(*row, resume_by) for row in zip(*cols)}


class PartWriter:
    """Rows in, part files out: one part per `part_rows` rows (the most a killed job has to redo), each committed
    atomically. Names carry a per-job id, so parts of several runs never collide."""

    def __init__(self, out: Path, schema: pa.Schema, part_rows: int):
        self.out, self.schema, self.part_rows = out, schema, part_rows
        self.job = uuid.uuid4().hex[:12]
        self.pending: list[pa.Table] = []
        self.rows = self.parts = 0

    def add(self, table: pa.Table):
        self.pending.append(table.select(self.schema.names).cast(self.schema))
        self.rows += table.num_rows
        while sum(t.num_rows for t in self.pending) >= self.part_rows:
            whole = pa.concat_tables(self.pending)
            rest = whole.slice(self.part_rows)
            self.pending = [rest] if rest.num_rows else []  # before the commit: an interrupted commit loses its rows
            self._commit(whole.slice(0, self.part_rows))  # (a resume redoes them), it never writes them twice

    def flush(self):
        """Commit what is pending (the job's end, or an interruption)."""
        tables, self.pending = self.pending, []
        if tables:
            self._commit(pa.concat_tables(tables))

    def _commit(self, table: pa.Table):
        name = f"part-{self.job}-{self.parts:05d}.parquet"
        self.parts += 1  # first: a commit cut short never leaves its name to the next one
        tmp = self.out / f".{name}.tmp"
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.out / name)
        fd = os.open(self.out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def lock_output(out: Path):
    """One job per output folder: a second one would score the same files and delete the first one's temporary
    part. The lock (flock on OUT/.lock) goes with the process, however it ends: keep the returned file open while
    writing."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise XrayError(f"--output {out}: another xray-infer job is writing to this folder; wait for it or give "
                        "another folder") from None
    return lock
