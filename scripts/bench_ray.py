#!/usr/bin/env python
"""`xray-infer --engine ray` against `xray-infer --engine local` on one machine, in one run: throughput, where the
CPU time goes, and the memory Ray's processes take above their idle baseline.

    python scripts/bench_ray.py [--files 2000] [--distinct 40] [--model runs/demo/export] [--precision auto]
    python scripts/bench_ray.py --files 20000 --skip-local          # the memory run only

Files: half 8-bit JPEG of 1-2.5 MP (quality 90), half 16-bit DICOM of 2-5 MP (MONOCHROME2, BitsAllocated 16,
BitsStored 12 or 16 alternately, uncompressed Explicit VR Little Endian), from scripts/make_synthetic.py's renderer.
Only --distinct images are rendered; the other files are byte copies under other names (a DICOM copy gets a fresh
SOP Instance UID, patched in place at the same length). --copies auto writes real copies when they fit in half the
free disk and half the available memory (so every engine reads them from the page cache), else hard links (the
20,000-file run: 10,000 DICOMs are ~70 GB). All files are read once before the first timed run.

Runs, in this order (each an `xray-infer` subprocess, timed from start to exit; images/s = files / wall time):
  1. local: `xray-infer --engine local --format jsonl -o FILE FOLDER` (no Ray running).
  2. ray (joined head): a Ray head started here (`ray start --head --num-cpus <cores> --include-dashboard=false
     --temp-dir /tmp/rb_<pid> --port 0`, its other fixed ports moved to free ones), then
     `xray-infer --engine ray --ray-address <head> --output OUT FOLDER`. Ray's own summary line rate
     (`scored N files in S s`) is reported beside the wall-time rate: it leaves out the driver's start-up
     (imports, model check, joining Ray) and shutdown.
  3. ray (started by the CLI): the same without --ray-address (the head stopped first), so Ray starts inside the
     driver; RAY_TMPDIR points at /tmp/rb_<pid>c so its files and processes are told apart from any other Ray.
--skip-local runs 2 only. --precision is the same for every run. Both Ray clusters use token authentication (Ray's
default) with a token of their own in their temp dir (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH): see token_env().

Which processes count (a psutil scan every 0.5 s during each run; its own CPU time is printed):
  - driver: the xray-infer process itself (its peak RSS is VmHWM from /proc/PID/status, exact).
  - Ray processes of the head (run 2): every process whose command line names the head's temp dir (gcs_server,
    raylet, log_monitor.py, autoscaler monitor.py, dashboard.py) or its GCS address (the Ray client server),
    plus all of their descendants (the raylet's workers and actors, the dashboard and runtime-env agents) --
    but never the driver, whose command line names the address in --ray-address, nor this script.
  - Ray processes of run 3: every descendant of the driver (ray.init starts gcs_server, raylet, ... as its
    children; the workers are the raylet's).
  Memory: the sum of their RSS at each sample (and, every 2 s, of PSS, which shares out pages mapped by several
  processes: libraries and the plasma object store in /dev/shm, counted once per process in summed RSS). Idle
  baseline: the median of 5 samples over 2 s after the head has settled (--settle s after `ray start` returned);
  peak: the highest summed RSS of a sample during the job; "idle after": 3 s after the driver exited (memory the
  head kept).
  CPU: user + system seconds per process at its last sample, less its value when the run began (a process that
  was running then) -- so a process loses at most its last 0.5 s, and one that lives less than 0.5 s is missed;
  the machine's busy CPU seconds (/proc/stat) over the run are printed beside, as a check. Ray workers' CPU is
  split by the task or actor they ran between two samples (their process title, `ray::...`).

The head is stopped by the process ids found above (SIGTERM, SIGKILL after 5 s), never with `ray stop`: that
stops every Ray process on the machine, other users' included. Goals (the issue): ray >= 0.8 x local's images/s on
one machine; Ray processes' peak - idle <= 1 GB, the same for 2,000 and 20,000 files. Reported, not asserted.
Asserted (exit 1 otherwise): each engine exits 0 with one row per file and no errors, and the probabilities of
ray and local differ by at most 1e-6 (with --skip-local: those of the copies of one image in ray's output).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import click
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_synthetic import Anatomy, render  # noqa: E402

from xray.common.cpu import cpu_model, int8_dot_product  # noqa: E402

BIN = Path(sys.executable).parent
DX = "1.2.840.10008.5.1.4.1.1.1.1"
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; + "1" + 30 digits: every UID here has the same length
JPEG_MP, DICOM_MP = (1.0, 2.5), (2.0, 5.0)
FINDINGS = ("clear", "lower_patchy", "upper_nodules")
INTERVAL = 0.5
PSS_EVERY = 4  # PSS (smaps_rollup: the kernel walks each process's page tables, the object store's GBs
#                included: ~3 ms per Ray worker) every 4th sample only; RSS (statm) every sample
MAX_DIFF = 1e-6
SUMMARY = re.compile(r"scored (\d+) files in ([\d.]+) s \(([\d.]+) images/s\)")
STAMP = ".bench_ray.json"


T0 = time.monotonic()


def say(message: str):
    click.echo(f"[{time.monotonic() - T0:4.0f} s] {message}", err=True)


# ------------------------------------------------------------------------------------------- files


def sop_uid(i: int) -> str:
    return f"{UID_ROOT}1{i:030d}"


def render_at(rng, finding: str, megapixels: float) -> np.ndarray:
    """A synthetic radiograph of about `megapixels` MP, float64 in [0, 1]."""
    anat = Anatomy.sample(rng, 1000)
    anat = dataclasses.replace(anat, height=int(math.sqrt(megapixels * 1e6 / anat.aspect)))
    return render(finding, anat, rng)


def jpeg_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.rint(img * 255).astype(np.uint8), "L").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def dicom_bytes(img: np.ndarray, i: int, bits_stored: int) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid(i)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID, ds.Modality = generate_uid(), generate_uid(), f"R{i}", "DX"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelData = np.rint(img * (2 ** bits_stored - 1)).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def plan(files: int, distinct: int) -> list[tuple[str, int]]:
    """(file name, index of the rendered image it is a copy of) per file: JPEG and DICOM alternate; the first
    `distinct` files are the rendered ones."""
    distinct = max(min(distinct, files), min(files, 2))
    kinds = [("jpeg", (distinct + 1) // 2), ("dcm", distinct // 2)]
    out = []
    for i in range(files):
        kind, n = kinds[i % 2]
        out.append((f"{i:06d}.{kind}", 2 * ((i // 2) % n) + i % 2))
    return out


def make_images(folder: Path, files: int, distinct: int, copies: str, seed: int = 11) -> dict:
    """Render the distinct images and copy them to `files` files in `folder`; reused when a previous run of
    the same settings completed there (its stamp)."""
    layout = plan(files, distinct)
    stamp = {"files": files, "distinct": distinct, "seed": seed, "copies": copies,
             "jpeg_mp": JPEG_MP, "dicom_mp": DICOM_MP}
    stamp_path = folder / STAMP
    if stamp_path.is_file():
        old = json.loads(stamp_path.read_text())
        if {k: old.get(k) for k in stamp} == json.loads(json.dumps(stamp)):
            say(f"reusing the {files} files in {folder}")
            return old
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sources = sorted({src for _, src in layout})
    t0 = last = time.monotonic()
    megapixels = {}
    for k, src in enumerate(sources):  # src even: JPEG, odd: DICOM (plan() alternates them)
        name = layout[src][0]
        lo, hi = JPEG_MP if src % 2 == 0 else DICOM_MP
        img = render_at(rng, FINDINGS[(src // 2) % 3], float(rng.uniform(lo, hi)))
        megapixels[name] = img.size / 1e6
        data = jpeg_bytes(img) if src % 2 == 0 else dicom_bytes(img, src, (12, 16)[(src // 2) % 2])
        (folder / name).write_bytes(data)
        if time.monotonic() - last > 5 or k == len(sources) - 1:
            last = time.monotonic()
            say(f"generating: rendered {k + 1}/{len(sources)} distinct images ({time.monotonic() - t0:.0f} s)")
    sizes = {src: (folder / layout[src][0]).stat().st_size for src in sources}
    copy_bytes = sum(sizes[src] for _, src in layout[len(sources):])
    if copies == "auto":
        room = min(shutil.disk_usage(folder).free, psutil.virtual_memory().available) / 2
        copies = "bytes" if copy_bytes <= room else "hardlink"
        say(f"copies: {copies} ({copy_bytes / 2 ** 30:.1f} GB of copies; half the free disk / available memory: "
            f"{room / 2 ** 30:.1f} GB)")
    originals = {src: (folder / layout[src][0]) for src in sources}
    cache: dict = {}
    for i, (name, src) in enumerate(layout):
        if i < len(sources):
            continue
        target = folder / name
        if copies == "hardlink":
            os.link(originals[src], target)
        elif name.endswith(".dcm"):  # the same bytes but a new SOP Instance UID (file meta + dataset, same length)
            data = cache.get(src) or cache.setdefault(src, originals[src].read_bytes())
            old, new = sop_uid(src).encode(), sop_uid(i).encode()
            assert data.count(old) == 2, f"{originals[src]}: its SOP Instance UID is not where expected"
            target.write_bytes(data.replace(old, new))
        else:
            shutil.copyfile(originals[src], target)
        if len(cache) > 4:
            cache.clear()
        if time.monotonic() - last > 5 or i == len(layout) - 1:
            last = time.monotonic()
            say(f"generating: {i + 1}/{files} files ({time.monotonic() - t0:.0f} s)")
    mp = {"jpeg": [v for k, v in megapixels.items() if k.endswith(".jpeg")],
          "dcm": [v for k, v in megapixels.items() if k.endswith(".dcm")]}
    stamp.update(copied_as=copies, sources={name: src for name, src in layout},
                 megapixels={k: [min(v), max(v)] for k, v in mp.items() if v},
                 total_gb=sum(sizes[src] for _, src in layout) / 2 ** 30, seconds=time.monotonic() - t0)
    stamp_path.write_text(json.dumps(stamp))
    return stamp


def read_all(folder: Path) -> float:
    """Read every file once (page cache), so no engine pays the first read; returns the seconds it took."""
    t0 = time.monotonic()
    for p in folder.iterdir():
        if not p.name.startswith("."):
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------------- processes


def label(cmdline: list[str]) -> str:
    """A short name for a process: a Ray worker's title (ray::Task, ray::Actor, ray::Actor.__init__: the actor's
    other methods are folded into it), else its program, or its Python script (last two path parts) / module."""
    if not cmdline:
        return "?"
    first = cmdline[0]
    if first.startswith("ray::"):
        title = first.split()[0]
        if m := re.fullmatch(r"(ray::.+?)\.(\w+)", title):
            title = m.group(0) if m.group(2) == "__init__" else m.group(1)
        return title[:100]
    if "python" not in Path(first).name:
        return Path(first).name
    for k, arg in enumerate(cmdline[1:], 1):
        if arg == "-m" and k + 1 < len(cmdline):
            return cmdline[k + 1]
        if arg == "-c":
            return "python -c"
        if not arg.startswith("-"):
            return "/".join(Path(arg).parts[-2:])
    return Path(first).name


def find_ray(roots=(), driver: psutil.Process | None = None, under_driver: bool = False,
             known: dict | None = None) -> list[psutil.Process]:
    """The Ray processes (see the module docstring): with `roots`, every process whose command line holds one of
    them and all their descendants, less the driver's tree and this script; with `under_driver`, the driver's
    descendants. `known`: a cache of which processes' command lines hold a root."""
    known = {} if known is None else known
    if not roots and not (under_driver and driver):
        return []
    table = {p: p.info["ppid"] for p in psutil.process_iter(["ppid"])}
    children: dict = {}
    for p, ppid in table.items():
        children.setdefault(ppid, []).append(p)

    def tree(pid):
        out, todo = [], [pid]
        while todo:
            for c in children.get(todo.pop(), []):
                out.append(c)
                todo.append(c.pid)
        return out

    if under_driver:
        return tree(driver.pid)
    mine = {os.getpid(), *((driver.pid, *(c.pid for c in tree(driver.pid))) if driver else ())}
    found = []
    for p in table:
        if p not in known:
            try:
                line = " ".join(p.cmdline())
            except psutil.Error:
                continue
            known[p] = any(r in line for r in roots)
        if known[p] and p.pid not in mine:
            found.append(p)
    members = set(found)
    for r in found:
        members.update(tree(r.pid))
    return [p for p in members if p.pid not in mine]


