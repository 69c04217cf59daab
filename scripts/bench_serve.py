#!/usr/bin/env python
"""xray-serve under load on 127.0.0.1 vs xray-infer on the same files; torch-free (onnxruntime only).

    python scripts/bench_serve.py --model runs/demo/export
    python scripts/bench_serve.py --model runs/demo/export --files 16 --requests-per-phase 40 --rss-requests 0

Measured in one run, on this machine, 127.0.0.1 only, every loop bounded in requests and seconds:
- --files JPEGs of 1-2.5 MP (quality 90): the demo's test images upscaled, bicubic + noise.
- xray-infer over that folder (`-f jsonl -q`, median of --infer-repeats after a warm-up run): images / wall,
  and steady = (n - 1) / (wall - one-image wall), the figure the service is held to (no start-up in it).
- 1-client reference, in process: median decode + preprocess (prepare) + median batch-1 model.predict.
- xray-serve per --clients N: N threads with keep-alive connections POST raw JPEGs to /v1/predict.
  Throughput, p50/p95/p99, errors (non-200, or not one prediction for the request's unique file name),
  lost (not answered in --max-seconds), the xray_batch_size histogram delta; server VmRSS at ready,
  after a warm-up burst, after each phase (>= --rss-requests requests in all).
- HTTPS vs HTTP (--tls, the default): a second xray-serve with --tls-cert/--tls-key (a test CA from
  make_test_pki.py; the clients verify it) beside the first; at 1 and 16 clients, --tls-rounds rounds of
  --tls-requests each on HTTP and on HTTPS, alternated (HTTP, HTTPS, then HTTPS, HTTP, ...) so both see the same
  machine load; keep-alive connections opened (TCP + TLS handshake) before the clock, so the latencies are
  per request after the handshake; the handshake's own time is reported apart (connect ms).
Goals (issue): 16 clients >= 0.9x xray-infer; 1-client p50 <= 1.3x (decode + batch-1 model); zero failed
or lost requests; RSS growth <= 10 MB; and xray-serve exits 0 on SIGTERM. HTTPS: throughput >= 0.9x HTTP at 1
and at 16 clients; 1-client p50 <= HTTP's + 2 ms.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np
from PIL import Image

from xray.common.cpu import cpu_flags, cpu_model
from xray.common.imageio import image_size, load_image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv whose python runs this: its xray-infer and xray-serve
HOST = "127.0.0.1"
TLS_CLIENTS = (1, 16)  # the HTTPS vs HTTP client counts
sys.path.insert(0, str(ROOT / "scripts"))


def make_jpegs(folder: Path, n: int, seed: int = 7) -> list[Path]:
    """n JPEGs of 1-2.5 MP, varied aspect, from data/test (else a numpy gradient), upscaled + noise."""
    rng = np.random.default_rng(seed)
    sources = sorted(p for p in (ROOT / "data" / "test").glob("*/*") if p.suffix in (".png", ".jpeg", ".jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        base = (load_image(sources[i % len(sources)]) if sources else
                Image.fromarray((np.add.outer(np.arange(256), np.arange(256)) // 2).astype(np.uint8)))
        mp, aspect = rng.uniform(1.0, 2.5) * 1e6, rng.uniform(0.8, 1.25)
        w = int((mp * aspect) ** 0.5)
        big = np.asarray(base.resize((w, int(mp / w)), Image.BICUBIC), np.float32)
        big += rng.normal(0, 4, big.shape)
        path = folder / f"img{i:04d}.jpeg"
        Image.fromarray(big.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        out.append(path)
    return out


def run_infer(model: str, target: Path) -> tuple[float, int]:
    """(wall seconds, predictions) of one xray-infer process; any error line fails the bench."""
    t0 = time.perf_counter()
    proc = subprocess.run([BIN / "xray-infer", "--model", model, target, "-f", "jsonl", "-q"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or any("error" in r for r in rows):
        raise SystemExit(f"xray-infer failed ({proc.returncode}): {proc.stderr[-500:]}")
    return wall, len(rows)


def infer_baseline(model: str, folder: Path, files: list[Path], repeats: int) -> dict:
    """Median folder wall and one-image wall (the start-up) of xray-infer, interleaved, after a warm-up run."""
    run_infer(model, folder)  # warm the page cache and the model file
    walls, ones = [], []
    for _ in range(repeats):
        walls.append(run_infer(model, folder))
        ones.append(run_infer(model, files[0])[0])
    wall, n = statistics.median(w for w, _ in walls), walls[0][1]
    one = statistics.median(ones)
    return {"images": n, "wall_s": wall, "one_image_wall_s": one, "images_per_s": n / wall,
            "steady_images_per_s": (n - 1) / max(wall - one, 1e-9)}


def single_reference(model: str, files: list[Path]) -> dict:
    """Median decode + preprocess and median batch-1 model time, in process, as the server does them."""
    from xray.infer.model import EdgeModel, choose_model
    from xray.infer.predict import prepare

    m = EdgeModel(choose_model(model).path)
    spec = m.info.spec
    decode, infer = [], []
    for f in [files[0], *files]:  # the first file twice: its first run warms the session
        data = f.read_bytes()
        t0 = time.perf_counter()
        x = prepare(data, spec, name=f.name)
        t1 = time.perf_counter()
        m.predict(x[None])
        decode.append(t1 - t0)
        infer.append(time.perf_counter() - t1)
    d, i = statistics.median(decode[1:]) * 1e3, statistics.median(infer[1:]) * 1e3
    return {"decode_ms": d, "batch1_model_ms": i, "sum_ms": d + i}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def connection(port: int, timeout: float, tls: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
    """A connection to 127.0.0.1:port, HTTPS verified against `tls` (the test CA) when given."""
    if tls is not None:
        return http.client.HTTPSConnection(HOST, port, timeout=timeout, context=tls)
    return http.client.HTTPConnection(HOST, port, timeout=timeout)


def get(port: int, path: str, timeout: float = 10, tls: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    conn = connection(port, timeout, tls)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen, port: int, timeout: float, tls: ssl.SSLContext | None = None) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"xray-serve exited with {proc.returncode} before it was ready")
        try:
            if get(port, "/health/ready", 2, tls)[0] == 200:
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"xray-serve not ready after {timeout:.0f} s")


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) / 1024


def batch_histogram(port: int) -> dict:
    """xray_batch_size from /metrics: cumulative bucket counts by upper bound, count, sum; and images."""
    text = get(port, "/metrics")[1].decode()
    found = re.findall(r'^xray_batch_size_bucket\{le="([^"]+)"\} (\S+)', text, re.M)
    buckets = {float(le): float(v) for le, v in found}
    value = lambda name: float((re.search(rf"^{name} (\S+)", text, re.M) or [0, 0])[1])
    return {"buckets": buckets, "count": value("xray_batch_size_count"), "sum": value("xray_batch_size_sum"),
            "classified": value(r'xray_images_total\{outcome="classified"\}')}


def batch_delta(before: dict, after: dict) -> dict:
    bounds = sorted(after["buckets"])
    cum = [after["buckets"][b] - before["buckets"].get(b, 0) for b in bounds]
    per = {("+Inf" if b == float("inf") else int(b)): int(c - p)  # runs per bucket, not cumulative
           for b, c, p in zip(bounds, cum, [0] + cum[:-1]) if c - p}
    runs = after["count"] - before["count"]
    return {"runs": int(runs), "per_bucket": per, "mean": (after["sum"] - before["sum"]) / runs if runs else 0.0,
            "max_bucket": max(per, key=lambda b: float(b), default=None),
            "images_classified": int(after["classified"] - before["classified"])}


def load(port: int, files: list[Path], clients: int, requests: int, max_seconds: float, tag: str,
         query: str = "", tls: ssl.SSLContext | None = None) -> dict:
    """`requests` POSTs from `clients` threads with keep-alive connections (HTTPS with `tls`), each opened
    before its first request (the TCP + TLS handshake timed apart: connect_ms); the clock starts when every
    client is connected; stops at the deadline too. query: e.g. "?preview=true&heatmap=true" (the clinician's
    views)."""
    bodies = [(f.name, f.read_bytes()) for f in files]
    lock, next_i, deadline = threading.Lock(), [0], time.monotonic() + max_seconds
    latencies, errors, connects, started = [], [], [], []
    connected = threading.Barrier(clients, action=lambda: started.append(time.perf_counter()))

    def claim():
        with lock:
            i, next_i[0] = next_i[0], next_i[0] + 1
        return i if i < requests and time.monotonic() < deadline else None

    def client():
        conn = connection(port, max(5.0, max_seconds), tls)
        t0 = time.perf_counter()
        try:
            conn.connect()  # the handshake, before the first request (keep-alive: the only one)
            with lock:
                connects.append(time.perf_counter() - t0)
        except OSError:
            conn.close()  # the first request connects again; its failure is counted there
        try:
            connected.wait(max(5.0, max_seconds))
        except threading.BrokenBarrierError:
            pass
        while (i := claim()) is not None:
            name, body = bodies[i % len(bodies)]
            name = f"{tag}-{i:05d}-{name}"  # unique: an answer meant for another request is caught
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/predict" + query, body, {"Content-Type": "image/jpeg", "X-Filename": name})
                r = conn.getresponse()
                status, data = r.status, r.read()
                reason = check_answer(status, data, name)
            except (OSError, http.client.HTTPException) as e:
                reason = f"{type(e).__name__}: {e}"
                conn.close()  # a fresh connection for the next request
            with lock:
                (errors.append(reason) if reason else latencies.append(time.perf_counter() - t0))
        conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    elapsed = time.perf_counter() - (started[0] if started else t0)
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {"clients": clients, "planned": requests, "answered": len(latencies), "errors": len(errors),
            "lost": requests - len(latencies) - len(errors), "error_samples": sorted(set(errors))[:5],
            "elapsed_s": elapsed, "images_per_s": len(latencies) / elapsed,
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)},
            "connect_ms": float(np.median(connects) * 1e3) if connects else float("nan"),
            "_latencies_ms": [float(x) for x in ms if x == x]}  # "_": not in --json


def pooled(rounds: list[dict]) -> dict:
    """Rounds of one protocol and client count as one figure: images/s the median of the rounds', percentiles
    of all their latencies together, connect ms the median."""
    ms = np.array([x for r in rounds for x in r["_latencies_ms"]] or [np.nan])
    return {"clients": rounds[0]["clients"], "rounds": len(rounds), "planned": sum(r["planned"] for r in rounds),
            "answered": sum(r["answered"] for r in rounds), "errors": sum(r["errors"] for r in rounds),
            "lost": sum(r["lost"] for r in rounds),
            "error_samples": sorted({e for r in rounds for e in r["error_samples"]})[:5],
            "images_per_s": statistics.median(r["images_per_s"] for r in rounds),
            "images_per_s_rounds": [r["images_per_s"] for r in rounds],
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)},
            "connect_ms": statistics.median(r["connect_ms"] for r in rounds),
            "cpu_ms_per_request": [1e3 * sum(r["_cpu_s"][k] for r in rounds)  # [server, clients]
                                   / max(1, sum(r["answered"] for r in rounds)) for k in (0, 1)]}


def public(obj):
    """obj without the "_" keys (the raw latencies), for --json."""
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items() if not str(k).startswith("_")}
    return [public(v) for v in obj] if isinstance(obj, list) else obj


def check_answer(status: int, data: bytes, name: str) -> str | None:
    if status != 200:
        return f"HTTP {status}: {data[:120]!r}"
    try:
        preds = json.loads(data)["predictions"]
    except (ValueError, KeyError, TypeError):
        return "answer is not the predict JSON"
    if len(preds) != 1 or preds[0].get("file") != name or "prediction" not in preds[0]:
        return "answer is not one prediction for the file sent"
    return None


@contextmanager
def serving(model: str, server_args: tuple, ready_timeout: float, log_path: Path, res: dict, pki=None):
    """xray-serve on a free 127.0.0.1 port while the block runs (HTTPS only with the certificates of `pki`,
    make_test_pki.TestPki); then SIGTERM (kill after 40 s) and its exit code in res["server_exit"], its log in
    res["server_log"]."""
    port = free_port()
    tls_args = ("--tls-cert", pki.server.cert, "--tls-key", pki.server.key) if pki else ()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([BIN / "xray-serve", "--model", model, "--port", str(port), "--log-level", "warning",
                                 *tls_args, *server_args], stdout=log, stderr=subprocess.STDOUT)
        try:
            res["ready_s"] = wait_ready(proc, port, ready_timeout, client_tls(pki) if pki else None)
            yield proc, port
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            res["server_exit"] = proc.returncode
            log.seek(0)
            res["server_log"] = log.read()[-3000:]
            if res["server_log"].strip():
                print(f"xray-serve log (tail):\n{res['server_log']}")


def client_tls(pki) -> ssl.SSLContext:
    """The clients' context: the server verified against the test CA (its certificate names IP 127.0.0.1)."""
    return ssl.create_default_context(cafile=str(pki.ca.cert))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare_tls(http: tuple[int, int], https: tuple[int, int], tls: ssl.SSLContext, files: list[Path], requests: int,
                rounds: int, max_seconds: float) -> dict:
    """At each of TLS_CLIENTS: `rounds` rounds of `requests` on HTTP and on HTTPS, alternated; pooled per protocol.
    http, https: (port, server pid). The CPU seconds of the server and of this process (the clients) are summed."""
    out = {"requests_per_round": requests, "rounds": rounds, "http": [], "https": [],
           "mean_upload_kb": sum(f.stat().st_size for f in files) / len(files) / 1024}
    for c in TLS_CLIENTS:
        got = {"http": [], "https": []}
        for r in range(rounds):
            for kind in ("http", "https") if r % 2 == 0 else ("https", "http"):
                port, pid = https if kind == "https" else http
                server0, client0 = cpu_s(pid), time.process_time()
                phase = load(port, files, c, requests, max_seconds, f"{kind}{c}r{r}",
                             tls=tls if kind == "https" else None)
                phase["_cpu_s"] = (cpu_s(pid) - server0, time.process_time() - client0)
                got[kind].append(phase)
        for kind in got:
            out[kind].append(pooled(got[kind]))
        print(f"  HTTPS vs HTTP, {c} clients: {out['https'][-1]['images_per_s']:.1f} vs "
              f"{out['http'][-1]['images_per_s']:.1f} img/s", flush=True)
    return out


