"""results.jsonl: the node's append-only record of every instance and every report, one complete JSON line
per write (a crash never leaves a half line mid-file), each fsynced before write() returns: a line is on disk
before the acknowledgement or the outbox step it records (0.18 ms a line on the VM of the README's figures). It holds patient IDs, so it is created 0600 in a 0700 folder, and
`--log-patient-id hash|omit` keeps them out of it. reopen() (SIGHUP) starts a new file after logrotate moved
the old one away."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from xray.common.errors import XrayError

log = logging.getLogger("xray.serve.dicom")
PATIENT_ID_POLICIES = ("keep", "hash", "omit")


def private_dir(path: Path) -> Path:
    """A folder only this user can read (created 0700; an existing one is narrowed to 0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


class PatientIdPolicy:
    """keep: as received; omit: left out; hash: a keyed HMAC-SHA256 (a plain hash of a short ID is reversed by
    trying every ID), so the same patient gets the same token in every line and nobody without the key can
    recover the ID."""

    def __init__(self, policy: str = "keep", key_file: str | Path | None = None):
        if policy not in PATIENT_ID_POLICIES:
            raise XrayError(f"--log-patient-id {policy!r}: one of {', '.join(PATIENT_ID_POLICIES)}")
        self.policy, self._key = policy, None
        if policy == "hash":
            if not key_file:
                raise XrayError("--log-patient-id hash needs --patient-id-key FILE (a secret kept apart from the log)")
            try:
                self._key = Path(key_file).read_bytes().strip()
            except OSError as e:
                raise XrayError(f"--patient-id-key {key_file}: {e.strerror or e}") from None
            if len(self._key) < 16:
                raise XrayError(f"--patient-id-key {key_file}: the key must be at least 16 bytes")

    def apply(self, fields: dict) -> dict:
        if self.policy == "keep" or "patient_id" not in fields:
            return fields
        out = dict(fields)
        value = out.pop("patient_id")
        if self.policy == "hash" and value:
            out["patient_id_hmac"] = hmac.new(self._key, str(value).encode(), hashlib.sha256).hexdigest()[:32]
        return out


class ResultsLog:
    def __init__(self, folder: Path, patient_ids: PatientIdPolicy | None = None):
        private_dir(folder)
        self.path = folder / "results.jsonl"
        self.patient_ids = patient_ids or PatientIdPolicy()
        self._lock = threading.Lock()
        self._file = self._open()

    def _open(self):
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # a file left by an older version may be 0644
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a kill cut the last line: the next one starts afresh
            os.write(fd, b"\n")
        return os.fdopen(fd, "a", encoding="utf-8")

    def reopen(self):
        """Continue in a new results.jsonl at the same path (logrotate renamed the old one, then sent SIGHUP).
        Call it from a thread, not from a signal handler: it takes the writers' lock."""
        with self._lock:
            if self._file.closed:
                return
            fresh = self._open()  # first: if it fails (a full disk), the log goes on in the old file
            self._file.close()
            self._file = fresh
        log.info("results log reopened: %s", self.path)

    def write(self, event: str, **fields):
        fields = self.patient_ids.apply(fields)
        line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event,
                           **fields}, default=str)
        with self._lock:
            if self._file.closed:  # an association still finishing after stop(): say so rather than fail
                log.warning("results log closed, not written: %s", line)
                return
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self):
        with self._lock:
            self._file.close()


def lines_since(path: Path, since: float, chunk: int = 1 << 20):
    """The events of a results.jsonl, newest first, back to the first one older than `since` (epoch seconds):
    what a restart reads to find the lines written for the results still in the outbox."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        end, rest = f.seek(0, os.SEEK_END), b""
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            block = f.read(end - start) + rest
            end = start
            lines = block.split(b"\n")
            rest = lines.pop(0) if start > 0 else b""  # maybe the tail of an earlier line
            for raw in reversed(lines):
                try:
                    event = json.loads(raw)
                    when = datetime.fromisoformat(event["time"]).timestamp()
                except (ValueError, KeyError, TypeError):
                    continue  # an empty or cut line (a crash mid-write at the very end)
                if when < since:
                    return
                yield event