class Sampler(threading.Thread):
    """Every INTERVAL s until stopped: the driver's RSS / VmHWM / CPU; the Ray processes' summed RSS and PSS;
    CPU seconds per process, attributed to a label (see the module docstring for which processes count)."""

    def __init__(self, ray_roots=(), ray_under_driver: bool = False):
        super().__init__(daemon=True)
        self.ray_roots = tuple(ray_roots)  # command-line substrings that make a process a root of the Ray tree
        self.ray_under_driver = ray_under_driver
        self.driver: psutil.Process | None = None
        self.known: dict = {}  # psutil.Process -> is a root (command line checked once per process)
        self.cpu: dict = {}  # psutil.Process -> (cpu seconds at the previous sample, title)
        self.by_label: Counter = Counter()
        self.ray_peak = {"rss": 0, "processes": 0, "by_label": {}}
        self.ray_pss_peak = 0
        self.own_cpu = 0.0  # this thread's CPU seconds: what the sampling costs the machine
        self.driver_hwm = 0
        self.samples = 0
        self.stop_event = threading.Event()
        self.old = set(psutil.process_iter())  # processes running before the run: their CPU until now is not its
        self.old_cpu = {}
        for p in self.old:
            try:
                self.old_cpu[p] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        self.machine0 = psutil.cpu_times()
        self.machine_busy = 0.0

    def watch(self, pid: int):
        self.driver = psutil.Process(pid)
        self.start()

    def ray_processes(self) -> list[psutil.Process]:
        return find_ray(self.ray_roots, self.driver, self.ray_under_driver, self.known)

    def account(self, p: psutil.Process, cpu: float, title: str, name: str | None = None):
        """CPU since the previous sample of p, to the label of what it ran (a worker's non-idle title)."""
        prev_cpu, prev_title = self.cpu.get(p, (self.old_cpu.get(p, 0.0) if p in self.old else 0.0, title))
        if name is None:
            name = title if title not in ("ray::IDLE", "?") else prev_title
        self.by_label[name] += max(0.0, cpu - prev_cpu)
        self.cpu[p] = (cpu, title)

    def sample(self):
        members = self.ray_processes()
        full = self.samples % PSS_EVERY == 0
        rss = pss = n = 0
        by_label: dict = {}
        for p in members:
            try:
                with p.oneshot():
                    mem = p.memory_full_info() if full else p.memory_info()
                    cpu = sum(p.cpu_times()[:2])
                    title = label(p.cmdline())
            except psutil.Error:
                continue
            rss, pss, n = rss + mem.rss, pss + getattr(mem, "pss", 0), n + 1
            count, total = by_label.get(title, (0, 0))
            by_label[title] = (count + 1, total + mem.rss)
            self.account(p, cpu, title)
        if n and rss > self.ray_peak["rss"]:
            self.ray_peak = {"rss": rss, "processes": n, "by_label": by_label}
        self.ray_pss_peak = max(self.ray_pss_peak, pss)
        if self.driver is not None:
            try:
                with self.driver.oneshot():
                    cpu = sum(self.driver.cpu_times()[:2])
                status = Path(f"/proc/{self.driver.pid}/status").read_text()
                self.driver_hwm = max(self.driver_hwm, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024)
                self.account(self.driver, cpu, "xray-infer (driver)", "xray-infer (driver)")
            except (psutil.Error, OSError, AttributeError):
                pass
        self.samples += 1

    def run(self):
        while not self.stop_event.is_set():
            t0, cpu0 = time.monotonic(), time.thread_time()
            self.sample()
            self.own_cpu += time.thread_time() - cpu0
            self.stop_event.wait(max(0.0, INTERVAL - (time.monotonic() - t0)))

    def finish(self) -> dict:
        self.stop_event.set()
        self.join()
        t = psutil.cpu_times()
        busy = lambda c: sum(c) - c.idle - getattr(c, "iowait", 0.0)  # noqa: E731
        driver_cpu = self.by_label.get("xray-infer (driver)", 0.0)
        ray_cpu = sum(self.by_label.values()) - driver_cpu
        return {"driver_cpu_s": driver_cpu, "ray_cpu_s": ray_cpu, "machine_busy_cpu_s": busy(t) - busy(self.machine0),
                "cpu_by_label": dict(self.by_label.most_common()), "driver_peak_rss_mb": self.driver_hwm / 2 ** 20,
                "ray_peak_rss_mb": self.ray_peak["rss"] / 2 ** 20, "ray_peak_pss_mb": self.ray_pss_peak / 2 ** 20,
                "sampler_cpu_s": self.own_cpu, "ray_processes_at_peak": self.ray_peak["processes"],
                "ray_rss_at_peak_by_label": {k: {"processes": c, "rss_mb": b / 2 ** 20} for k, (c, b) in sorted(
                    self.ray_peak["by_label"].items(), key=lambda kv: -kv[1][1])},
                "samples": self.samples}


