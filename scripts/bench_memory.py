#!/usr/bin/env python
"""xray-serve's peak memory per kind of upload: bombs, odd DICOMs, images at the pixel limit, and 16
concurrent real-sized radiographs; torch-free (a real xray-serve on 127.0.0.1, onnxruntime only).

    python scripts/bench_memory.py --model runs/demo/export/model.onnx

Per kind: VmHWM is reset (5 > /proc/PID/clear_refs), the kind's request(s) are sent, then the server's
peak RSS (VmHWM) is read and printed over its RSS when ready, and a normal request must succeed.
Goals (issue #19): an upload whose decoded size dwarfs its bytes raises the peak by <= 300 MB over ready;
16 concurrent real-sized uploads (5-40 MB each) keep the peak under 1.5 GB. Reported, never asserted.

The file builders here (Secondary Capture headers, Deflated and RLE DICOMs written as streams, 16-bit
PNGs written row by row) are also what tests/test_decode_limits.py sends.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import click
import numpy as np
from bench_serve import free_port, wait_ready
from PIL import Image

from xray.common.cpu import cpu_model
from xray.common.imageio import DEFAULT_MAX_PIXELS

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------------- files


def sc_header(rows: int, cols: int, *, bits: int = 16, samples: int = 1, frames: int = 1, photometric: str = "",
              transfer_syntax: str = "1.2.840.10008.1.2.1", **tags):
    """A Secondary Capture dataset without pixel data: rows x cols (x frames) of `bits`-bit samples."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = photometric or ("RGB" if samples == 3 else "MONOCHROME2")
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def dicom_bytes(ds, pixels: bytes) -> bytes:
    """`ds` with `pixels` as its Pixel Data, written in its own transfer syntax (encapsulated if compressed)."""
    from pydicom.uid import UID

    ds.PixelData = pixels
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deflated_dicom(ds, pixel_chunks, length: int) -> bytes:
    """A Deflated Explicit VR Little Endian file: ds's elements, then a Pixel Data element of `length` bytes
    whose value is `pixel_chunks`, deflated as one stream (a bomb is never held inflated here)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # pydicom deflates the (small) header
    data = buf.getvalue()
    start = 144 + struct.unpack_from("<I", data, 140)[0]  # after the file meta group: its length is at 140
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    vr = b"OW" if ds.BitsAllocated > 8 else b"OB"
    parts = [data[:start], z.compress(head + struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, length))]
    parts += [z.compress(chunk) for chunk in pixel_chunks]
    return b"".join(parts + [z.flush()])


def zeros(n: int, chunk: int = 1 << 22):
    """n zero bytes in chunks."""
    for i in range(0, n, chunk):
        yield bytes(min(chunk, n - i))


def deflate_bomb(rows: int = 12000, cols: int = 12000) -> bytes:
    """A Deflated 16-bit DICOM of rows x cols zeros: 288 MB inflated, about 0.28 MB on disk."""
    return deflated_dicom(sc_header(rows, cols), zeros(rows * cols * 2), rows * cols * 2)


def deflated_multiframe(rows: int = 2000, cols: int = 2000, frames: int = 60) -> bytes:
    """A Deflated 16-bit multi-frame DICOM of zeros: 480 MB inflated at the defaults, about 0.47 MB on disk."""
    n = rows * cols * 2 * frames
    return deflated_dicom(sc_header(rows, cols, frames=frames), zeros(n), n)


def rle_multiframe(rows: int = 2000, cols: int = 2000, frames: int = 60, value: int = 1000) -> bytes:
    """An RLE Lossless 16-bit multi-frame DICOM whose frames are all `value`, run-length encoded by hand
    (pydicom's encoder is slow): 480 MB decoded at the defaults, 7.7 MB on disk."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    def segment(byte: int) -> bytes:  # PS3.5 G.3: each row on its own, replicate runs of at most 128
        row = bytes([0x81, byte]) * (cols // 128)
        rest = cols % 128
        row += bytes([257 - rest, byte]) if rest >= 2 else bytes([0, byte]) if rest else b""
        seg = row * rows
        return seg + b"\0" * (len(seg) % 2)

    high, low = segment(value >> 8), segment(value & 0xFF)
    frame = struct.pack("<16I", 2, 64, 64 + len(high), *[0] * 13) + high + low
    return dicom_bytes(sc_header(rows, cols, frames=frames, transfer_syntax=RLELossless), encapsulate([frame] * frames))


def png16(width: int, height: int, value: int = 1000) -> bytes:
    """A constant 16-bit grey PNG written row by row (never held decoded): tiny on disk, 2 bytes a pixel decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\0" + struct.pack(">H", value) * width
    idat = b"".join([z.compress(row) for _ in range(height)] + [z.flush()])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def radiograph16(size: int, seed: int) -> np.ndarray:
    """A real-sized 16-bit picture: a smooth body-like blob plus noise, so files compress as radiographs do."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[-1:1:size * 1j, -1:1:size * 1j]
    body = np.exp(-(x ** 2 / 0.5 + y ** 2 / 0.8) * 2)
    img = (body * 30000 + 2000).astype(np.uint16)
    img += rng.integers(0, 256, size=(size, size), dtype=np.uint16)
    return img


def real_sized_files(folder: Path, count: int) -> list[Path]:
    """`count` radiographs: half 16-bit uncompressed DICOMs of 4300 x 4300 (37 MB), half 16-bit PNGs."""
    out = []
    for i in range(count):
        img = radiograph16(4300 if i % 2 == 0 else 3500, seed=i % 4)
        if i % 2 == 0:
            path = folder / f"cxr{i:02d}.dcm"
            path.write_bytes(dicom_bytes(sc_header(*img.shape, WindowCenter=17000, WindowWidth=34000), img.tobytes()))
        else:
            path = folder / f"cxr{i:02d}.png"
            Image.fromarray(img).save(path, compress_level=1)
        out.append(path)
    return out


def small_png() -> bytes:
    """The normal request after each kind: an 8-bit 1024 x 1024 PNG."""
    buf = io.BytesIO()
    Image.fromarray((radiograph16(1024, 9) >> 8).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ server


def proc_status(pid: int) -> dict:
    """VmRSS and VmHWM of a process, in MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}


def reset_peak(pid: int):
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def post(port: int, name: str, body: bytes, timeout: float = 300) -> tuple[int, dict]:
    """One raw-body POST /v1/predict; (status, JSON answer)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        ctype = "application/dicom" if name.endswith(".dcm") else "image/png"
        conn.request("POST", "/v1/predict", body, {"Content-Type": ctype, "X-Filename": name})
        r = conn.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, {"detail": data[:200].decode("latin-1")}
    finally:
        conn.close()


def outcome(status: int, answer: dict) -> str:
    """One short line: the status and, per image, its prediction or error kind."""
    preds = answer.get("predictions") or []
    parts = [p["error"]["kind"] if "error" in p else p.get("prediction", "?") for p in preds]
    return f"{status} " + (",".join(sorted(set(parts))) if parts else str(answer.get("detail", ""))[:60])


def run_kind(pid: int, port: int, label: str, uploads: list[tuple[str, bytes]], decoded_mb: float,
             normal: bytes, ready_mb: float) -> dict:
    """Send `uploads` at once (one thread each), then a normal request; the peak over this kind."""
    reset_peak(pid)
    before = proc_status(pid)["VmRSS"]
    results = [None] * len(uploads)
    barrier = threading.Barrier(len(uploads))

    def send(i, name, body):
        barrier.wait()
        results[i] = post(port, name, body)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=send, args=(i, n, b)) for i, (n, b) in enumerate(uploads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    peak = proc_status(pid)["VmHWM"]
    status, answer = post(port, f"normal-{uuid.uuid4().hex[:6]}.png", normal)
    normal_ok = status == 200 and "prediction" in (answer.get("predictions") or [{}])[0]
    outcomes = sorted({outcome(*r) for r in results})
    return {"kind": label, "uploads": len(uploads), "upload_mb": sum(len(b) for _, b in uploads) / 2**20,
            "decoded_mb": decoded_mb, "answers": outcomes, "seconds": seconds, "rss_before_mb": before,
            "peak_mb": peak, "peak_over_ready_mb": peak - ready_mb, "normal_request_ok": normal_ok}


def kinds(max_pixels: int, concurrent: int, folder: Path):
    """(label, [(name, bytes)], decoded MB if fully decoded, goal) per kind, built lazily."""
    side = int(max_pixels ** 0.5)
    yield ("deflate bomb: 12000x12000 16-bit, Deflated", lambda: [("bomb.dcm", deflate_bomb())],
           12000 * 12000 * 2 / 2**20, "dwarf")
    yield ("multi-frame: 2000x2000x60 16-bit, Deflated", lambda: [("frames.dcm", deflated_multiframe())],
           2000 * 2000 * 60 * 2 / 2**20, "dwarf")
    yield ("multi-frame: 2000x2000x60 16-bit, RLE", lambda: [("rle.dcm", rle_multiframe())],
           2000 * 2000 * 60 * 2 / 2**20, "dwarf")
    yield (f"16-bit PNG at --max-pixels ({side}x{side})", lambda: [("limit.png", png16(side, side))],
           side * side * 2 / 2**20, "dwarf")
    yield (f"16-bit DICOM at --max-pixels ({side}x{side}), RLE",
           lambda: [("limit-rle.dcm", rle_multiframe(side, side, 1))], side * side * 2 / 2**20, "dwarf")
    yield (f"16-bit DICOM at --max-pixels ({side}x{side}), Deflated",
           lambda: [("limit.dcm", deflated_dicom(sc_header(side, side), zeros(side * side * 2), side * side * 2))],
           side * side * 2 / 2**20, "dwarf")

    def odd():
        grey = (radiograph16(1500, 5) >> 8).astype(np.uint8)
        rgb = np.stack([grey, grey, 255 - grey], axis=-1)
        window = sc_header(1500, 1500, bits=8, samples=3, WindowCenter=100, WindowWidth=50)
        frames = sc_header(1500, 1500, bits=8, samples=3, frames=8)
        return [("rgb_window.dcm", dicom_bytes(window, rgb.tobytes())),
                ("frames_rgb.dcm", dicom_bytes(frames, np.stack([rgb] * 8).tobytes()))]

    yield ("odd DICOMs at once: RGB with a VOI window; 8-frame RGB (1500x1500)", odd, 9 * 1500 * 1500 * 3 / 2**20, "")

    def real():
        return [(p.name, p.read_bytes()) for p in real_sized_files(folder, concurrent)]

    yield (f"{concurrent} concurrent real-sized radiographs (DICOM 4300x4300, PNG 3500x3500, 16-bit)", real,
           concurrent * 4300 * 4300 * 2 / 2**20, "concurrent")


def serve(model: str, server_args: tuple, log_path: Path):
    """xray-serve on a free port of 127.0.0.1, ready: (process, port, its log file)."""
    port = free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen([Path(sys.executable).parent / "xray-serve", "--model", model, "--port", str(port),
                             "--log-level", "warning", *server_args], stdout=log, stderr=subprocess.STDOUT)
    wait_ready(proc, port, 120)
    return proc, port, log


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=str(ROOT / "runs" / "demo" / "export"), show_default=True,
              help="An ONNX model file or an export folder.")
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Passed to xray-serve; the at-the-limit kinds use it.")
@click.option("--concurrent", default=16, show_default=True, help="Real-sized uploads sent at once.")
@click.option("--server-arg", "server_args", multiple=True, help="Extra xray-serve option (repeatable).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the figures here.")
def main(model, max_pixels, concurrent, server_args, json_out):
    """Peak RSS of xray-serve per kind of upload, each followed by a normal request."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="xray-bench-memory-") as tmp:
        proc, port, log = serve(model, ("--max-pixels", str(max_pixels), *server_args), Path(tmp) / "serve.log")
        try:
            normal = small_png()
            post(port, "warm.png", normal)
            ready = proc_status(proc.pid)["VmRSS"]
            print(f"xray-serve ready: RSS {ready:.0f} MB (model {model}, --max-pixels {max_pixels})", flush=True)
            for label, build, decoded, goal in kinds(max_pixels, concurrent, Path(tmp)):
                row = run_kind(proc.pid, port, label, build(), decoded, normal, ready)
                row["goal"] = goal
                rows.append(row)
                print(f"  {label}: peak {row['peak_mb']:.0f} MB, {row['answers']}", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log.seek(0)
            tail = log.read()[-2000:]
            log.close()
    report(rows, ready, model, max_pixels, proc.returncode, tail)
    if json_out:
        Path(json_out).write_text(json.dumps({"ready_mb": ready, "kinds": rows}, indent=2))


def report(rows: list[dict], ready: float, model: str, max_pixels: int, exit_code: int, log_tail: str):
    print(f"\nxray-serve memory bench: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; model {model}; "
          f"--max-pixels {max_pixels}; "
          f"RSS at ready {ready:.0f} MB\n")
    print("| kind | upload MB | decoded if whole MB | answer | s | RSS before MB | peak MB | peak - ready MB "
          "| next request |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['upload_mb']:.2f} | {r['decoded_mb']:.0f} | {'; '.join(r['answers'])} | "
              f"{r['seconds']:.1f} | {r['rss_before_mb']:.0f} | {r['peak_mb']:.0f} | {r['peak_over_ready_mb']:+.0f} | "
              f"{'200' if r['normal_request_ok'] else 'FAILED'} |")
    print("\nGoals (reported, never fail the script):")
    dwarf = [r for r in rows if r["goal"] == "dwarf"]
    worst = max(dwarf, key=lambda r: r["peak_over_ready_mb"])
    print(f"- {'PASS' if worst['peak_over_ready_mb'] <= 300 else 'FAIL'} an upload whose decoded size dwarfs its "
          f"bytes raises the peak <= 300 MB over ready: worst {worst['peak_over_ready_mb']:+.0f} MB ({worst['kind']})")
    for r in rows:
        if r["goal"] == "concurrent":
            print(f"- {'PASS' if r['peak_mb'] < 1536 else 'FAIL'} {r['uploads']} concurrent real-sized uploads "
                  f"peak < 1.5 GB: {r['peak_mb']:.0f} MB ({r['upload_mb']:.0f} MB of uploads)")
    ok = all(r["normal_request_ok"] for r in rows)
    print(f"- {'PASS' if ok else 'FAIL'} every kind is followed by a normal request that succeeds")
    print(f"- {'PASS' if exit_code == 0 else 'FAIL'} xray-serve exits 0 on SIGTERM: exit code {exit_code}")
    if exit_code != 0 and log_tail.strip():
        print(f"xray-serve log (tail):\n{log_tail}")


if __name__ == "__main__":
    main()
