#!/usr/bin/env python
"""Fault injection against the DICOM node (issue #30, item 7): Orthanc (pushing instances, receiving the reports)
and DCMTK's storescu (a modality that re-sends) against `xray-serve --dicom-port`, while the node is SIGKILLed at
random moments, Orthanc is stopped and started, and instances are re-pushed.

    python scripts/chaos_node.py --minutes 2 --model runs/<run>/export [--seed 1] [--keep DIR] [--tls]

--tls: every DICOM link over mutual TLS (a test CA from scripts/make_test_pki.py): the node with --dicom-tls-cert/
-key/-ca and --send-tls-ca/-cert/-key, Orthanc with DicomTlsEnabled (its modality entry UseDicomTls), storescu +tls.

Everything runs on 127.0.0.1: an Orthanc of its own (tests/peers.py) on free ports, the node on a DICOM port chosen
once (restarts keep it; Orthanc knows it as modality "edge", AE XRAY_EDGE) with one --results folder (the outbox
survives every kill). Each generated chest DX is in its own study (its own StudyInstanceUID and PatientID), so the
reports are counted per study. The faults, in a seeded random order:
- kill during a receive: SIGKILL while a storescu or an Orthanc push is in flight (the C-STORE request is out);
- kill during a send: Orthanc stopped, reports pile up in the outbox, Orthanc started, SIGKILL as soon as the
  node's first delivery line appears, while the rest of the outbox drains;
- kill between a send and its line: the node started with XRAY_TEST_PAUSE_AFTER_SEND_S, SIGKILL on its
  "test pause after send" log line (an object in the archive, its terminal line not written);
- Orthanc outage: stopped (SIGTERM) for a few seconds and started on the same storage and ports;
and between them, traffic: new instances, re-pushes of acknowledged ones (through Orthanc and storescu), and the
modality's re-sends of every push that was not acknowledged (0x0000).

At the end (Orthanc up, the node up, every instance acknowledged, the outbox empty) it checks, from Orthanc's
REST API and results.jsonl (the contract in ARCHITECTURE.md, "Results of the DICOM node"): an acknowledged instance
has exactly one SR in its study and at most one heatmap SC, one never acknowledged at most one of each; every entry
has exactly one sr_* line (one sc_* with a heatmap), every terminal line and every duplicate_of names an entry
that has its instance line, every acknowledged instance has a receipt with a final record, nothing refused or
expired, no outbox folder left unreadable, the outbox empty at the end; the node's RSS at the end is at most
50 MB above its RSS after warm-up. One line per violation, the counts, then `K violations`. Exit 0 without
violation, 1 with, 2 on a setup error (one line). chaos.jsonl in the work folder lists every push and fault in order.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
for _folder in (ROOT / "tests", ROOT / "scripts"):  # peers.py (Orthanc), make_synthetic.py (the radiographs)
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

NODE_AE, CALLING_AE = "XRAY_EDGE", "MODALITY"
PAUSE_ENV, PAUSE_TEXT = "XRAY_TEST_PAUSE_AFTER_SEND_S", "test pause after send"
HEATMAP_DESCRIPTION = "xray-edge AI heatmap"  # serve/dicom/sr.py: the heatmap SC's SeriesDescription
SR_EVENTS = ("sr_sent", "sr_refused", "sr_expired")
SC_EVENTS = ("sc_sent", "sc_refused", "sc_expired")
NOT_DELIVERED = ("sr_refused", "sr_expired", "sc_refused", "sc_expired")
NO_REPORT = ("error", "not_classified", "refused")  # instance statuses that are final without a report
REPORTED = ("classified", "out_of_distribution")  # statuses that get a report with --send-to
FAULTS = ("receive", "send", "after_send", "outage")
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


class SetupError(Exception):
    """Something the run needs is missing or did not start: exit 2, one line."""


class NodeDown(Exception):
    """The node did not come back after a kill: a defect, not a setup error (the run ends with what it has)."""


# ---------------------------------------------------------------------------------------------------- the checks
def check(results: list[dict], orthanc: dict[str, dict], sources: dict[str, dict],
          rss_mb: tuple[float, float] | None = None, rss_slack_mb: float = 50.0) -> list[str]:
    """The violations (one line each) of a run, from what it left behind.

    results: results.jsonl's lines. orthanc: {StudyInstanceUID: {"sr": [SOP Instance UIDs], "sc": [...]}} for
    every study in the archive ("sc": the heatmap Secondary Captures). sources: {source SOP Instance UID:
    {"study": StudyInstanceUID, "acks": times a push of it was answered 0x0000}}. rss_mb: (after warm-up, at the end).
    """
    out = []
    # --- Orthanc: the reports per study
    for uid, src in sorted(sources.items()):
        found = orthanc.get(src["study"], {})
        sr, sc = len(found.get("sr", ())), len(found.get("sc", ()))
        if src["acks"]:
            if sr != 1:
                out.append(f"instance {uid} (acknowledged {src['acks']}x): {sr} SRs in its study {src['study']}, "
                           "expected exactly 1")
        elif sr > 1:
            out.append(f"instance {uid} (never acknowledged): {sr} SRs in its study {src['study']}, expected at most 1")
        if sc > 1:
            out.append(f"instance {uid}: {sc} heatmap SCs in its study {src['study']}, expected at most 1")
    studies = {s["study"] for s in sources.values()}
    for study, found in sorted(orthanc.items()):
        if study not in studies and (found.get("sr") or found.get("sc")):
            out.append(f"study {study}: {len(found.get('sr', ()))} SRs and {len(found.get('sc', ()))} heatmap SCs, "
                       "but no source instance is in that study")

    # --- results.jsonl: entries, their terminal lines, duplicates
    instances = [r for r in results if r.get("event") == "instance"]
    entries: dict[str, list[dict]] = defaultdict(list)
    for r in instances:
        if r.get("entry"):
            entries[r["entry"]].append(r)
    terminal: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {"sr": [], "sc": []})
    for r in results:
        event = r.get("event")
        if event not in SR_EVENTS + SC_EVENTS:
            continue
        kind = event[:2]
        if not r.get("entry"):
            out.append(f"{event} line for instance {r.get('sop_instance_uid')} names no entry")
            continue
        terminal[r["entry"]][kind].append(r)
        if r["entry"] not in entries:
            out.append(f"{event} line names entry {r['entry']} (instance {r.get('sop_instance_uid')}), which has no "
                       "instance line")
        if event in NOT_DELIVERED:
            out.append(f"{event} for entry {r['entry']} (instance {r.get('sop_instance_uid')}): "
                       f"{r.get('reason') or r.get('status') or 'no reason'} (Orthanc accepts everything)")
    for entry, lines in sorted(entries.items()):
        rec = lines[0]
        source = rec.get("sop_instance_uid")
        if len(lines) > 1:
            out.append(f"entry {entry} (instance {source}): {len(lines)} instance lines, expected one")
        srs, scs = terminal[entry]["sr"], terminal[entry]["sc"]
        if len(srs) != 1:
            out.append(f"entry {entry} (instance {source}): {len(srs)} sr_* lines "
                       f"({', '.join(r['event'] for r in srs) or 'none'}), expected exactly one")
        if rec.get("heatmap_sop_instance_uid"):
            if len(scs) != 1:
                out.append(f"entry {entry} (instance {source}): {len(scs)} sc_* lines "
                           f"({', '.join(r['event'] for r in scs) or 'none'}), expected exactly one (it has a heatmap)")
        elif scs:
            out.append(f"entry {entry} (instance {source}): {len(scs)} sc_* lines but its instance line names no "
                       "heatmap")
        for r in srs + scs:
            if r.get("sop_instance_uid") != source:
                out.append(f"{r['event']} line of entry {entry} names instance {r.get('sop_instance_uid')}, its "
                           f"instance line {source}")
            key = "sr_sop_instance_uid" if r["event"].startswith("sr") else "heatmap_sop_instance_uid"
            if r.get(key) and rec.get(key) and r[key] != rec[key]:
                out.append(f"{r['event']} line of entry {entry}: {key} {r[key]}, its instance line {rec[key]}")
    for r in instances:
        dup = r.get("duplicate_of")
        if dup is not None:
            if dup not in entries:
                out.append(f"instance line of {r.get('sop_instance_uid')}: duplicate_of {dup} names no entry")
            elif entries[dup][0].get("sop_instance_uid") != r.get("sop_instance_uid"):
                out.append(f"instance line of {r.get('sop_instance_uid')}: duplicate_of {dup}, an entry of another "
                           f"instance ({entries[dup][0].get('sop_instance_uid')})")
        elif r.get("status") in REPORTED and not r.get("entry"):
            out.append(f"instance line of {r.get('sop_instance_uid')} (status {r.get('status')}) names no entry and "
                       "no duplicate_of: its report is not kept")

    # --- the outbox: this run puts nothing there but the node's own results
    for folder in sorted({r.get("folder") for r in results if r.get("event") == "outbox_unreadable"}):
        out.append(f"outbox folder {folder} unreadable (no result.json): left in place, never sent or removed")

    # --- every acknowledged instance: a line per acknowledgement, and a final record
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in instances:
        by_source[r.get("sop_instance_uid")].append(r)

    def final(r: dict) -> bool:
        if r.get("status") in NO_REPORT:
            return True
        entry = r.get("entry") or r.get("duplicate_of")
        return bool(entry and entry in entries and terminal[entry]["sr"])

    for uid, src in sorted(sources.items()):
        if not src["acks"]:
            continue
        receipts = [r for r in by_source.get(uid, []) if r.get("status") != "deferred"]
        if len(receipts) < src["acks"]:
            out.append(f"instance {uid}: acknowledged {src['acks']}x but {len(receipts)} instance lines "
                       "(an acknowledgement before its line)")
        if not any(final(r) for r in receipts):
            out.append(f"instance {uid}: acknowledged {src['acks']}x, no receipt with a final record "
                       f"({len(receipts)} instance lines)")

    # --- memory
    if rss_mb is not None and rss_mb[1] > rss_mb[0] + rss_slack_mb:
        out.append(f"node RSS {rss_mb[1]:.1f} MB at the end, more than {rss_slack_mb:g} MB above its "
                   f"{rss_mb[0]:.1f} MB after warm-up")
    return out


def orthanc_reports(pacs) -> dict[str, dict]:
    """{StudyInstanceUID: {"sr": [SOP Instance UIDs], "sc": [...]}} for every study Orthanc holds (REST)."""
    studies = {s["ID"]: s["MainDicomTags"].get("StudyInstanceUID", "")
               for s in pacs.get("/studies", params={"expand": ""}).json()}
    sops = {i["ID"]: i["MainDicomTags"].get("SOPInstanceUID", "")
            for i in pacs.get("/instances", params={"expand": ""}, timeout=300).json()}
    out: dict[str, dict] = {uid: {"sr": [], "sc": []} for uid in studies.values()}
    for series in pacs.get("/series", params={"expand": ""}, timeout=300).json():
        tags = series["MainDicomTags"]
        kind = "sr" if tags.get("Modality") == "SR" else "sc" if tags.get("SeriesDescription") == HEATMAP_DESCRIPTION \
            else None
        if kind:
            out[studies[series["ParentStudy"]]][kind] += [sops.get(i, i) for i in series["Instances"]]
    return out


def read_results(folder: Path) -> list[dict]:
    path = folder / "results.jsonl"
    if not path.exists():
        return []
    lines = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"event": "unreadable", "line": n, "text": line[:200]})
    return lines


# ---------------------------------------------------------------------------------------------------- the peers
def dcmtk(tool: str) -> str:
    """DCMTK's tool, not pynetdicom's script of the same name that a venv's bin/ holds."""
    for candidate in (f"/usr/bin/{tool}", shutil.which(tool)):
        if candidate and Path(candidate).is_file():
            with open(candidate, "rb") as f:
                if f.read(2) != b"#!":
                    return candidate
    raise SetupError(f"DCMTK's {tool} not found (apt-get install dcmtk; make test-tools)")


