"""Helpers for tests of xray-serve: a real server process on 127.0.0.1 and small HTTP clients."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import requests

SERVE = [sys.executable, "-c", "from xray.serve.cli import main; main(prog_name='xray-serve')"]


class Server:
    """xray-serve ARGS on a free port of 127.0.0.1; `url`; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, *args, env: dict | None = None, ready_timeout: float = 60, command: list | None = None,
                 verify=True, cert=None):
        """verify: requests' verify (a CA file for an HTTPS server, --tls-cert); cert: requests' client cert
        (cert, key) for the readiness probe."""
        self.verify, self.cert = verify, cert
        self.log_path = f"/tmp/xray-serve-test-{uuid.uuid4().hex[:8]}.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen([*(command or SERVE), "--port", "0", *map(str, args)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            match = re.search(r"Uvicorn running on (https?)://127\.0\.0\.1:(\d+)", self.output())
            if match:
                self.port = int(match.group(2))
                self.url = f"{match.group(1)}://127.0.0.1:{self.port}"
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"xray-serve exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        else:
            self.stop()
            raise AssertionError(f"xray-serve did not start:\n{self.output()}")
        while time.monotonic() < deadline:  # ready = model loaded and warmed up
            if requests.get(self.url + "/health/ready", timeout=5, verify=verify, cert=cert).status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError("xray-serve never became ready")

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def metrics(self, headers: dict | None = None) -> dict:
        """/metrics as {'name{labels}': value}."""
        text = requests.get(self.url + "/metrics", headers=headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def raw_http(port: int, head: str, *body: bytes, gap_s: float = 0, close_after_send: bool = False,
             timeout: float = 10) -> str:
    """Send exactly these bytes (a request head, then the body's pieces gap_s apart: a partial or whole body)
    and return the response head ('' when the server closed without answering within `timeout`).
    close_after_send: hang up at once, read nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        for i, piece in enumerate(body):
            if i:
                time.sleep(gap_s)  # pacing the upload, not waiting for the server
            s.sendall(piece)
        if close_after_send:
            return ""
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return data.decode("latin-1")


def wait_until(condition, timeout: float = 10, every: float = 0.05) -> bool:
    """Poll `condition()` until it is true or `timeout` seconds pass; returns its last value (assert on it)."""
    deadline = time.monotonic() + timeout
    while not (ok := condition()) and time.monotonic() < deadline:
        time.sleep(every)
    return ok


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (Linux: /proc/net/tcp, tcp6), IPv4 as
    dotted quads, IPv6 as the kernel's hex."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.rpartition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else address)
    return found
