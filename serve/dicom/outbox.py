"""The durable store-and-forward outbox: every report waits on disk until the PACS has it.

One folder per result under `outbox/`: its SR (and its heatmap SC) as DICOM files and a `result.json` naming
them. A result is written into a hidden temporary folder (each file written and fsynced), which is then
renamed into place and the parent fsynced: after a crash the result is either whole or absent, and the node
acknowledges the C-STORE only after that rename, so an absent one is resent by the modality. The objects'
SOP Instance UIDs are fixed in those files, so a resend after a crash is the same object (idempotent).

Delivered results are removed (their `sr_sent` line says where they went); refused and expired ones are moved
to `refused/` and `expired/` with a `status.json` saying why: nothing is dropped silently. Memory holds the
folder names, never pixels.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pydicom

from .results_log import private_dir

RESULT_FILE = "result.json"


@dataclass
class Entry:
    """One result waiting to be sent: its folder, when it was written, and what it holds."""

    path: Path
    created: float  # epoch seconds
    source_uid: str
    objects: list[dict]  # [{"file", "sop_instance_uid", "sop_class"}], the SR first
    attempts: int = 0

    @property
    def sr_uid(self) -> str:
        return self.objects[0]["sop_instance_uid"]

    def uids(self) -> dict:
        """The object UIDs as results.jsonl names them."""
        out = {"sr_sop_instance_uid": self.sr_uid}
        if len(self.objects) > 1:
            out["heatmap_sop_instance_uid"] = self.objects[1]["sop_instance_uid"]
        return out

    def datasets(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(self.path / o["file"]) for o in self.objects]


class Outbox:
    def __init__(self, root: Path):
        self.pending_dir = private_dir(root / "outbox")
        self.refused_dir, self.expired_dir = root / "refused", root / "expired"
        self._lock = threading.Lock()
        self._entries: list[Entry] = []
        self.unreadable: list[Path] = []  # folders without a readable result.json: left alone, reported
        for leftover in self.pending_dir.glob(".tmp-*"):  # a crash mid-write: never acknowledged, so resent
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in sorted(p for p in self.pending_dir.iterdir() if p.is_dir()):
            entry = self._read(folder)
            if entry is None:
                self.unreadable.append(folder)
            else:
                self._entries.append(entry)

    # ------------------------------------------------------------------ writing
    def put(self, source_uid: str, objects: list[pydicom.Dataset]) -> Entry:
        """Persist one result (write, fsync, rename); the caller acknowledges the instance only after this."""
        created = time.time()
        name = f"{int(created * 1000):013d}-{uuid.uuid4().hex[:8]}"
        tmp = self.pending_dir / f".tmp-{name}"
        tmp.mkdir(mode=0o700)
        listed = []
        try:
            for i, ds in enumerate(objects):
                file = "sr.dcm" if i == 0 else f"object{i}.dcm"
                with open(tmp / file, "wb") as f:
                    ds.save_as(f, enforce_file_format=True)
                    _sync(f)
                listed.append({"file": file, "sop_instance_uid": str(ds.SOPInstanceUID),
                               "sop_class": str(ds.SOPClassUID)})
            with open(tmp / RESULT_FILE, "w", encoding="utf-8") as f:
                json.dump({"created": created, "source_uid": source_uid, "objects": listed}, f)
                _sync(f)
            _sync_dir(tmp)
            final = self.pending_dir / name
            os.rename(tmp, final)
            _sync_dir(self.pending_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = Entry(final, created, source_uid, listed)
        with self._lock:
            self._entries.append(entry)
        return entry

    # ------------------------------------------------------------------ reading
    def entries(self) -> list[Entry]:
        """Pending results, oldest first."""
        with self._lock:
            return list(self._entries)

    def backlog(self) -> int:
        with self._lock:
            return len(self._entries)

    def oldest_age_s(self) -> float:
        with self._lock:
            return round(time.time() - self._entries[0].created, 3) if self._entries else 0.0

    # ------------------------------------------------------------------ terminal states
    def delivered(self, entry: Entry):
        self._forget(entry)
        shutil.rmtree(entry.path, ignore_errors=True)

    def set_aside(self, entry: Entry, where: str, **status) -> Path:
        """Move a result that will not be sent (where: "refused" or "expired") out of the outbox, with why."""
        folder = private_dir(self.refused_dir if where == "refused" else self.expired_dir)
        with open(entry.path / "status.json", "w", encoding="utf-8") as f:
            json.dump({"state": where, "time": time.time(), "attempts": entry.attempts, **status}, f, default=str)
            _sync(f)
        target = folder / entry.path.name
        os.rename(entry.path, target)
        _sync_dir(folder)
        _sync_dir(self.pending_dir)
        self._forget(entry)
        return target

    def _forget(self, entry: Entry):
        with self._lock:
            self._entries = [e for e in self._entries if e.path != entry.path]

    @staticmethod
    def _read(folder: Path) -> Entry | None:
        try:
            meta = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
            return Entry(folder, float(meta["created"]), str(meta["source_uid"]), list(meta["objects"]))
        except (OSError, ValueError, KeyError):
            return None  # not ours (or damaged by hand): left where it is, never sent half


def _sync(f):
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