class Node:
    """xray-serve with the DICOM node, restarted on the same DICOM port and --results folder; one log per process."""

    def __init__(self, model: Path, dicom_port: int, results: Path, send_to: str, logs: Path, extra: tuple = ()):
        self.dicom_port, self.results, self.logs = dicom_port, results, logs
        self.cmd = [sys.executable, "-c", "from xray.serve.cli import main; main(prog_name='xray-serve')",
                    "--model", str(model), "--port", "0", "--dicom-port", str(dicom_port), "--results", str(results),
                    "--send-to", send_to, "--send-heatmap", "--send-backoff-max-s", "2", "--log-level", "info",
                    *map(str, extra)]
        self.proc: subprocess.Popen | None = None
        self.starts, self.paused = 0, False
        self.expected_dead = True  # False while a process runs that nobody meant to end

    def start(self, pause_after_send_s: float | None = None, timeout: float = 120):
        import requests

        self.starts += 1
        self.paused, self.expected_dead = pause_after_send_s is not None, False
        self.log_path = self.logs / f"node-{self.starts:03d}.log"
        env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
        if pause_after_send_s is not None:
            env[PAUSE_ENV] = str(pause_after_send_s)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline, url = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NodeDown(f"the node exited {self.proc.returncode} while starting: {self.tail()}")
            text = self.log()
            if url is None and (m := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", text)):
                url = m.group(1)
            if url and re.search(rf"DICOM node \S+ listening on 127\.0\.0\.1:{self.dicom_port}\b", text):
                try:
                    if requests.get(url + "/health/ready", timeout=5).status_code == 200:
                        return
                except requests.RequestException:
                    pass
            time.sleep(0.05)
        self.kill()
        raise NodeDown(f"the node was not ready in {timeout:g} s: {self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        self.expected_dead = True
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self, timeout: float = 40):
        """SIGTERM (the node drains and stops), SIGKILL if it does not."""
        self.expected_dead = True
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) / 1024

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def wait_log(self, text: str, offset: int, timeout: float, give_up=lambda: False) -> bool:
        """Whether `text` appears in this process's log after byte `offset` within `timeout` (or before give_up())."""
        deadline, tail = time.monotonic() + timeout, b""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            while True:
                tail = (tail + f.read())[-4096:]
                if text.encode() in tail:
                    return True
                if time.monotonic() > deadline or give_up() or not self.alive():
                    return False
                time.sleep(0.002)

    def tail(self, n: int = 3) -> str:
        return " | ".join(line.strip() for line in self.log().splitlines()[-n:])


