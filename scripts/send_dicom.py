#!/usr/bin/env python
"""Try a DICOM node from a folder of .dcm files: C-ECHO, then C-STORE every file over N associations.

    python scripts/send_dicom.py FOLDER_OR_FILES... --to XRAY_EDGE@127.0.0.1:11112 [--associations 4]

Prints each file's C-STORE status and the instances per second. pynetdicom's own apps do the same one
file at a time: `python -m pynetdicom echoscu 127.0.0.1 11112 -aec XRAY_EDGE` and
`python -m pynetdicom storescu 127.0.0.1 11112 FILE -aec XRAY_EDGE -aet MODALITY`.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import click
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification


def collect(inputs) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".dicom")) \
            if item.is_dir() else [item]
    return files


def parse_destination(text: str) -> tuple[str, str, int]:
    ae, _, rest = text.partition("@")
    host, _, port = rest.rpartition(":")
    if not (ae and host and port.isdigit()):
        raise click.BadParameter(f"{text!r}: expected AE_TITLE@HOST:PORT")
    return ae, host, int(port)


def make_ae(calling: str, sop_classes) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    for sop_class in sorted(sop_classes):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


def send(ae: AE, destination, datasets, statuses: dict):
    ae_title, host, port = destination
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        for path, _ in datasets:
            statuses[path] = "association refused"
        return
    try:
        for path, ds in datasets:
            status = assoc.send_c_store(ds)
            statuses[path] = f"0x{status.Status:04X}" if "Status" in status else "no response (aborted)"
    finally:
        if assoc.is_established:
            assoc.release()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True)
@click.option("--to", "destination", required=True, metavar="AE@HOST:PORT", help="The node, e.g. XRAY_EDGE@127.0.0.1:11112")
@click.option("--calling-ae", default="SEND_DICOM", show_default=True)
@click.option("--associations", type=click.IntRange(min=1), default=1, show_default=True,
              help="Simultaneous associations (the files are shared out between them).")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True, help="Send the files this many times.")
@click.option("--quiet", "-q", is_flag=True, help="Only the summary.")
def main(inputs, destination, calling_ae, associations, repeat, quiet):
    destination = parse_destination(destination)
    files = collect(inputs)
    if not files:
        raise SystemExit("error: no .dcm files in the inputs")
    datasets = [(f"{p}#{k}" if repeat > 1 else str(p), pydicom.dcmread(p)) for k in range(repeat) for p in files]
    ae = make_ae(calling_ae, {str(ds.SOPClassUID) for _, ds in datasets})
    echo = ae.associate(destination[1], destination[2], ae_title=destination[0])
    if not echo.is_established:
        raise SystemExit(f"error: no association with {destination[0]}@{destination[1]}:{destination[2]}")
    click.echo(f"C-ECHO: 0x{echo.send_c_echo().Status:04X}")
    echo.release()
    statuses: dict = {}
    start = time.perf_counter()
    threads = [threading.Thread(target=send, args=(ae, destination, datasets[k::associations], statuses))
               for k in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if not quiet:
        for path, _ in datasets:
            click.echo(f"{statuses.get(path, 'not sent')}  {path}")
    ok = sum(1 for s in statuses.values() if s == "0x0000")
    click.echo(f"{ok} of {len(datasets)} instances stored (status 0x0000) over {associations} association(s) in "
               f"{elapsed:.2f} s: {len(datasets) / elapsed:.1f} instances/s")
    sys.exit(0 if ok == len(datasets) else 1)


if __name__ == "__main__":
    main()