def memory_now(roots, samples: int = 5) -> dict:
    """Median summed RSS / PSS of the Ray processes (by `roots`) over `samples` samples INTERVAL s apart."""
    rss, pss, n = [], [], []
    by_label: dict = {}
    for k in range(samples):
        members = find_ray(roots)
        total = [0, 0, 0]
        by_label = {}
        for p in members:
            try:
                with p.oneshot():
                    mem = p.memory_full_info()
                    name = label(p.cmdline())
            except psutil.Error:
                continue
            total = [total[0] + mem.rss, total[1] + mem.pss, total[2] + 1]
            count, b = by_label.get(name, (0, 0))
            by_label[name] = (count + 1, b + mem.rss)
        rss.append(total[0])
        pss.append(total[1])
        n.append(total[2])
        if k < samples - 1:
            time.sleep(INTERVAL)
    return {"rss_mb": statistics.median(rss) / 2 ** 20, "pss_mb": statistics.median(pss) / 2 ** 20,
            "processes": int(statistics.median(n)),
            "by_label": {k: {"processes": c, "rss_mb": b / 2 ** 20}  # the last sample's
                         for k, (c, b) in sorted(by_label.items(), key=lambda kv: -kv[1][1])}}


def code_state() -> str:
    """The commit, and which of the engine's files differ from it (benchmarks of a working tree say so)."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "infer"], capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def other_cpu(r: dict) -> float:
    """CPU seconds the machine spent beyond what the run's own processes account for: other programs' load,
    this script's sampling included."""
    return r["machine_busy_cpu_s"] - r["driver_cpu_s"] - r["ray_cpu_s"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_env(temp_dir: Path, env: dict) -> dict:
    """The environment for a Ray cluster of this bench: token authentication on, with a token of its own in its
    temp dir (removed with it). Left to itself, Ray 2.60's `ray start` turns token authentication on only when
    ~/.ray/auth_token exists (any local ray.init writes one), and a driver given an explicit address uses a token
    only with RAY_AUTH_MODE=token: whether it can join would depend on what ran on this machine before."""
    import secrets

    temp_dir.mkdir(parents=True, exist_ok=True)
    token = temp_dir / "bench_auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


class RayHead:
    """A Ray head of this script's own (`ray start --head`), stopped by its process ids."""

    def __init__(self, temp_dir: Path, cpus: int, env: dict):
        self.temp_dir, self.cpus = temp_dir, cpus
        self.env = token_env(temp_dir, env)  # for `ray start` and for a driver that joins the head
        self.address: str | None = None
        self.processes: list[psutil.Process] = []

    @property
    def roots(self) -> tuple:
        return (str(self.temp_dir), *((self.address,) if self.address else ()))

    def start(self):
        cmd = [BIN / "ray", "start", "--head", "--num-cpus", str(self.cpus), "--include-dashboard=false",
               "--temp-dir", str(self.temp_dir), "--port", "0", "--ray-client-server-port", str(free_port()),
               "--dashboard-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--disable-usage-stats"]
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=self.env, timeout=180)
        text = proc.stdout + proc.stderr
        m = re.search(r"ray start --address='([^']+)'", text)
        self.address = m.group(1) if m else None
        self.processes = find_ray(self.roots)  # for stop(), even if the start half failed
        if proc.returncode != 0 or not m:
            raise SystemExit(f"ray start failed ({proc.returncode}):\n{text[-3000:]}")

    def stop(self):
        """SIGTERM every process of the head (found again now, and as found at start), SIGKILL after 5 s."""
        procs = set(self.processes)
        procs.update(find_ray(self.roots))
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(procs), timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