@dataclass
class Source:
    uid: str
    study: str
    path: Path
    route: str  # "orthanc" (uploaded, pushed by /modalities/edge/store) or "storescu" (the modality's file)
    orthanc_id: str | None = None
    acks: int = 0
    pushes: int = 0


class Push:
    """One push of one instance, running: storescu as a process, Orthanc's synchronous store job in a thread."""

    def __init__(self, chaos: "Chaos", src: Source, route: str):
        self.route, self.started = route, time.monotonic()
        self.ok, self.detail, self.seconds = False, "", 0.0
        if route == "storescu":
            self.proc = subprocess.Popen(
                [chaos.storescu, "-v", "-aet", CALLING_AE, "-aec", NODE_AE, "-to", "20", "-ta", "20", "-td", "30",
                 *chaos.storescu_tls, "127.0.0.1", str(chaos.node_port), str(src.path)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.thread = None
        else:
            self.proc = None
            self.thread = threading.Thread(target=self._orthanc, args=(chaos.pacs.url, src.orthanc_id), daemon=True)
            self.thread.start()

    def _orthanc(self, url: str, orthanc_id: str):
        import requests

        try:
            r = requests.post(url + "/modalities/edge/store", json={"Resources": [orthanc_id], "Synchronous": True,
                                                                    "Timeout": 30}, timeout=90)
            answer = r.json() if r.content else {}
            self.ok = r.status_code == 200 and answer.get("InstancesCount") == 1 and \
                answer.get("FailedInstancesCount") == 0
            self.detail = "" if self.ok else f"HTTP {r.status_code} {answer.get('Details') or answer}"[:300]
        except (requests.RequestException, ValueError) as e:
            self.ok, self.detail = False, str(e)[:300]
        self.seconds = time.monotonic() - self.started

    def done(self) -> bool:
        return self.proc.poll() is not None if self.proc is not None else not self.thread.is_alive()

    def wait(self) -> "Push":
        if self.proc is not None:
            try:
                text, _ = self.proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                text, _ = self.proc.communicate()
            self.seconds = time.monotonic() - self.started
            self.ok = self.proc.returncode == 0 and "Received Store Response (Success)" in text
            if not self.ok:
                self.detail = f"storescu exited {self.proc.returncode}: " + " | ".join(
                    line.strip() for line in text.splitlines() if line.startswith(("E:", "F:", "W:")))[:300]
        else:
            self.thread.join(120)
        return self


# ---------------------------------------------------------------------------------------------------- the run
class Chaos:
    def __init__(self, work: Path, model: Path, seed: int, minutes: float, size: tuple[int, int], tls: bool = False):
        import peers
        from peers import Orthanc, free_port

        self.work, self.model, self.seed, self.minutes, self.size, self.tls = work, model, seed, minutes, size, tls
        self.rng = random.Random(seed)
        self.t0 = time.monotonic()
        self.storescu = dcmtk("storescu")
        if not Path(peers.ORTHANC).exists():
            raise SetupError("Orthanc not found (apt-get install orthanc; make test-tools)")
        if not model.exists():
            raise SetupError(f"--model {model}: no such file or folder")
        self.node_port = free_port()
        self.pacs = Orthanc(work / "orthanc", modalities={"edge": (NODE_AE, "127.0.0.1", self.node_port)})
        while self.node_port in (self.pacs.http_port, self.pacs.dicom_port):
            self.node_port = free_port()
            self.pacs.config["DicomModalities"]["edge"] = [NODE_AE, "127.0.0.1", self.node_port]
        self.pacs_up = False
        self.results = work / "results"
        node_tls, self.storescu_tls = self._tls(work) if tls else ((), ())
        self.node = Node(model, self.node_port, self.results, f"ORTHANC@127.0.0.1:{self.pacs.dicom_port}", work,
                         node_tls)
        (work / "sources").mkdir(parents=True, exist_ok=True)
        self.journal_file = open(work / "chaos.jsonl", "a", encoding="utf-8")
        self.sources: dict[str, Source] = {}
        self.kills: Counter = Counter()  # receive / send / after_send / other
        self.pushes: Counter = Counter()  # new / repush / retry
        self.missed: Counter = Counter()  # faults that did not land where meant (reported, not counted as kills)
        self.outages = 0
        self.handling: list[float] = []  # seconds from the node's "Received Store Request" to the push's answer
        self.run_violations: list[str] = []
        self.rss_start: float | None = None
        self.rss_end: float | None = None

    # ------------------------------------------------------------------ output
    def _tls(self, work: Path) -> tuple[tuple, tuple]:
        """--tls: a test CA; Orthanc's DICOM port TLS-only with client certificates, and its pushes to the node over
        TLS; the node's options and storescu's. Returns (the node's extra options, storescu's)."""
        from make_test_pki import make_pki

        pki = make_pki(work / "pki")
        self.pacs.config.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.pacs.cert),
                                 "DicomTlsPrivateKey": str(pki.pacs.key), "DicomTlsTrustedCertificates": str(pki.ca.cert),
                                 "DicomTlsRemoteCertificateRequired": True})
        self.pacs.config["DicomModalities"]["edge"] = {"AET": NODE_AE, "Host": "127.0.0.1", "Port": self.node_port,
                                                       "UseDicomTls": True}
        node = ("--dicom-tls-cert", pki.server.cert, "--dicom-tls-key", pki.server.key, "--dicom-tls-ca", pki.ca.cert,
                "--send-tls-ca", pki.ca.cert, "--send-tls-cert", pki.server.cert, "--send-tls-key", pki.server.key)
        return node, ("+tls", str(pki.modality.key), str(pki.modality.cert), "+cf", str(pki.ca.cert))

    def say(self, text: str):
        print(f"[{time.monotonic() - self.t0:7.1f} s] {text}", flush=True)

    def journal(self, what: str, **fields):
        """chaos.jsonl in the work folder: every push and fault, in order (the sequence behind a violation)."""
        line = {"t": round(time.monotonic() - self.t0, 3), "what": what, **fields}
        self.journal_file.write(json.dumps(line, default=str) + "\n")
        self.journal_file.flush()

    # ------------------------------------------------------------------ sources and pushes
    def new_source(self, route: str) -> Source:
        import numpy as np
        import pydicom
        from make_synthetic import Anatomy, render
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        n = len(self.sources)
        rng = np.random.default_rng([self.seed, n])
        anatomy = Anatomy.sample(rng, self.rng.randint(*self.size))
        image = render(("clear", "lower_patchy", "upper_nodules")[n % 3], anatomy, rng)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX
        uid = lambda what: generate_uid(entropy_srcs=["xray-chaos", str(self.seed), str(n), what])  # noqa: E731
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid("instance")
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
        ds.PatientID, ds.PatientName = f"CHAOS{self.seed}-{n:05d}", f"Chaos^{n:05d}"
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
        ds.StudyDate, ds.AccessionNumber = "20240101", f"C{n:06d}"
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = np.rint(image * 4095).astype(np.uint16).tobytes()
        path = self.work / "sources" / f"{n:05d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        src = Source(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), path, route)
        if route == "orthanc":
            src.orthanc_id = self.pacs.upload(path)
        self.sources[src.uid] = src
        return src

    def start_push(self, src: Source, route: str | None = None) -> Push:
        route = route or src.route
        if route == "orthanc" and src.orthanc_id is None:
            src.orthanc_id = self.pacs.upload(src.path)
        return Push(self, src, route)

    def record(self, src: Source, push: Push):
        kind = "repush" if src.acks else "retry" if src.pushes else "new"
        self.pushes[kind] += 1
        src.pushes += 1
        if push.ok:
            src.acks += 1
        self.journal("push", kind=kind, route=push.route, uid=src.uid, ok=push.ok, seconds=round(push.seconds, 3),
                     detail=push.detail, node_pid=self.node.proc.pid)

    def push(self, src: Source, route: str | None = None) -> bool:
        p = self.start_push(src, route).wait()
        self.record(src, p)
        return p.ok

    def route(self) -> str:
        return "orthanc" if self.pacs_up and self.rng.random() < 0.5 else "storescu"

    def traffic(self, actions: int):
        """The modality re-sends what failed (up to 8), then new instances and re-pushes of acknowledged ones."""
        self.ensure_node()
        pending = [s for s in self.sources.values() if not s.acks and (s.route == "storescu" or self.pacs_up)]
        for src in pending[:8]:
            self.push(src)
        acked = [s for s in self.sources.values() if s.acks]
        for _ in range(actions):
            if acked and self.rng.random() < 0.25:
                src = self.rng.choice(acked)
                self.push(src, "orthanc" if src.orthanc_id and self.pacs_up and self.rng.random() < 0.5 else "storescu")
            else:
                self.push(self.new_source(self.route()))

    # ------------------------------------------------------------------ peers
    def ensure_node(self):
        """A node that died by itself is a defect: say so, start it again."""
        if self.node.alive():
            return
        if not self.node.expected_dead:
            v = f"the node (process {self.node.starts}) exited by itself with {self.node.proc.returncode}: " \
                f"{self.node.tail()}"
            self.run_violations.append(v)
            self.say("VIOLATION " + v)
        self.restart_node()

    def restart_node(self, pause_after_send_s: float | None = None):
        self.node.start(pause_after_send_s)
        self.journal("node_started", pid=self.node.proc.pid, pause_after_send_s=pause_after_send_s)

    def pacs_stop(self):
        self.pacs.stop()
        self.pacs_up = False
        self.outages += 1
        self.journal("orthanc_stopped")

    def pacs_start(self):
        try:
            self.pacs.start()
        except AssertionError as e:
            raise SetupError(f"Orthanc did not start: {str(e).splitlines()[0]}") from None
        self.pacs_up = True
        self.journal("orthanc_started")

    def outbox_entries(self) -> list[str]:
        folder = self.results / "outbox"
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() else []

    def results_size(self) -> int:
        path = self.results / "results.jsonl"
        return path.stat().st_size if path.exists() else 0

    def new_lines(self, offset: int) -> list[dict]:
        path = self.results / "results.jsonl"
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        out = []
        for line in data.split(b"\n"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    # ------------------------------------------------------------------ faults
    def watched_push(self, src: Source, route: str, kill_after: float | None = None) -> tuple[Push, bool]:
        """A push; once the node logs its C-STORE request, SIGKILL it kill_after seconds later if the push is
        still waiting for its answer. Returns (the push, whether the kill landed); without a kill, or when the
        answer came first, the time the node took goes into self.handling."""
        offset = self.node.log_size()
        push = self.start_push(src, route)
        killed = False
        if self.node.wait_log("Received Store Request", offset, 30, give_up=push.done):
            seen = time.monotonic()
            while not push.done() and (kill_after is None or time.monotonic() - seen < kill_after):
                time.sleep(0.001)
            if push.done():
                self.handling.append(time.monotonic() - seen)
            else:
                self.node.kill()
                killed = True
        push.wait()
        self.record(src, push)
        return push, killed

    def fault_receive(self):
        """SIGKILL between the node's "Received Store Request" and its answer (a random moment of the time it
        usually takes: decoding, classifying, the outbox, the line); an answer that came first: try again."""
        for attempt in range(8):
            route = self.route()
            src = self.new_source(route) if self.rng.random() < 0.8 or not self.sources else \
                self.rng.choice(list(self.sources.values()))
            typical = statistics.median(self.handling[-20:]) if self.handling else 0.05
            delay = self.rng.uniform(0, 0.95) * typical
            push, killed = self.watched_push(src, route, kill_after=delay)
            if not killed:
                self.missed["receive"] += 1
                continue
            self.kills["receive"] += 1
            self.journal("kill", kind="receive", during=route, uid=src.uid, delay_s=round(delay, 4), acked=push.ok,
                         outbox_left=len(self.outbox_entries()))
            self.say(f"kill during a receive ({route}, {delay * 1000:.0f} ms after the request of {typical * 1000:.0f} "
                     f"ms typical; acknowledged: {push.ok})")
            self.restart_node()
            return
        self.say("kill during a receive: 8 pushes were answered before their kill")

    def fault_send(self):
        """Reports pile up while Orthanc is down; SIGKILL at the first delivery once it is back."""
        self.pacs_stop()
        piled = 0
        for _ in range(self.rng.randint(3, 6)):
            piled += self.push(self.new_source("storescu"))
        offset = self.results_size()
        self.pacs_start()
        deadline, sent = time.monotonic() + 40, None  # 40: more than a stalled round's 30 s ACSE timeout
        while time.monotonic() < deadline and not sent and self.node.alive():
            sent = next((r for r in self.new_lines(offset) if r.get("event") in ("sr_sent", "sc_sent")), None)
            if not sent:
                time.sleep(0.005)
        if not sent:
            self.missed["send"] += 1
            self.say(f"kill during a send: no delivery in 40 s after Orthanc came back ({piled} waiting)")
            return
        time.sleep(self.rng.uniform(0, 0.03))
        self.node.kill()
        left = self.outbox_entries()
        kind = "send" if left else "other"
        self.kills[kind] += 1
        self.journal("kill", kind=kind, after=sent.get("event"), entry=sent.get("entry"), outbox_left=len(left))
        self.say(f"outage + kill during a send ({piled} piled up, {len(left)} still in the outbox at the kill)")
        self.restart_node()

    def fault_after_send(self):
        """The node with XRAY_TEST_PAUSE_AFTER_SEND_S: SIGKILL when it says it holds a delivered object's line."""
        self.node.stop()
        self.restart_node(pause_after_send_s=600)
        for _ in range(self.rng.randint(1, 2)):
            self.push(self.new_source(self.route()))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and PAUSE_TEXT not in self.node.log() and self.node.alive():
            time.sleep(0.01)
        line = next((line for line in self.node.log().splitlines() if PAUSE_TEXT in line), None)
        if line is None:
            self.missed["after_send"] += 1
            self.say(f"kill after a send: no '{PAUSE_TEXT}' in the node's log in 20 s ({PAUSE_ENV} not implemented?)")
            self.node.stop()
        else:
            self.node.kill()
            self.kills["after_send"] += 1
            self.journal("kill", kind="after_send", line=line.strip(), outbox_left=len(self.outbox_entries()))
            self.say("kill between a send and its line (" + line.split(PAUSE_TEXT, 1)[1].strip(" :")[:90] + ")")
        self.restart_node()

    def fault_outage(self):
        """Orthanc down for a few seconds; the modality's pushes go on."""
        self.pacs_stop()
        down = self.rng.uniform(2, 5)
        until = time.monotonic() + down
        for _ in range(12):
            if time.monotonic() >= until:
                break
            self.traffic(1)
        time.sleep(max(0.0, until - time.monotonic()))
        self.pacs_start()
        self.say(f"Orthanc outage: {down:.1f} s, {len(self.outbox_entries())} reports waiting when it came back")

    # ------------------------------------------------------------------ the run
    def run(self) -> list[str]:
        self.say(f"setup: Orthanc in {self.work / 'orthanc'}, the node on DICOM port {self.node_port}, model "
                 f"{self.model}, seed {self.seed}")
        self.pacs_start()
        try:
            self.restart_node()
        except NodeDown as e:
            raise SetupError(str(e)) from None
        self.say("warm-up: 4 instances (2 pushed by Orthanc, 2 by storescu)")
        for route in ("orthanc", "storescu", "orthanc", "storescu"):
            if not self.watched_push(self.new_source(route), route)[0].ok:
                raise SetupError(f"the node did not acknowledge a warm-up push ({route}): see {self.node.log_path}")
        if not self.wait_drained(60):
            raise SetupError(f"the warm-up reports did not reach Orthanc in 60 s: see {self.node.log_path}")
        self.rss_start = self.node.rss_mb()
        self.say(f"warm-up done: node RSS {self.rss_start:.1f} MB")

        deadline = self.t0 + self.minutes * 60
        cycle: list[str] = []
        rounds = 0
        try:
            while time.monotonic() < deadline and rounds < max(4, int(self.minutes * 60)):
                rounds += 1
                self.traffic(self.rng.randint(2, 5))
                if time.monotonic() >= deadline:
                    break
                if not cycle:
                    cycle = list(FAULTS)
                    self.rng.shuffle(cycle)
                fault = cycle.pop()
                self.journal("fault", kind=fault)
                getattr(self, f"fault_{fault}")()
            self.say(f"faults done ({rounds} rounds); final: Orthanc up, the node up, re-sending what was never "
                     "acknowledged")
            self.finish()
        except NodeDown as e:
            v = f"the node did not come back: {e}"
            self.run_violations.append(v)
            self.say("VIOLATION " + v)
        return self.checks()

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.outbox_entries():
                return True
            time.sleep(0.2)
        return not self.outbox_entries()

    def finish(self):
        if not self.pacs_up:
            self.pacs_start()
        if not self.node.alive() or self.node.paused:
            self.node.stop()
            self.restart_node()
        deadline, rounds = time.monotonic() + 90, 0
        while (pending := [s for s in self.sources.values() if not s.acks]) and time.monotonic() < deadline \
                and rounds < 10:
            rounds += 1
            for src in pending:
                self.ensure_node()
                self.push(src)
        for src in (s for s in self.sources.values() if not s.acks):
            v = f"instance {src.uid}: never acknowledged after {src.pushes} pushes (the last ones with the node up)"
            self.run_violations.append(v)
        self.say("drain: waiting for the outbox to empty")
        if not self.wait_drained(120):
            v = f"the outbox still holds {len(self.outbox_entries())} entries 120 s after the end: " \
                f"{', '.join(self.outbox_entries()[:5])}"
            self.run_violations.append(v)
        self.ensure_node()
        self.rss_end = self.node.rss_mb()
        self.journal("end", rss_start=self.rss_start, rss_end=self.rss_end)

    def checks(self) -> list[str]:
        self.say("checks: Orthanc's studies and results.jsonl")
        self.node.stop()
        if not self.pacs_up:
            self.pacs_start()
        self.found = orthanc_reports(self.pacs)
        self.lines = read_results(self.results)
        sources = {s.uid: {"study": s.study, "acks": s.acks} for s in self.sources.values()}
        rss = (self.rss_start, self.rss_end) if self.rss_start is not None and self.rss_end is not None else None
        refused = [r for r in self.lines if r.get("event") == "tls_refused"]
        if refused:  # every client here has a good certificate: a refusal is the node's fault (a kill mid-handshake
            # closes the socket on the client's side, which logs nothing on the next node)
            self.run_violations.append(f"{len(refused)} TLS handshakes of good clients refused, e.g. "
                                       f"{refused[0].get('reason')}")
        return check(self.lines, self.found, sources, rss) + self.run_violations

    def summary(self, violations: list[str]) -> list[str]:
        by_route = Counter(s.route for s in self.sources.values())
        srs = sum(len(v["sr"]) for v in self.found.values())
        scs = sum(len(v["sc"]) for v in self.found.values())
        acked = sum(1 for s in self.sources.values() if s.acks)
        missed = ", ".join(f"{k} {v}" for k, v in sorted(self.missed.items())) or "none"
        rss = f"{self.rss_start:.1f} MB after warm-up, {self.rss_end:.1f} MB at the end" \
            if self.rss_start is not None and self.rss_end is not None else "not measured"
        return [
            f"instances: {len(self.sources)} ({by_route['orthanc']} pushed by Orthanc, {by_route['storescu']} by "
            f"storescu)",
            f"acknowledged: {acked} (never: {len(self.sources) - acked})",
            f"pushes: {sum(self.pushes.values())} (new {self.pushes['new']}, re-pushes {self.pushes['repush']}, "
            f"retries after a failure {self.pushes['retry']})",
            f"kills: receive={self.kills['receive']} send={self.kills['send']} after_send={self.kills['after_send']} "
            f"other={self.kills['other']} (faults that missed: {missed})",
            f"orthanc outages: {self.outages}",
            f"DICOM links: {'mutual TLS (node in and out, Orthanc, storescu)' if self.tls else 'plain'}",
            f"in Orthanc: {srs} SRs, {scs} heatmap SCs",
            f"results.jsonl: {len(self.lines)} lines; node processes: {self.node.starts}",
            f"node RSS: {rss}",
            f"run time: {time.monotonic() - self.t0:.0f} s",
        ]

    def close(self):
        for stop in (self.node.kill if self.node.proc is not None else None, self.pacs.stop):
            if stop is not None:
                try:
                    stop()
                except Exception:  # cleaning up: the other peer must still stop
                    pass
        self.journal_file.close()


@click.command(help=__doc__.split("\n\n")[0].replace("\n", " "))
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="The ONNX model with heatmaps (or its export folder) the node serves.")
@click.option("--minutes", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="How long the faults go on (setup, the final drain and the checks come on top).")
@click.option("--seed", type=int, default=0, show_default=True, help="The faults' order, timing and the images.")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work in this folder and keep it (Orthanc, results/, node-*.log, chaos.jsonl, the sources); "
                   "default: a temporary folder, removed unless there were violations.")