def report(res: dict):
    cpu, base, ref, sm = res["cpu"], res["xray_infer"], res["single_reference"], res["server_model"]
    print(f"\nxray-serve bench: {cpu['name']}, {cpu['cores']} cores, int8 dot product: {cpu['int8_flags'] or 'none'}; "
          f"server model {sm['file']} ({sm['chosen_because'] or sm['precision']}); {res['files']} JPEGs of "
          f"{res['megapixels'][0]:.1f}-{res['megapixels'][1]:.1f} MP\n")
    print("| mode | clients | requests | errors | img/s | p50 ms | p95 ms | p99 ms | mean batch | max batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, key in (("with start-up", "images_per_s"), ("steady", "steady_images_per_s")):
        print(f"| xray-infer folder, {label} | - | {base['images']} | 0 | {base[key]:.1f} | - | - | - | - | - |")
    for p in res["phases"]:
        b = p["batches"]
        print(f"| xray-serve | {p['clients']} | {p['answered']}/{p['planned']} | {p['errors'] + p['lost']} | "
              f"{p['images_per_s']:.1f} | {p['p50_ms']:.1f} | {p['p95_ms']:.1f} | {p['p99_ms']:.1f} | "
              f"{b['mean']:.2f} | {b['max_bucket']} |")
    print(f"\nxray-infer: one-image process {base['one_image_wall_s']:.2f} s (start-up); 1-client reference in "
          f"process: decode {ref['decode_ms']:.1f} ms + batch-1 model {ref['batch1_model_ms']:.1f} ms = "
          f"{ref['sum_ms']:.1f} ms")
    for p in res["phases"]:
        print(f"batch sizes at {p['clients']} clients (runs per bucket upper bound): {p['batches']['per_bucket']}; "
              f"server classified {p['batches']['images_classified']} images for {p['answered']} answers"
              + (f"; errors: {p['error_samples']}" if p["error_samples"] else ""))
    print(f"server RSS MB: {res['rss_mb']['ready']:.1f} at ready, {res['rss_mb']['warm']:.1f} after the warm-up, "
          f"after each phase {[round(p['rss_mb_after'], 1) for p in res['phases']]} "
          f"({res['requests_total']} requests)")
    if "tls" in res:
        t = res["tls"]
        print(f"\nHTTPS vs HTTP: two servers up at once, {t['rounds']} alternated rounds of {t['requests_per_round']} "
              f"requests (mean upload {t['mean_upload_kb']:.0f} KB) per protocol and client count (img/s: the median "
              "round; percentiles: all rounds' requests; connect: TCP + TLS handshake, before the clock; CPU ms per "
              "request, handshakes included: the server's / the clients' (this process), both on this machine)\n")
        print("| protocol | clients | requests | errors | img/s | p50 ms | p95 ms | p99 ms | connect ms | "
              "CPU ms per request | img/s per round |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for http, https in zip(t["http"], t["https"]):
            for label, p in (("HTTP", http), ("HTTPS", https)):
                print(f"| {label} | {p['clients']} | {p['answered']}/{p['planned']} | {p['errors'] + p['lost']} | "
                      f"{p['images_per_s']:.1f} | {p['p50_ms']:.1f} | {p['p95_ms']:.1f} | {p['p99_ms']:.1f} | "
                      f"{p['connect_ms']:.2f} | {p['cpu_ms_per_request'][0]:.1f} / {p['cpu_ms_per_request'][1]:.1f} | "
                      f"{[round(x, 1) for x in p['images_per_s_rounds']]} |")
        print()
        for http, https in zip(t["http"], t["https"]):
            r = https["images_per_s"] / http["images_per_s"]
            print(f"HTTPS / HTTP at {http['clients']} client(s): throughput {r:.3f}x (goal >= 0.9: "
                  f"{'PASS' if r >= 0.9 else 'FAIL'}), p50 {https['p50_ms'] - http['p50_ms']:+.1f} ms"
                  + (f" (goal <= +2 ms: {'PASS' if https['p50_ms'] <= http['p50_ms'] + 2 else 'FAIL'})"
                     if http["clients"] == 1 else "")
                  + (f"; errors: {https['error_samples'] + http['error_samples']}"
                     if https["error_samples"] or http["error_samples"] else ""))
        print(f"HTTPS server: ready in {t['server']['ready_s']:.1f} s, exit {t['server']['server_exit']} on SIGTERM")
    print("\nGoals (reported, never fail the script):")
    for g in res["goals"]:
        print(f"- {'PASS' if g['pass'] else 'FAIL'} {g['goal']}: {g['measured']}")
    by = {p["clients"]: p for p in res["phases"]}
    for v in res.get("views", []):
        plain = by[v["clients"]]
        print(f"views ({VIEWS_QUERY}) at {v['clients']} client(s): p50 {v['p50_ms']:.1f} ms vs {plain['p50_ms']:.1f} "
              f"({v['p50_ms'] - plain['p50_ms']:+.1f} ms), {v['images_per_s']:.1f} vs {plain['images_per_s']:.1f} img/s, "
              f"{v['errors'] + v['lost']} failed")


VIEWS_QUERY = "?preview=true&heatmap=true"


def goals(res: dict) -> list[dict]:
    phases, base, ref, rss = res["phases"], res["xray_infer"], res["single_reference"], res["rss_mb"]
    by = {p["clients"]: p for p in phases}
    out = []
    if 16 in by:
        r = by[16]["images_per_s"] / base["steady_images_per_s"]
        out.append(("16-client throughput >= 0.9x xray-infer (steady folder figure)", r >= 0.9,
                    f"{by[16]['images_per_s']:.1f} / {base['steady_images_per_s']:.1f} = {r:.2f} "
                    f"(vs with start-up: {by[16]['images_per_s'] / base['images_per_s']:.2f})"))
    if 1 in by:
        r = by[1]["p50_ms"] / ref["sum_ms"]
        out.append(("1-client p50 <= 1.3x (decode + batch-1 model)", r <= 1.3,
                    f"{by[1]['p50_ms']:.1f} / {ref['sum_ms']:.1f} ms = {r:.2f}"))
    bad = sum(p["errors"] + p["lost"] for p in phases)
    mismatch = sum(p["batches"]["images_classified"] != p["answered"] for p in phases)
    out.append(("zero failed or lost requests", bad == 0 and mismatch == 0,
                f"{bad} failed/lost of {res['requests_total']}; {mismatch} phases where the server classified "
                "another number of images than were answered"))
    growth = rss["after"] - rss["warm"]
    out.append(("RSS growth <= 10 MB (after the warm-up -> after all requests)", growth <= 10,
                f"{growth:+.1f} MB (from ready: {rss['after'] - rss['ready']:+.1f} MB)"))
    out.append(("server exits 0 on SIGTERM", res["server_exit"] == 0, f"exit code {res['server_exit']}"))
    for v in res.get("views", []):
        if v["clients"] == 1:
            added = v["p50_ms"] - by[1]["p50_ms"]
            out.append(("preview + heatmap add <= 25 ms p50 at 1 client", added <= 25 and v["errors"] + v["lost"] == 0,
                        f"{added:+.1f} ms ({v['p50_ms']:.1f} vs {by[1]['p50_ms']:.1f})"))
    if "tls" in res:
        t = res["tls"]
        for http, https in zip(t["http"], t["https"]):
            c, r = http["clients"], https["images_per_s"] / http["images_per_s"]
            failed = http["errors"] + http["lost"] + https["errors"] + https["lost"]
            out.append((f"HTTPS throughput >= 0.9x HTTP at {c} client{'s' if c > 1 else ''} (alternated rounds, no "
                        "failed requests)", r >= 0.9 and failed == 0,
                        f"{https['images_per_s']:.1f} / {http['images_per_s']:.1f} = {r:.3f}, {failed} failed/lost"))
            if c == 1:
                added = https["p50_ms"] - http["p50_ms"]
                out.append(("HTTPS p50 <= HTTP p50 + 2 ms at 1 client (keep-alive, after the handshake)", added <= 2,
                            f"{https['p50_ms']:.1f} vs {http['p50_ms']:.1f} ms ({added:+.1f} ms; handshake "
                            f"{https['connect_ms']:.1f} ms vs TCP connect {http['connect_ms']:.2f} ms)"))
        out.append(("HTTPS server exits 0 on SIGTERM", t["server"]["server_exit"] == 0,
                    f"exit code {t['server']['server_exit']}"))
    return [{"goal": g, "pass": bool(ok), "measured": m} for g, ok, m in out]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=str(ROOT / "runs" / "demo" / "export"), show_default=True,
              help="An export folder (each tool picks the faster precision) or a model file.")
@click.option("--files", default=64, show_default=True, help="Distinct generated JPEGs, cycled by the clients.")
@click.option("--clients", default="1,4,16", show_default=True, help="Concurrent clients, one phase each.")
@click.option("--requests-per-phase", default=700, show_default=True)
@click.option("--rss-requests", default=2000, show_default=True,
              help="At least this many requests in all before the last RSS reading (a top-up phase at the "
                   "largest client count if the phases send fewer; 0: none).")
@click.option("--warmup", default=64, show_default=True, help="Untimed requests at the largest client count first.")
@click.option("--infer-repeats", default=3, show_default=True, help="xray-infer folder runs (median).")
@click.option("--max-seconds", default=120.0, show_default=True, help="Wall-clock limit of each phase.")
@click.option("--ready-timeout", default=60.0, show_default=True)
@click.option("--server-arg", "server_args", multiple=True, help="Extra xray-serve option (repeatable).")
@click.option("--views/--no-views", default=True, show_default=True,
              help="Also run 1 and 16 clients with ?preview=true&heatmap=true (models with heatmaps).")
@click.option("--tls/--no-tls", default=True, show_default=True,
              help="Also HTTPS vs HTTP at 1 and 16 clients (a second xray-serve with --tls-cert/--tls-key).")
@click.option("--tls-requests", default=300, show_default=True, help="Requests per HTTPS vs HTTP round.")
@click.option("--tls-rounds", type=click.IntRange(min=1), default=4, show_default=True,
              help="HTTPS vs HTTP rounds per protocol and client count, alternated.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the figures here.")
def main(model, files, clients, requests_per_phase, rss_requests, warmup, infer_repeats, max_seconds, ready_timeout,
         server_args, views, tls, tls_requests, tls_rounds, json_out):
    """xray-serve throughput, latency, batching, errors and RSS vs xray-infer on the same JPEGs."""
    counts = [int(c) for c in clients.split(",") if c.strip().isdigit() and int(c) > 0]
    if not counts:
        raise click.BadParameter(f"expected client counts such as 1,4,16, got {clients!r}", param_hint="--clients")
    phases = [(c, requests_per_phase) for c in counts]
    if sum(n for _, n in phases) < rss_requests:
        phases.append((max(counts), rss_requests - sum(n for _, n in phases)))
    print(f"phases (clients, requests): {phases}; total {sum(n for _, n in phases)}", flush=True)
    flags = cpu_flags()
    res = {"cpu": {"name": cpu_model(), "cores": len(os.sched_getaffinity(0)),
                   "int8_flags": sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"})},
           "model": model, "files": files}
    with tempfile.TemporaryDirectory(prefix="xray-bench-serve-") as tmp:
        jpegs = make_jpegs(Path(tmp) / "jpegs", files)
        mp = [w * h / 1e6 for w, h in map(image_size, jpegs)]
        res["megapixels"] = [min(mp), max(mp)]
        res["xray_infer"] = infer_baseline(model, Path(tmp) / "jpegs", jpegs, infer_repeats)
        res["single_reference"] = single_reference(model, jpegs)
        with serving(model, server_args, ready_timeout, Path(tmp) / "serve.log", res) as (proc, port):
            meta = json.loads(get(port, "/v1/metadata")[1])
            res["server_model"] = {k: meta.get(k) for k in ("file", "precision", "chosen_because")}
            rss = res["rss_mb"] = {"ready": rss_mb(proc.pid)}
            if warmup:
                load(port, jpegs, max(counts), warmup, max_seconds, "warmup")
            rss["warm"] = rss_mb(proc.pid)
            res["phases"] = []
            for i, (c, n) in enumerate(phases):
                before = batch_histogram(port)
                phase = load(port, jpegs, c, n, max_seconds, f"p{i}")
                phase["batches"] = batch_delta(before, batch_histogram(port))
                phase["rss_mb_after"] = rss["after"] = rss_mb(proc.pid)
                res["phases"].append(phase)
                print(f"  {c} clients: {phase['answered']}/{n} answered in {phase['elapsed_s']:.1f} s", flush=True)
            res["requests_total"] = sum(p["planned"] for p in res["phases"])
            if views and meta.get("heatmaps"):  # the same load with both views on: their added cost
                res["views"] = [load(port, jpegs, c, requests_per_phase, max_seconds, f"v{c}", VIEWS_QUERY)
                                for c in counts if c in (1, 16)]
            if tls:  # HTTPS beside this server, both idle but for the round being run
                from make_test_pki import make_pki

                pki, server = make_pki(Path(tmp) / "pki"), {}
                log = Path(tmp) / "serve_tls.log"
                with serving(model, server_args, ready_timeout, log, server, pki) as (tproc, tport):
                    context = client_tls(pki)
                    if warmup:
                        load(tport, jpegs, max(TLS_CLIENTS), warmup, max_seconds, "tlswarmup", tls=context)
                    res["tls"] = compare_tls((port, proc.pid), (tport, tproc.pid), context, jpegs, tls_requests,
                                             tls_rounds, max_seconds)
                res["tls"]["server"] = server
    res["goals"] = goals(res)
    report(res)
    if json_out:
        Path(json_out).write_text(json.dumps(public(res), indent=2))


if __name__ == "__main__":
    main()