# ------------------------------------------------------------------------------------------- runs


def run_infer(args: list, sampler: Sampler, env: dict, log_dir: Path, name: str) -> dict:
    """One xray-infer process: wall seconds, exit code, its stderr; the sampler runs while it does."""
    out, err = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    with open(out, "wb") as so, open(err, "wb") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "xray-infer"), *map(str, args)], stdout=so, stderr=se, env=env)
        sampler.watch(proc.pid)
        rc = proc.wait()
        wall = time.perf_counter() - t0
    figures = sampler.finish()
    stderr = err.read_text(errors="replace")
    res = {"wall_s": wall, "exit": rc, **figures}
    if m := SUMMARY.search(stderr):
        res.update(summary_files=int(m.group(1)), summary_s=float(m.group(2)), summary_per_s=float(m.group(3)))
    if rc != 0:
        say(f"{name}: xray-infer exited {rc}:\n{stderr[-3000:]}")
    res["stderr_tail"] = stderr[-1500:]
    return res


def local_probs(path: Path) -> tuple[dict, list]:
    probs, errors = {}, []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("error") or "probabilities" not in rec:
            errors.append(rec)
            continue
        probs[os.path.abspath(rec["file"])] = rec["probabilities"]
    return probs, errors


def ray_probs(folder: Path) -> tuple[dict, list]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder)
    classes = [c[len("prob_"):] for c in table.column_names if c.startswith("prob_")]
    rows = table.select(["path", "error_kind", *(f"prob_{c}" for c in classes)]).to_pylist()
    probs, errors = {}, []
    for r in rows:
        if r["error_kind"]:
            errors.append(r)
        else:
            probs[os.path.abspath(r["path"])] = {c: r[f"prob_{c}"] for c in classes}
    if len(probs) + len(errors) != len(rows) or len({r["path"] for r in rows}) != len(rows):
        errors.append({"problem": "a path appears more than once in the ray output"})
    return probs, errors


