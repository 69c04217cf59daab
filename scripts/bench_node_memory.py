#!/usr/bin/env python
"""Flat memory: the DICOM node's resident memory (VmRSS) over many associations on 127.0.0.1. One xray-serve
process (--dicom-port, --max-associations 8) takes N associations from pynetdicom SCUs in this process (2 client
threads): most are one C-ECHO each, every --store-every-th one C-STORE of a small chest DX instance (16-bit words,
12 bits stored, 256-512 px, BodyPartExamined CHEST, a new SOP Instance UID each time: every store is classified).
With --send-to (the default) each report also goes through the outbox to a Storage SCP in this process (answers
0x0000), so the sender's path is exercised too. Torch-free.

    python scripts/bench_node_memory.py --model runs/demo/export [--associations 20000] [--store-every 10]

The node's RSS is read from /proc/PID/status after a warm-up of 500 associations (the baseline: the first stores,
allocator arenas and onnxruntime warmed up), at every 1,000 associations (the clients paused, no association
open), and at the end once the outbox has drained (/health/ready's outbox backlog 0). The growth is the end minus
the baseline; over 20 MB (--limit-mb) the run prints OVER and exits 1. Every C-ECHO / C-STORE must answer 0x0000:
failures are counted, and the run stops if more than 1% of the associations so far failed. Every stored instance
must be logged as classified in results.jsonl, and with --send-to its SR must reach the SCP.
"""
from __future__ import annotations

import json
import re
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]  # make_synthetic (the films), serving (xray-serve)
from make_synthetic import Anatomy, render  # noqa: E402
from serving import Server  # noqa: E402

from xray.common.cpu import cpu_model  # noqa: E402

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
WARMUP = 500  # associations before the baseline sample
EVERY = 1000  # associations between samples
MAX_FAIL = 0.01  # the run stops when more than this share of the associations so far failed


def make_datasets(n: int = 4, seed: int = 5) -> list[Dataset]:
    """n DX instances of 256-512 px from the synthetic chest renderer (UIDs renewed at each store)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        anatomy = Anatomy.sample(rng, int(rng.integers(256, 449)))  # its height varies: cropped to 512 at most
        img = render(("clear", "lower_patchy", "upper_nodules")[i % 3], anatomy, rng)[:512, :512]
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID, ds.PatientName, ds.Modality = f"MEM{i}", "Bench^Memory", "DX"
        ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = np.rint(img * 4095).astype(np.uint16).tobytes()
        out.append(ds)
    return out


def proc_status(pid: int) -> dict:
    """VmRSS / VmHWM in MB and the thread count of a process, from /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "hwm_mb": int(fields["VmHWM"].split()[0]) / 1024,
            "threads": int(fields["Threads"])}


class Pacs:
    """A Storage SCP for the node's reports; answers 0x0000 and counts them."""

    def __init__(self):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

        self.received = 0
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context(SecondaryCaptureImageStorage)
        ae.maximum_associations = 16

        def on_store(event):
            with self._lock:
                self.received += 1
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self.server.server_address[1]


class Node(Server):
    """xray-serve (tests/serving.py's Server: free ports of 127.0.0.1, ready = model warmed up) with a DICOM node."""

    def __init__(self, model: str, tmp: Path, send_to: str | None):
        self.results = tmp / "results"
        super().__init__("--model", model, "--dicom-port", 0, "--results", self.results, "--max-associations", 8,
                         *(["--send-to", send_to] if send_to else []), ready_timeout=120)
        self.port = int(re.search(r"DICOM node \S+ listening on 127\.0\.0\.1:(\d+)", self.output()).group(1))

    def backlog(self) -> int | None:
        """Reports waiting in the outbox (None without --send-to)."""
        try:
            return (requests.get(self.url + "/health/ready", timeout=10).json().get("outbox") or {}).get("backlog")
        except requests.RequestException:
            return None


