"""The durable store-and-forward outbox: every report waits on disk until the PACS has it.

One folder per result under `outbox/` (its name is the result's `entry` in results.jsonl): its SR (and its
heatmap SC) as DICOM files and a `result.json` naming them, the source instance and the instance's record. A
result is written into a hidden temporary folder (each file written and fsynced), which is then renamed into
place and the parent fsynced: after a crash the result is either whole or absent, and the node acknowledges the
C-STORE only after that rename, so an absent one is resent by the modality. The objects' UIDs are derived from
the source and the model (serve.dicom.reports), so any resend is the same object.

Each object is finished on its own: once its terminal line is in results.jsonl the sender calls mark(), which
writes `<file>.done` (its state); a resend after a crash skips it. When every object is done the folder is
removed (all delivered) or moved to `refused/` or `expired/` with a `status.json` saying why: nothing is dropped
silently. Memory holds the folder names and the per-source index, never pixels.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from .results_log import private_dir
from .transport import REFUSED, SENT

RESULT_FILE = "result.json"
DONE_SUFFIX = ".done"
EXPIRED = "expired"  # an object's terminal states: the transport's SENT and REFUSED, or this


@dataclass
class Entry:
    """One result waiting to be sent: its folder, when it was written, what it holds, and which objects are done."""

    path: Path
    created: float  # epoch seconds
    source_uid: str
    objects: list[dict]  # [{"file", "kind" ("sr" | "sc"), "sop_instance_uid", "sop_class"}], the SR first
    record: dict = field(default_factory=dict)  # the instance line's fields (a recovered line is written from it)
    done: dict = field(default_factory=dict)  # file -> terminal state
    attempts: int = 0

    @property
    def name(self) -> str:
        """The entry's id in results.jsonl."""
        return self.path.name

    @property
    def sr_uid(self) -> str:
        return self.objects[0]["sop_instance_uid"]

    def pending(self) -> list[dict]:
        """The objects still to deliver, in order."""
        return [o for o in self.objects if o["file"] not in self.done]

    def uids(self) -> dict:
        """The object UIDs as results.jsonl names them."""
        out = {"sr_sop_instance_uid": self.sr_uid}
        if len(self.objects) > 1:
            out["heatmap_sop_instance_uid"] = self.objects[1]["sop_instance_uid"]
        return out

    def datasets(self, objects: list[dict] | None = None) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(self.path / o["file"]) for o in (self.objects if objects is None else objects)]


def object_fields(obj: dict) -> dict:
    """How a terminal line names the object: the SR's or the heatmap's SOP Instance UID."""
    key = "sr_sop_instance_uid" if obj["kind"] == "sr" else "heatmap_sop_instance_uid"
    return {key: obj["sop_instance_uid"]}