def max_diff(a: dict, b: dict) -> float:
    return max((abs(a[p][c] - b[p][c]) for p in a.keys() & b.keys() for c in a[p]), default=float("nan"))


def copies_diff(probs: dict, sources: dict) -> float:
    """The widest spread of one class's probability among the files that are copies of one rendered image."""
    groups: dict = {}
    for path, p in probs.items():
        groups.setdefault(sources[Path(path).name], []).append(p)
    spread = 0.0
    for rows in groups.values():
        for c in rows[0]:
            values = [r[c] for r in rows]
            spread = max(spread, max(values) - min(values))
    return spread


def check_output(name: str, probs: dict, errors: list, files: int, problems: list):
    if errors or len(probs) != files:
        problems.append(f"{name}: {len(probs)} files scored of {files}, {len(errors)} errors "
                        f"({json.dumps(errors[:2], default=str)[:300]})")


# ------------------------------------------------------------------------------------------- report


def mb(x: float) -> str:
    return f"{x:.0f} MB"


def table(res: dict) -> str:
    files = res["files"]
    lines = ["| run | value | detail |", "|---|---:|---|"]
    cores = res["cores"]

    def busy(r):
        return (f"machine busy {100 * r['machine_busy_cpu_s'] / (r['wall_s'] * cores):.0f}% of {cores} cores, "
                f"{other_cpu(r):.1f} CPU s of it not this run's ({r['sampler_cpu_s']:.1f} s the sampling here)")

    local = res.get("local")
    if local:
        lines.append(f"| local (`--engine local`) | {files / local['wall_s']:.1f} images/s | "
                     f"{local['wall_s']:.1f} s wall; CPU {local['driver_cpu_s']:.1f} s (the process); {busy(local)}; "
                     f"peak RSS {mb(local['driver_peak_rss_mb'])} |")
    for key, name in (("ray_joined", "ray (joined head)"), ("ray_cli", "ray (started by the CLI)")):
        r = res.get(key)
        if not r:
            continue
        own = (f"Ray's own summary {r['summary_per_s']:.1f} images/s over {r['summary_s']:.1f} s (start-up + "
               f"shutdown {r['wall_s'] - r['summary_s']:.1f} s)" if "summary_per_s" in r else "no summary line")
        lines.append(f"| {name} | {files / r['wall_s']:.1f} images/s | {r['wall_s']:.1f} s wall; {own}; CPU: driver "
                     f"{r['driver_cpu_s']:.1f} s, Ray processes {r['ray_cpu_s']:.1f} s; {busy(r)}; driver peak RSS "
                     f"{mb(r['driver_peak_rss_mb'])}; Ray processes peak {mb(r['ray_peak_rss_mb'])} summed RSS "
                     f"({r['ray_processes_at_peak']} processes) |")
    if local:
        for key, name in (("ray_joined", "ray (joined head)"), ("ray_cli", "ray (started by the CLI)")):
            r = res.get(key)
            if not r:
                continue
            ratio = local["wall_s"] / r["wall_s"]
            own = (f"; Ray's summary rate / local: {r['summary_per_s'] * local['wall_s'] / files:.2f}"
                   if "summary_per_s" in r else "")
            lines.append(f"| ratio {name} / local | {ratio:.2f} | goal >= 0.8: {'PASS' if ratio >= 0.8 else 'FAIL'}"
                         f"{own} |")
    m = res["memory"]
    lines += [
        f"| Ray processes, idle (summed RSS) | {mb(m['idle_rss_mb'])} | {m['idle_processes']} processes; summed "
        f"PSS {mb(m['idle_pss_mb'])} |",
        f"| Ray processes, peak during the job (summed RSS) | {mb(m['peak_rss_mb'])} | {m['peak_processes']} "
        f"processes; summed PSS peak {mb(m['peak_pss_mb'])} (sampled every {PSS_EVERY * INTERVAL:g} s) |",
        f"| Ray processes, peak - idle | {mb(m['peak_minus_idle_mb'])} | goal <= 1024 MB: "
        f"{'PASS' if m['peak_minus_idle_mb'] <= 1024 else 'FAIL'}; summed PSS peak - idle "
        f"{mb(m['peak_pss_mb'] - m['idle_pss_mb'])} |",
        f"| Ray processes, idle after the job (summed RSS) | {mb(m['after_rss_mb'])} | "
        f"{m['after_rss_mb'] - m['idle_rss_mb']:+.0f} MB over idle before; {m['after_processes']} processes |",
        f"| driver peak RSS (joined head) | {mb(m['driver_peak_rss_mb'])} | VmHWM of the xray-infer process |",
    ]
    c = res["check"]
    if "ray_vs_local" in c:
        other = (f"; ray (started by the CLI) vs local: {c['ray_cli_vs_local']:.2e}" if "ray_cli_vs_local" in c else "")
        lines.append(f"| max abs prob diff, ray vs local | {c['ray_vs_local']:.2e} | limit {MAX_DIFF:g}; {files} files "
                     f"in each output{other} |")
    lines.append(f"| max abs prob diff among copies of one image (ray) | {c['ray_copies']:.2e} | "
                 f"{res['images']['distinct']} rendered images, {files} files |")
    return "\n".join(lines)