class Clients:
    """pynetdicom SCUs: association i (1-based) is one C-STORE when i % store_every == 0, else one C-ECHO."""

    def __init__(self, port: int, store_every: int, datasets: list[Dataset], clients: int):
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        self.port, self.store_every, self.n_clients = port, store_every, clients
        self.failures: list[str] = []
        self.stores = self.echoes = 0
        self._lock = threading.Lock()
        self.stored_uids: list[str] = []
        self.aes, self.datasets = [], []
        for _ in range(clients):  # an AE and copies of the instances per thread: UIDs are renewed without locks
            ae = AE(ae_title="MEMBENCH")
            ae.add_requested_context(Verification)
            ae.add_requested_context(DX, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
            self.aes.append(ae)
            self.datasets.append([Dataset(ds) for ds in datasets])
            for copy, ds in zip(self.datasets[-1], datasets):
                copy.file_meta = FileMetaDataset(ds.file_meta)
        self.pool = ThreadPoolExecutor(clients, thread_name_prefix="scu")

    def one(self, k: int, i: int) -> str | None:
        """Association i from client k: None if every answer was 0x0000, else what went wrong."""
        store = i % self.store_every == 0
        if store:
            ds = self.datasets[k][(i // self.store_every) % len(self.datasets[k])]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        try:
            assoc = self.aes[k].associate("127.0.0.1", self.port, ae_title="XRAY_EDGE")
        except Exception as e:  # a socket error surfaces as a not-established association; anything else too
            return f"association {i}: {type(e).__name__}: {e}"
        if not assoc.is_established:
            return f"association {i}: not established ({'rejected' if assoc.is_rejected else 'aborted'})"
        try:
            answer = assoc.send_c_store(ds) if store else assoc.send_c_echo()
            status = answer.get("Status") if answer is not None else None
            if status != 0x0000:
                return f"association {i}: {'C-STORE' if store else 'C-ECHO'} " + \
                       (f"status 0x{status:04X}" if status is not None else "no response (aborted or timed out)")
            with self._lock:
                if store:
                    self.stores += 1
                    self.stored_uids.append(str(ds.SOPInstanceUID))
                else:
                    self.echoes += 1
            return None
        finally:
            if assoc.is_established:
                assoc.release()

    def run(self, first: int, last: int, bar):
        """Associations first..last (1-based, inclusive), shared out between the client threads; returns when
        all are done (released)."""
        def worker(k):
            for i in range(first + k, last + 1, self.n_clients):
                problem = self.one(k, i)
                with self._lock:
                    if problem:
                        self.failures.append(problem)
                    bar.update(1)

        for f in [self.pool.submit(worker, k) for k in range(self.n_clients)]:
            f.result()


def mb(x: float) -> float:
    """Rounded to 0.1 MB, without a '-0.0'."""
    return round(x, 1) + 0.0


def logged_instances(results: Path) -> dict:
    """{status: count} of the `instance` lines of results.jsonl."""
    counts: dict = {}
    for line in (results / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "instance":
            counts[record["status"]] = counts.get(record["status"], 0) + 1
    return counts


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               help=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2])
@click.option("--model", default=str(ROOT / "runs" / "demo" / "export"), show_default=True,
              help="Export folder (the faster precision on this CPU) or a model file.")
@click.option("--associations", type=click.IntRange(min=WARMUP + 1), default=20000, show_default=True,
              help=f"Associations in all, the {WARMUP} of the warm-up included.")
@click.option("--store-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Every Nth association is one C-STORE of a chest DX instance; the others one C-ECHO.")
@click.option("--send-to/--no-send-to", default=True, show_default=True,
              help="Run the node with --send-to a Storage SCP in this process (the outbox and the sender too).")
@click.option("--clients", type=click.IntRange(min=1, max=8), default=2, show_default=True,
              help="SCU threads opening associations one after the other (the node takes 8 at once).")
@click.option("--limit-mb", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Largest RSS growth from the baseline to the end that passes.")
def main(model, associations, store_every, send_to, clients, limit_mb):
    from tqdm import tqdm

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops its xray-serve (finally)
    cpu = cpu_model()
    datasets = make_datasets()
    pacs = Pacs() if send_to else None
    marks = sorted({WARMUP, *range(EVERY, associations + 1, EVERY), associations})
    samples = []  # (associations, status, outbox backlog, seconds since the start)
    with tempfile.TemporaryDirectory(prefix="bench_node_memory_") as tmp:
        try:
            node = Node(model, Path(tmp), f"PACS@127.0.0.1:{pacs.port}" if pacs else None)
        except AssertionError as e:  # did not start, or never became ready: the server's output says why
            raise SystemExit(f"error: {e}") from None
        try:
            scu = Clients(node.port, store_every, datasets, clients)
            done, t0 = 0, time.perf_counter()
            with tqdm(total=associations, desc="associations", unit="assoc", disable=None) as bar:
                for mark in marks:
                    scu.run(done + 1, mark, bar)
                    done = mark
                    samples.append((done, proc_status(node.proc.pid), node.backlog(), time.perf_counter() - t0))
                    if len(scu.failures) > MAX_FAIL * done:
                        bar.close()
                        raise SystemExit(f"error: {len(scu.failures)} of {done} associations failed (over "
                                         f"{MAX_FAIL:.0%}): {scu.failures[:5]}\nnode log tail:\n"
                                         f"{node.output()[-2000:]}")
                    if node.proc.poll() is not None:
                        raise SystemExit(f"error: xray-serve exited {node.proc.returncode} after {done} "
                                         f"associations:\n{node.output()[-2000:]}")
            elapsed = time.perf_counter() - t0
            rate = (associations - WARMUP) / (elapsed - samples[0][3])  # after the warm-up
            drain_t0, backlog = time.perf_counter(), node.backlog()
            while backlog:  # the end sample once every report has reached the SCP
                if time.perf_counter() - drain_t0 > 600:
                    raise SystemExit(f"error: the outbox still holds {backlog} reports after 600 s")
                time.sleep(0.2)
                backlog = node.backlog()
            drain_s = time.perf_counter() - drain_t0
            time.sleep(1)  # the sender's last delivery logged and its association closed
            end = proc_status(node.proc.pid)
            logged = logged_instances(node.results)
        finally:
            exit_code = node.stop()
            if pacs:
                pacs.server.shutdown()

    base = samples[0][1]["rss_mb"]
    sizes = ", ".join(f"{d.Rows}x{d.Columns}" for d in datasets)
    print(f"\nDICOM node memory: {cpu}; {associations} associations from {clients} client threads "
          f"(--max-associations 8), one in {store_every} a C-STORE (DX {sizes} px, 16-bit), the others a C-ECHO; "
          f"--send-to {'a Storage SCP in this process' if pacs else 'none'}\n")
    print("| associations | RSS MB | growth MB | threads | outbox backlog | s |\n|---:|---:|---:|---:|---:|---:|")
    for done, status, backlog, t in samples:
        print(f"| {done} | {status['rss_mb']:.1f} | {mb(status['rss_mb'] - base):+.1f} | {status['threads']} | "
              f"{'-' if backlog is None else backlog} | {t:.0f} |")
    print(f"| {associations}, end{' (outbox drained)' if pacs else ''} | {end['rss_mb']:.1f} | "
          f"{mb(end['rss_mb'] - base):+.1f} | {end['threads']} | {0 if pacs else '-'} | {elapsed + drain_s + 1:.0f} |")
    print(f"\n{rate:.1f} associations/s after the warm-up ({associations / elapsed:.1f}/s overall, {elapsed:.0f} s); "
          f"{scu.stores} C-STOREs and {scu.echoes} C-ECHOs answered 0x0000, {len(scu.failures)} associations failed"
          + (f" ({scu.failures[:3]})" if scu.failures else "") + f"; peak RSS (VmHWM) {end['hwm_mb']:.1f} MB")
    delivered = f"; the SCP received {pacs.received} reports, the outbox drained in {drain_s:.1f} s" if pacs else ""
    print(f"results.jsonl instances: {logged}{delivered}; xray-serve exit {exit_code}")
    problems = []
    if logged.get("classified", 0) + logged.get("out_of_distribution", 0) != scu.stores:
        problems.append(f"{scu.stores} instances stored but results.jsonl classified {logged}")
    if pacs and pacs.received < scu.stores:
        problems.append(f"{scu.stores} instances stored but the SCP received {pacs.received} reports")
    growth = mb(end["rss_mb"] - base)
    verdict = "ok" if growth <= limit_mb else "OVER"
    print(f"RSS growth {growth:.1f} MB over {associations - WARMUP} associations (limit {limit_mb:g} MB): {verdict}")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    if verdict == "OVER":
        sys.exit(1)


if __name__ == "__main__":
    main()