class Outbox:
    def __init__(self, root: Path):
        self.pending_dir = private_dir(root / "outbox")
        self.refused_dir, self.expired_dir = root / "refused", root / "expired"
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}  # by name, oldest first (forgetting one is O(1), not a scan)
        self._by_source: dict[str, Entry] = {}  # source SOP Instance UID -> its pending entry
        self.unreadable: list[Path] = []  # folders without a readable result.json: left alone, reported
        for leftover in self.pending_dir.glob(".tmp-*"):  # a crash mid-write: never acknowledged, so resent
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.pending_dir.glob(".gone-*"):  # a crash mid-removal: every object was delivered
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in sorted(p for p in self.pending_dir.iterdir() if p.is_dir()):
            entry = self._read(folder)
            if entry is None:
                self.unreadable.append(folder)
            elif not entry.pending():  # every object was done, the crash came before the folder went
                self._finish(entry)
            else:
                self._add(entry)

    # ------------------------------------------------------------------ writing
    def put(self, source_uid: str, objects: list[pydicom.Dataset], record: dict | None = None) -> Entry:
        """Persist one result (write, fsync, rename): the SR first, then the heatmap SC. The caller acknowledges
        the instance only after this."""
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
                listed.append({"file": file, "kind": "sr" if i == 0 else "sc",
                               "sop_instance_uid": str(ds.SOPInstanceUID), "sop_class": str(ds.SOPClassUID)})
            with open(tmp / RESULT_FILE, "w", encoding="utf-8") as f:
                json.dump({"created": created, "source_uid": source_uid, "objects": listed, "record": record or {}},
                          f, default=str)
                _sync(f)
            _sync_dir(tmp)
            final = self.pending_dir / name
            os.rename(tmp, final)
            _sync_dir(self.pending_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = Entry(final, created, source_uid, listed, record or {})
        self._add(entry)
        return entry

    # ------------------------------------------------------------------ reading
    def entries(self) -> list[Entry]:
        """Pending results, oldest first."""
        with self._lock:
            return list(self._entries.values())

    def pending_for(self, source_uid: str) -> Entry | None:
        """The result of this source instance still waiting to be delivered, if any."""
        with self._lock:
            return self._by_source.get(source_uid) if source_uid else None

    def backlog(self) -> int:
        with self._lock:
            return len(self._entries)

    def oldest_age_s(self) -> float:
        with self._lock:
            return round(time.time() - next(iter(self._entries.values())).created, 3) if self._entries else 0.0

    def bookkeeping(self) -> dict:
        """The sizes of what the outbox holds in memory (a node's memory must not grow with its age)."""
        with self._lock:
            return {"outbox_entries": len(self._entries), "outbox_sources": len(self._by_source)}

    def kept_path(self, entry: Entry, state: str) -> Path:
        """Where a result with a refused (or expired) object ends up once all its objects are done."""
        return (self.refused_dir if state == REFUSED else self.expired_dir) / entry.name

    # ------------------------------------------------------------------ terminal states
    def mark(self, entry: Entry, obj: dict, state: str, **status):
        """One object is done (its terminal line is already in results.jsonl); the last one finishes the folder."""
        with open(entry.path / (obj["file"] + DONE_SUFFIX), "w", encoding="utf-8") as f:
            json.dump({"state": state, "time": time.time(), "attempts": entry.attempts, **status}, f, default=str)
            _sync(f)
        _sync_dir(entry.path)
        entry.done[obj["file"]] = state
        if not entry.pending():
            self._finish(entry)

    def _finish(self, entry: Entry):
        """Every object is done: all sent -> the folder goes; else it moves to refused/ (or expired/), with why."""
        self._forget(entry)
        states = set(entry.done.values())
        if states <= {SENT}:  # renamed first: a kill mid-removal leaves a .gone- folder, never a half entry
            gone = entry.path.with_name(".gone-" + entry.name)
            os.rename(entry.path, gone)
            _sync_dir(self.pending_dir)
            shutil.rmtree(gone, ignore_errors=True)
            return
        where = REFUSED if REFUSED in states else EXPIRED
        status = {o["file"]: json.loads((entry.path / (o["file"] + DONE_SUFFIX)).read_text(encoding="utf-8"))
                  for o in entry.objects}
        with open(entry.path / "status.json", "w", encoding="utf-8") as f:
            json.dump({"state": where, "time": time.time(), "attempts": entry.attempts, "objects": status}, f,
                      default=str)
            _sync(f)
        target = self.kept_path(entry, where)
        private_dir(target.parent)
        os.rename(entry.path, target)
        _sync_dir(target.parent)
        _sync_dir(self.pending_dir)

    def _add(self, entry: Entry):
        with self._lock:
            self._entries[entry.name] = entry
            if entry.source_uid:
                self._by_source[entry.source_uid] = entry

    def _forget(self, entry: Entry):
        with self._lock:
            self._entries.pop(entry.name, None)
            if self._by_source.get(entry.source_uid) is entry:
                del self._by_source[entry.source_uid]

    @staticmethod
    def _read(folder: Path) -> Entry | None:
        try:
            meta = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
            objects = [{"kind": "sr" if i == 0 else "sc", **o} for i, o in enumerate(meta["objects"])]
            entry = Entry(folder, float(meta["created"]), str(meta["source_uid"]), objects, meta.get("record") or {})
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not ours (or damaged by hand): left where it is, never sent half
        for o in objects:
            try:
                entry.done[o["file"]] = json.loads((folder / (o["file"] + DONE_SUFFIX)).read_text("utf-8"))["state"]
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not done (or the marker was cut by a crash: sent again, harmless)
        return entry


def _sync(f):
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