def where_memory_goes(m: dict) -> str:
    out = []
    for key, name in (("idle_by_label", "idle"), ("peak_by_label", "at the peak"),
                      ("after_by_label", "idle after the job")):
        out.append(f"- {name}: " + ", ".join(f"{k} {v['processes']} x {v['rss_mb'] / v['processes']:.0f} MB"
                                             if v["processes"] > 1 else f"{k} {v['rss_mb']:.0f} MB"
                                             for k, v in m[key].items()))
    return "\n".join(out)


def where_time_goes(res: dict) -> str:
    out = []
    for key, name in (("local", "local"), ("ray_joined", "ray (joined head)"), ("ray_cli", "ray (started by the CLI)")):
        r = res.get(key)
        if not r:
            continue
        parts = [f"{k} {v:.1f}" for k, v in r["cpu_by_label"].items() if v >= 0.05]
        total = r["driver_cpu_s"] + r["ray_cpu_s"]
        out.append(f"- {name}: {total:.1f} CPU s counted ({1e3 * total / res['files']:.0f} ms per file), machine busy "
                   f"{r['machine_busy_cpu_s']:.1f} CPU s in {r['wall_s']:.1f} s wall: " + ", ".join(parts))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- main


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=str(ROOT / "runs" / "demo" / "export"), show_default=True,
              help="Export folder or model file (the same for every run).")
