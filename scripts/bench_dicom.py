#!/usr/bin/env python
"""The DICOM node under load on 127.0.0.1: instances per second received + classified over one association
and over four, against xray-infer on the same images as DICOM and as PNG files on disk; the same instances by
DICOMweb STOW-RS into the same server process (xray-serve --dicom-port and --dicomweb): one instance per
request and 8 per request from one keep-alive client, and one per request from four clients; then C-STORE with
--send-to a PACS (a pynetdicom SCP in this process): each report built, fsynced into the outbox before the
C-STORE is answered, and delivered — timed until the last SR has reached the PACS. Torch-free.
With --tls (the default), C-STORE at 1 and 4 associations also goes to a second node, on the DICOM port TLS-only
with client certificates required (--dicom-tls-cert/-key/-ca, --allow-ae BENCH=MODALITY: mutual TLS as a
hospital runs it), from a sender presenting the modality's certificate (a test CA from make_test_pki.py); both
nodes run at once and their rounds alternate (plain, TLS, then TLS, plain, ...; --rounds pairs, the median of
each), so the ratio TLS / plain is measured under the same load. Goal: >= 0.9 at 1 and at 4 associations. The CPU
milliseconds per instance of the node and of the sender (this process) are printed beside it: both ends share
this machine's cores, where a modality would be another machine.

    python scripts/bench_dicom.py --model runs/demo/export [--instances 48] [--rounds 4] [--no-tls]

Instances are DX (16-bit words, 12 bits stored, MONOCHROME2) generated from the synthetic chest renderer at
1200-2000 px, the size digital radiographs arrive in; every C-STORE must return 0x0000 and every instance
must appear in results.jsonl as classified, or the run fails. STOW-RS requests carry the files' bytes (encoded
before the clock starts, as C-STORE sends datasets already in memory); every request must be answered 200 with
each of its instances in the ReferencedSOPSequence and no FailedSOPSequence, and every instance must appear in
results.jsonl as classified and received_by STOW-RS. The clock runs from the first send to the last answer.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_synthetic import Anatomy, render  # noqa: E402
from make_test_pki import make_pki  # noqa: E402
from send_dicom import make_ae, send  # noqa: E402

from xray.common.cpu import cpu_model, int8_dot_product  # noqa: E402
from xray.serve.dicom.stow_client import multipart_related, parse_answer  # noqa: E402

BIN = Path(sys.executable).parent
DX = "1.2.840.10008.5.1.4.1.1.1.1"
STOW_BATCH = 8  # instances per request in the "N per request" row
STOW_MAX_UPLOAD_MB = 1024  # --max-upload-mb: 8 instances of up to 2000 x 2000 16-bit words in one request


def make_files(folder: Path, n: int, seed: int = 3) -> tuple[list[Path], list[Path]]:
    """n DX DICOMs and the same images as 8-bit PNGs."""
    rng = np.random.default_rng(seed)
    (folder / "dcm").mkdir(parents=True)
    (folder / "png").mkdir()
    dcms, pngs = [], []
    for i in range(n):
        size = int(rng.integers(1200, 2001))
        img = render(("clear", "lower_patchy", "upper_nodules")[i % 3], Anatomy.sample(rng, size), rng)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID, ds.Modality = generate_uid(), generate_uid(), f"B{i}", "DX"
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = np.rint(img * 4095).astype(np.uint16).tobytes()
        dcms.append(folder / "dcm" / f"dx{i:03d}.dcm")
        ds.save_as(dcms[-1], enforce_file_format=True)
        pngs.append(folder / "png" / f"dx{i:03d}.png")
        Image.fromarray(np.rint(img * 255).astype(np.uint8), "L").save(pngs[-1])
    return dcms, pngs


def infer_rate(model: str, folder: Path, one: Path) -> dict:
    def wall(target):
        t0 = time.perf_counter()
        proc = subprocess.run([BIN / "xray-infer", "--model", model, target, "-f", "jsonl", "-q"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"xray-infer failed: {proc.stderr[-400:]}")
        return time.perf_counter() - t0, len(proc.stdout.splitlines())

    wall(folder)  # page cache
    (total, n), (single, _) = wall(folder), wall(one)
    return {"images": n, "per_s": n / total, "steady_per_s": (n - 1) / max(total - single, 1e-9)}


def start_node(model: str, results: Path, log_path: Path, *extra):
    """xray-serve with a DICOM node; (process, DICOM port, HTTP port)."""
    log = open(log_path, "w")
    proc = subprocess.Popen([BIN / "xray-serve", "--model", model, "--port", "0", "--dicom-port", "0", "--results",
                             results, "--max-associations", "8", *extra], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if ((m := re.search(r"DICOM node \S+ listening on 127\.0\.0\.1:(\d+)", text)) and "ready" in text
                and (h := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", text))):
            return proc, int(m.group(1)), int(h.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"xray-serve did not start:\n{log_path.read_text()[-2000:]}")


class WithTls:
    """An AE whose associations are made over TLS (pynetdicom's tls_args): send_dicom.send() unchanged."""

    def __init__(self, ae, tls_args):
        self.ae, self.tls_args = ae, tls_args

    def associate(self, *args, **kwargs):
        return self.ae.associate(*args, tls_args=self.tls_args, **kwargs)


def client_tls(pki) -> tuple[ssl.SSLContext, str]:
    """The sender's side of mutual TLS: verify the node against the test CA (its SAN IP:127.0.0.1), present
    the modality's certificate."""
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.load_cert_chain(str(pki.modality.cert), str(pki.modality.key))
    return ctx, "127.0.0.1"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def store_all(port: int, datasets, associations: int, tls_args=None) -> float:
    import threading

    ae = make_ae("BENCH", {DX})
    ae = WithTls(ae, tls_args) if tls_args else ae
    statuses: dict = {}
    t0 = time.perf_counter()
    threads = [threading.Thread(target=send, args=(ae, ("XRAY_EDGE", "127.0.0.1", port), datasets[k::associations],
                                                   statuses)) for k in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - t0
    bad = [s for s in statuses.values() if s != "0x0000"]
    if bad or len(statuses) != len(datasets):
        raise SystemExit(f"{len(bad)} C-STOREs failed ({bad[:3]}), {len(datasets) - len(statuses)} not sent")
    return elapsed


def stow_all(http_port: int, datasets, per_request: int, clients: int) -> float:
    """The datasets by STOW-RS, `per_request` instances a request, from `clients` threads each with its own
    keep-alive requests.Session; seconds from the first send to the last answer."""
    import threading

    import requests

    url = f"http://127.0.0.1:{http_port}/dicomweb/studies"
    files = []
    for _, ds in datasets:  # the files' bytes, before the clock (C-STORE too sends datasets already in memory)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append((str(ds.SOPInstanceUID), buf.getvalue()))
    bodies = [({uid for uid, _ in chunk}, *multipart_related([data for _, data in chunk]))
              for chunk in (files[i:i + per_request] for i in range(0, len(files), per_request))]
    problems: list = []

    def client(mine):
        with requests.Session() as session:
            for uids, body, content_type in mine:
                r = session.post(url, data=body, timeout=600,
                                 headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
                answer = parse_answer(r.content)
                if r.status_code != 200 or answer.failed or set(answer.stored) != uids:
                    problems.append(f"HTTP {r.status_code}: {len(answer.stored)}/{len(uids)} stored, failed "
                                    f"{answer.failed or answer.text}")

    threads = [threading.Thread(target=client, args=(bodies[k::clients],)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - t0
    if problems or any(t.is_alive() for t in threads):
        raise SystemExit(f"{len(problems)} STOW-RS requests failed ({problems[:3]})")
    return elapsed


def renew(datasets):
    """New SOP Instance UIDs: each round sends new instances."""
    for _, ds in datasets:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()


def check_logged(results: Path, expected: int, timeout: float = 30, stow: int = 0) -> dict:
    """Every instance answered in results.jsonl (polled: the last line may still be on its way); `stow` of
    them received by STOW-RS."""
    deadline = time.monotonic() + timeout
    while True:
        lines = (results / "results.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if r["event"] == "instance"]
        statuses = [r["status"] for r in records]
        answered = statuses.count("classified") + statuses.count("out_of_distribution")
        by_stow = sum(r.get("received_by") == "STOW-RS" and r["status"] in ("classified", "out_of_distribution")
                      for r in records)
        if answered == expected and by_stow == stow:
            return {s: statuses.count(s) for s in sorted(set(statuses))}
        if time.monotonic() > deadline:
            raise SystemExit(f"results.jsonl answers {answered} instances ({by_stow} by STOW-RS), expected "
                             f"{expected} ({stow})")
        time.sleep(0.1)


STOW_ROWS = (("node_stow_1_per_request_per_s", 1, 1), ("node_stow_batch_per_request_per_s", STOW_BATCH, 1),
             ("node_stow_1_per_request_4_clients_per_s", 1, 4))  # (key, instances per request, clients)
STOW_LABELS = ("STOW-RS, 1 instance per request, 1 client (keep-alive session)",
               f"STOW-RS, {STOW_BATCH} instances per request, 1 client",
               "STOW-RS, 1 instance per request, 4 clients (a keep-alive session each)")


class Pacs:
    """A Storage SCP for the reports (SR, heatmap SC), counting what it receives."""

    def __init__(self):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

        self.received = []
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context(SecondaryCaptureImageStorage)
        ae.maximum_associations = 16
        handler = (evt.EVT_C_STORE, lambda event: self.received.append(event.request.AffectedSOPInstanceUID) or 0)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[handler])
        self.port = self.server.server_address[1]

    def wait_for(self, n: int, timeout: float = 300):
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"the PACS received {len(self.received)} reports, expected {n}")
            time.sleep(0.02)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=str(ROOT / "runs" / "demo" / "export"), show_default=True,
              help="Export folder (the faster precision on this CPU) or a model file.")
@click.option("--instances", type=click.IntRange(min=4), default=48, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=4, show_default=True,
              help="C-STORE rounds at 1 and at 4 associations (plain, and with --tls as many over TLS, alternated); "
                   "the median of each.")
@click.option("--tls/--no-tls", default=True, show_default=True,
              help="Also C-STORE over mutual TLS to a second node running at the same time: TLS / plain.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the figures here.")
def main(model, instances, rounds, tls, json_path):
    with tempfile.TemporaryDirectory(prefix="bench_dicom_") as tmp:
        tmp = Path(tmp)
        pki = make_pki(tmp / "pki") if tls else None
        dcms, pngs = make_files(tmp, instances)
        mb = sum(p.stat().st_size for p in dcms) / len(dcms) / 2 ** 20
        res = {"cpu": cpu_model(), "int8_dot_product": int8_dot_product(), "instances": instances,
               "mean_instance_mb": mb, "xray_infer_dicom": infer_rate(model, tmp / "dcm", dcms[0]),
               "xray_infer_png": infer_rate(model, tmp / "png", pngs[0])}
        datasets = [(str(p), pydicom.dcmread(p)) for p in dcms]
        # one process for C-STORE and STOW-RS: the same model, results logging and settings for both
        proc, port, http_port = start_node(model, tmp / "results", tmp / "serve.log", "--dicomweb",
                                           "--max-upload-mb", str(STOW_MAX_UPLOAD_MB))
        tls_proc = None
        try:
            if tls:  # the same node but TLS-only on the DICOM port, client certificates required
                tls_proc, tls_port, _ = start_node(
                    model, tmp / "results_tls", tmp / "serve_tls.log", "--dicom-tls-cert", pki.server.cert,
                    "--dicom-tls-key", pki.server.key, "--dicom-tls-ca", pki.ca.cert, "--allow-ae", "BENCH=MODALITY")
                tls_args = client_tls(pki)
                store_all(tls_port, datasets[:4], 1, tls_args)  # warm
            store_all(port, datasets[:4], 1)  # warm
            for n in (1, 4):
                rates, cpu = {"plain": [], "tls": []}, {"plain": [0.0, 0.0], "tls": [0.0, 0.0]}  # node, sender
                for r in range(rounds):  # plain, TLS; then TLS, plain; ...: drift in the machine's load cancels
                    for kind in (("plain", "tls") if r % 2 == 0 else ("tls", "plain")) if tls else ("plain",):
                        renew(datasets)
                        pid = proc.pid if kind == "plain" else tls_proc.pid
                        node0, sender0 = cpu_s(pid), time.process_time()
                        rates[kind].append(instances / (store_all(port, datasets, n) if kind == "plain" else
                                                        store_all(tls_port, datasets, n, tls_args)))
                        cpu[kind][0] += cpu_s(pid) - node0
                        cpu[kind][1] += time.process_time() - sender0
                for kind, key in (("plain", f"node_{n}_assoc"), ("tls", f"node_tls_{n}_assoc"))[:2 if tls else 1]:
                    res[f"{key}_per_s"] = statistics.median(rates[kind])
                    res[f"{key}_rounds"] = rates[kind]
                    res[f"{key}_cpu_ms_per_instance"] = [1e3 * c / (rounds * instances) for c in cpu[kind]]
                if tls:
                    res[f"tls_per_plain_{n}_assoc"] = res[f"node_tls_{n}_assoc_per_s"] / res[f"node_{n}_assoc_per_s"]
            if tls:
                res["logged_tls"] = check_logged(tmp / "results_tls", 2 * rounds * instances + 4)
            renew(datasets)
            stow_all(http_port, datasets[:4], 1, 1)  # warm the HTTP path
            for key, per_request, clients in STOW_ROWS:
                renew(datasets)
                res[key] = instances / stow_all(http_port, datasets, per_request, clients)
            res["stow_per_cstore"] = res["node_stow_1_per_request_per_s"] / res["node_1_assoc_per_s"]
            stowed = 4 + len(STOW_ROWS) * instances
            res["logged"] = check_logged(tmp / "results", 2 * rounds * instances + 4 + stowed, stow=stowed)
        finally:
            for p in (proc, tls_proc):
                if p is not None:
                    p.send_signal(signal.SIGTERM)
            res["server_exit"] = proc.wait(60)
            if tls_proc is not None:
                res["server_tls_exit"] = tls_proc.wait(60)
        pacs = Pacs()
        proc, port, _ = start_node(model, tmp / "results_sr", tmp / "serve_sr.log", "--send-to",
                                f"PACS@127.0.0.1:{pacs.port}")
        try:
            store_all(port, datasets[:4], 1)  # warm
            pacs.wait_for(4)
            for n in (1, 4):
                renew(datasets)
                t0, before = time.perf_counter(), len(pacs.received)
                res[f"node_sr_{n}_assoc_per_s"] = instances / store_all(port, datasets, n)
                pacs.wait_for(before + instances)
                res[f"node_sr_{n}_assoc_delivered_per_s"] = instances / (time.perf_counter() - t0)
            res["logged_sr"] = check_logged(tmp / "results_sr", 2 * instances + 4)
        finally:
            proc.send_signal(signal.SIGTERM)
            res["server_sr_exit"] = proc.wait(60)
            pacs.server.shutdown()
    print(f"\nDICOM node bench: {res['cpu']}, int8 dot product {res['int8_dot_product'] or 'none'}; {instances} DX "
          f"instances of 1200-2000 px (mean {mb:.1f} MB)\n")
    print("| path | instances/s |\n|---|---:|")
    for label, key in (("xray-infer, the DICOM files in one folder (steady / whole process)", "xray_infer_dicom"),
                       ("xray-infer, the same images as PNG (steady / whole process)", "xray_infer_png")):
        print(f"| {label} | {res[key]['steady_per_s']:.1f} / {res[key]['per_s']:.1f} |")
    for n in (1, 4):
        print(f"| DICOM node, C-STORE over {n} association{'s' if n > 1 else ''} (received + classified + logged) | "
              f"{res[f'node_{n}_assoc_per_s']:.1f} |")
        if tls:
            print(f"| DICOM node, C-STORE over {n} association{'s' if n > 1 else ''}, mutual TLS (client certificate "
                  f"required; received + classified + logged) | {res[f'node_tls_{n}_assoc_per_s']:.1f} |")
    for (key, per_request, clients), label in zip(STOW_ROWS, STOW_LABELS):
        print(f"| DICOM node, {label} (received + classified + logged) | {res[key]:.1f} |")
    for n in (1, 4):
        print(f"| DICOM node + SR, C-STORE over {n} association{'s' if n > 1 else ''} (+ SR built, fsynced in the "
              f"outbox) / until the last SR reached the PACS | {res[f'node_sr_{n}_assoc_per_s']:.1f} / "
              f"{res[f'node_sr_{n}_assoc_delivered_per_s']:.1f} |")
    print(f"\nSTOW-RS (1 per request) / C-STORE (1 association): {res['stow_per_cstore']:.2f}x")
    if tls:
        for n in (1, 4):
            r = res[f"tls_per_plain_{n}_assoc"]
            print(f"C-STORE mutual TLS / plain ({n} association{'s' if n > 1 else ''}): {r:.3f}x (goal >= 0.9: "
                  f"{'PASS' if r >= 0.9 else 'FAIL'}; instances/s per round, plain "
                  f"{[round(x, 1) for x in res[f'node_{n}_assoc_rounds']]}, TLS "
                  f"{[round(x, 1) for x in res[f'node_tls_{n}_assoc_rounds']]}; CPU ms per instance, node / sender: "
                  f"plain {'/'.join(f'{x:.0f}' for x in res[f'node_{n}_assoc_cpu_ms_per_instance'])}, TLS "
                  f"{'/'.join(f'{x:.0f}' for x in res[f'node_tls_{n}_assoc_cpu_ms_per_instance'])})")
    cstores = 2 * rounds * instances + 4
    print(f"\nall C-STOREs 0x0000 ({cstores} to the plain node{f', {cstores} over TLS' if tls else ''}, "
          f"{2 * instances + 4} with SRs), all {4 + len(STOW_ROWS) * instances} STOW-RS "
          f"instances stored (HTTP 200, each in the ReferencedSOPSequence), all logged with a result ({res['logged']}; "
          + (f"over TLS {res['logged_tls']}; " if tls else "")
          + f"with SRs {res['logged_sr']}); xray-serve exit {res['server_exit']}"
          + (f" / TLS {res['server_tls_exit']}" if tls else "") + f" / SR {res['server_sr_exit']}")
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