@click.option("--size", type=(int, int), default=(128, 256), show_default=True,
              help="Smallest and largest generated image height (px).")
@click.option("--tls", is_flag=True, help="Every DICOM link over mutual TLS (a test CA made in the work folder).")
def main(model: Path, minutes: float, seed: int, keep: Path | None, size: tuple[int, int], tls: bool):
    work = keep.resolve() if keep else Path(tempfile.mkdtemp(prefix="xray-chaos-"))
    if keep:
        if keep.exists() and any(keep.iterdir()):
            print(f"error: --keep {keep}: the folder is not empty", file=sys.stderr)
            sys.exit(2)
        work.mkdir(parents=True, exist_ok=True)

    def on_term(signum, frame):  # a test's timeout or ^C: stop the peers on the way out
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    chaos = None
    try:
        chaos = Chaos(work, model.resolve(), seed, minutes, size, tls)
        violations = chaos.run()
        report = [f"VIOLATION {v}" for v in violations] + chaos.summary(violations) + [
            f"work folder: {work}" if keep or violations else "work folder: removed", f"{len(violations)} violations"]
        (work / "summary.txt").write_text("\n".join(report) + "\n")
        print("\n".join(report), flush=True)
        code = 1 if violations else 0
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        if chaos is not None:
            chaos.close()
    if not keep and code != 1:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