@click.option("--precision", type=click.Choice(["auto", "int8", "fp32"]), default="auto", show_default=True)
@click.option("--files", type=click.IntRange(min=2), default=2000, show_default=True,
              help="Files to score: half JPEG (1-2.5 MP), half 16-bit DICOM (2-5 MP).")
@click.option("--distinct", type=click.IntRange(min=2), default=40, show_default=True,
              help="Images rendered; the other files are copies of them under other names.")
@click.option("--copies", type=click.Choice(["auto", "bytes", "hardlink"]), default="auto", show_default=True,
              help="How the copies are made: bytes (a DICOM copy with a new SOP Instance UID), hard links, or auto "
                   "(bytes when they fit in half the free disk and half the available memory).")
@click.option("--skip-local", is_flag=True,
              help="The memory run only: ray against its own head, no local run, no run started by the CLI.")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Keep the files and outputs here (reused by a later run of the same --files / --distinct); "
                   "default a temporary folder, removed at the end.")
@click.option("--ray-arg", "ray_args", multiple=True, metavar="ARG",
              help="An extra argument for both ray runs, e.g. --ray-arg=--threads-per-actor=2 (repeatable).")
@click.option("--settle", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds to wait after `ray start` before the idle baseline is measured.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the figures here.")
def main(model, precision, files, distinct, copies, skip_local, workdir, ray_args, settle, json_path):
    """xray-infer --engine ray vs --engine local on this machine: images/s, CPU seconds, Ray's memory."""
    import ray

    from xray.infer.model import choose_model

    started = time.monotonic()
    cores = os.cpu_count() or 1
    work = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="bench_ray_"))
    work.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(f"/tmp/rb_{os.getpid()}")  # short: Ray's unix sockets live below it
    ray_tmp_cli = Path(f"/tmp/rb_{os.getpid()}c")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    model = str(Path(model).resolve())
    chosen = choose_model(model, precision=precision).path
    res = {"cpu": cpu_model(), "int8_dot_product": int8_dot_product(), "cores": cores, "files": files,
           "model": model, "precision": precision, "model_file": chosen.name, "ray_version": ray.__version__,
           "ray_args": list(ray_args), "code": code_state(), "check": {}}
    problems: list[str] = []
    head = None
    try:
        images = work / "images"
        stamp = make_images(images, files, distinct, copies)
        res["images"] = {"distinct": len(set(stamp["sources"].values())), "copied_as": stamp["copied_as"],
                         "megapixels": stamp["megapixels"], "total_gb": stamp["total_gb"]}
        res["page_cache_read_s"] = read_all(images)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        base = ["--model", model, "--precision", precision, "-q"]
        outputs = {}
        if not skip_local:
            say("run: local")
            out = work / "local.jsonl"
            res["local"] = run_infer(["--engine", "local", *base, "--format", "jsonl", "-o", out, images],
                                     Sampler(), env, logs, "local")
            outputs["local"] = local_probs(out) if res["local"]["exit"] == 0 else ({}, [{"exit": res["local"]["exit"]}])
        say("run: ray head")
        head = RayHead(ray_tmp, cores, env)
        head.start()
        time.sleep(settle)
        idle = memory_now(head.roots)
        say(f"run: ray (joined head {head.address}); idle Ray processes {idle['processes']}, {mb(idle['rss_mb'])}")
        out = work / "ray_joined"
        shutil.rmtree(out, ignore_errors=True)
        res["head"] = {"address": head.address, "temp_dir": str(ray_tmp)}
        res["ray_joined"] = run_infer(["--engine", "ray", *base, "--ray-address", head.address, "--output", out,
                                       *ray_args, images], Sampler(head.roots), head.env, logs, "ray_joined")
        outputs["ray_joined"] = ray_probs(out) if res["ray_joined"]["exit"] == 0 else (
            {}, [{"exit": res["ray_joined"]["exit"]}])
        time.sleep(3)
        after = memory_now(head.roots)
        r = res["ray_joined"]
        res["memory"] = {"idle_rss_mb": idle["rss_mb"], "idle_pss_mb": idle["pss_mb"],
                         "idle_processes": idle["processes"], "peak_rss_mb": r["ray_peak_rss_mb"],
                         "peak_pss_mb": r["ray_peak_pss_mb"], "peak_processes": r["ray_processes_at_peak"],
                         "peak_minus_idle_mb": r["ray_peak_rss_mb"] - idle["rss_mb"],
                         "after_rss_mb": after["rss_mb"], "after_processes": after["processes"],
                         "driver_peak_rss_mb": r["driver_peak_rss_mb"], "idle_by_label": idle["by_label"],
                         "peak_by_label": r["ray_rss_at_peak_by_label"], "after_by_label": after["by_label"]}
        say("stopping the head")
        head.stop()
        head = None
        if not skip_local:
            say("run: ray (started by the CLI)")
            out = work / "ray_cli"
            shutil.rmtree(out, ignore_errors=True)
            res["ray_cli"] = run_infer(["--engine", "ray", *base, "--output", out, *ray_args, images],
                                       Sampler(ray_under_driver=True),
                                       {**token_env(ray_tmp_cli, env), "RAY_TMPDIR": str(ray_tmp_cli)}, logs, "ray_cli")
            outputs["ray_cli"] = ray_probs(out) if res["ray_cli"]["exit"] == 0 else (
                {}, [{"exit": res["ray_cli"]["exit"]}])
        say("checking the outputs")
        for name, (probs, errors) in outputs.items():
            check_output(name, probs, errors, files, problems)
        c = res["check"]
        ray_out = outputs["ray_joined"][0]
        c["ray_copies"] = copies_diff(ray_out, stamp["sources"]) if ray_out else float("nan")
        if not skip_local:
            c["ray_vs_local"] = max_diff(ray_out, outputs["local"][0])
            c["ray_cli_vs_local"] = max_diff(outputs["ray_cli"][0], outputs["local"][0])
            for key in ("ray_vs_local", "ray_cli_vs_local"):
                if not c[key] <= MAX_DIFF:
                    problems.append(f"{key}: max abs probability difference {c[key]:.3g} > {MAX_DIFF:g}")
        elif not c["ray_copies"] <= MAX_DIFF:
            problems.append(f"copies of one image differ in ray's output by {c['ray_copies']:.3g} > {MAX_DIFF:g}")
    finally:
        if head is not None:
            head.stop()
        for d in (ray_tmp, ray_tmp_cli):
            shutil.rmtree(d, ignore_errors=True)
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["total_s"] = time.monotonic() - started
    img = res["images"]
    mp = img["megapixels"]
    print(f"\nRay vs local bench: {res['cpu']}, int8 dot product {', '.join(res['int8_dot_product']) or 'none'}; "
          f"{cores} cores; Ray {res['ray_version']}")
    print(f"{files} files ({(files + 1) // 2} JPEG {mp['jpeg'][0]:.1f}-{mp['jpeg'][1]:.1f} MP, {files // 2} 16-bit "
          f"DICOM {mp['dcm'][0]:.1f}-{mp['dcm'][1]:.1f} MP; {img['distinct']} rendered, the rest copied as "
          f"{img['copied_as']}; {img['total_gb']:.1f} GB); model {res['model_file']} (--precision {precision})"
          + (f"; ray runs with {' '.join(ray_args)}" if ray_args else "") + f"; code {res['code']}\n")
    print(table(res))
    print("\nRay processes of the head by kind (RSS; joined head):\n")
    print(where_memory_goes(res["memory"]))
    print("\nWhere the CPU time goes (user + system s per process kind):\n")
    print(where_time_goes(res))
    for key in ("local", "ray_joined", "ray_cli"):
        if key in res and other_cpu(res[key]) - res[key]["sampler_cpu_s"] > 0.1 * res[key]["wall_s"] * cores:
            print(f"\nWARNING: other programs used {other_cpu(res[key]):.0f} CPU s during the {key} run (more than 10% "
                  "of the machine): its figures are disturbed; run again on a quiet machine")
    print(f"\nbench total {res['total_s']:.0f} s")
    for key in ("local", "ray_joined", "ray_cli"):
        if key in res and res[key]["exit"] == 0:
            res[key].pop("stderr_tail")
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=2, default=str))
    if problems:
        for p in problems:
            say(f"FAILED: {p}")
        sys.exit(1)


if __name__ == "__main__":
    main()
